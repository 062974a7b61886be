//! The fused path's shared cases: logits → loss, statistics and gradient against the composed
//! reference, with and without the KL term, and its errors.

use super::*;

/// An owned fused-path problem: logits rows (one per token) and the loss inputs.
#[derive(Debug, Clone)]
pub struct FusedCase<T> {
    pub shape: RowShape,
    pub logits: Vec<T>,
    pub targets: Vec<i64>,
    pub mask: Vec<u8>,
    pub sequences: RowShape,
    pub old_logp: Vec<f32>,
    pub advantages: Vec<f32>,
    pub ref_logp: Option<Vec<f32>>,
    /// The KL term weighted by π/π_old (bias correction).
    pub kl_bias_correction: bool,
}

impl<T: rlhf_kernels::Element> FusedCase<T> {
    /// `b` sequences of `t` tokens over a vocabulary of `v`, the old and reference log-probs
    /// near the policy's own, the last token of every sequence but the first masked.
    pub fn random(b: usize, t: usize, v: usize, stride: usize, with_kl: bool, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let shape = RowShape::new(b * t, v).with_row_stride(stride);
        let logits: Vec<T> = rng.logits(shape, 2.0);
        let targets: Vec<i64> = (0..b * t).map(|_| rng.below(v) as i64).collect();
        let mask: Vec<u8> = (0..b * t).map(|n| u8::from(n < t || n % t != t - 1)).collect();
        let lp_opts = rlhf_kernels::TokenLogprobsOptions::default().ignore_index(None);
        let tokens = rlhf_kernels::Tokens::new(&targets).with_mask(&mask);
        let logp = reference::token_logprobs(&logits, shape, &tokens, &lp_opts).unwrap().logp;
        let old_logp = logp.iter().map(|&l| (l + rng.normal() * 0.15) as f32).collect();
        let ref_logp = with_kl.then(|| logp.iter().map(|&l| (l + rng.normal() * 0.2) as f32).collect());
        FusedCase {
            shape,
            logits,
            targets,
            mask,
            sequences: RowShape::new(b, t),
            old_logp,
            advantages: rng.normals(b * t, 1.0),
            ref_logp,
            kl_bias_correction: false,
        }
    }

    pub fn inputs(&self) -> rlhf_kernels::FusedPolicyInputs<'_, i64> {
        let tokens = rlhf_kernels::Tokens::new(&self.targets).with_mask(&self.mask);
        let inputs =
            rlhf_kernels::FusedPolicyInputs::new(tokens, self.sequences, &self.old_logp, &self.advantages);
        match &self.ref_logp {
            Some(r) => inputs.ref_logp(r),
            None => inputs,
        }
    }

    /// The fused path's options for `loss`, with the KL term's when the case has one.
    pub fn options(&self, loss: &PolicyLossOptions) -> rlhf_kernels::FusedPolicyOptions {
        let opts = rlhf_kernels::FusedPolicyOptions::new(*loss);
        if self.ref_logp.is_some() {
            opts.kl(fused_kl().bias_correction(self.kl_bias_correction))
        } else {
            opts
        }
    }
}

/// The fused path's options in the tests.
pub fn fused_kl() -> rlhf_kernels::SampledKlOptions {
    rlhf_kernels::SampledKlOptions::new(rlhf_kernels::KlEstimator::gradient_of(
        rlhf_kernels::KlDirection::PolicyRef,
    ))
    .coef(0.05)
}

pub trait FusedBackend {
    /// The gradient buffer (the logits' layout) and the statistics.
    fn fused<T: rlhf_kernels::Element>(
        &self,
        c: &FusedCase<T>,
        opts: &rlhf_kernels::FusedPolicyOptions,
        in_place: bool,
    ) -> Result<(Vec<T>, rlhf_kernels::FusedPolicyStats)>;
}

/// The fused path equals the composition of the reference's ops: token forward (f64, rounded
/// to f32 as the fused path hands it on), KL term (plain, or bias-corrected with the loss's old
/// log-probs), policy loss (clipped, SAPO, GMPO), backward of the total.
pub fn fused_path<T: rlhf_kernels::Element>(b: &impl FusedBackend) {
    let lp_opts = rlhf_kernels::TokenLogprobsOptions::default().ignore_index(None);
    let objectives = [PolicyObjective::Clip, PolicyObjective::SAPO, PolicyObjective::Gmpo];
    for (k, (v, stride, with_kl)) in
        [(50, 50, false), (1000, 1003, true), (129, 130, true)].into_iter().enumerate()
    {
        let mut c = FusedCase::<T>::random(3, 7, v, stride, with_kl, 300 + k as u64);
        c.kl_bias_correction = k == 2;
        let opts = PolicyLossOptions::new(objectives[k]).entropy_coef(0.01).aggregation(AGGREGATIONS[k % 4]);
        let tokens = rlhf_kernels::Tokens::new(&c.targets).with_mask(&c.mask);
        let fwd = reference::token_logprobs(&c.logits, c.shape, &tokens, &lp_opts).unwrap();
        let (logp, ent): (Vec<f32>, Vec<f32>) =
            fwd.logp.iter().zip(&fwd.entropy).map(|(&l, &h)| (l as f32, h as f32)).unzip();
        let inputs =
            PolicyLossInputs::new(c.sequences, &logp, &c.old_logp, &c.advantages).mask(&c.mask).entropy(&ent);
        let loss = reference::policy_loss(&inputs, &opts).unwrap();
        let mut g = loss.grad_logp.clone();
        let mut kl_loss = None;
        if let Some(r) = &c.ref_logp {
            let kl_inputs = SampledKlInputs::new(c.sequences, &logp, r).mask(&c.mask);
            let (kl_inputs, kl_opts) = match c.kl_bias_correction {
                true => (kl_inputs.old_logp(&c.old_logp), fused_kl().bias_correction(true)),
                false => (kl_inputs, fused_kl()),
            };
            let kl = reference::sampled_kl(&kl_inputs, &kl_opts).unwrap();
            g.iter_mut().zip(&kl.grad_logp).for_each(|(a, b)| *a += b);
            kl_loss = Some(kl.stats.loss);
        }
        let (g32, gh32): (Vec<f32>, Vec<f32>) =
            g.iter().zip(&loss.grad_entropy).map(|(&a, &b)| (a as f32, b as f32)).unzip();
        let want = reference::token_logprobs_backward(
            &c.logits,
            c.shape,
            &tokens,
            Some(&g32),
            Some(&gh32),
            &lp_opts,
        )
        .unwrap();
        for in_place in [false, true] {
            let what = format!("{} V={v} in_place={in_place} {:?}", T::DTYPE, objectives[k]);
            let (grad, stats) = b.fused(&c, &c.options(&opts), in_place).unwrap();
            let dense: Vec<T> =
                (0..c.shape.rows).flat_map(|r| grad[c.shape.row_range(r)].iter().copied()).collect();
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert_close(
                &dense,
                &want,
                Tolerance::for_dtype(T::DTYPE).scaled(scale),
                &format!("grad {what}"),
            );
            close(stats.policy.loss, loss.stats.loss, 1e-4, &format!("loss {what}"));
            assert_eq!(stats.kl.is_some(), kl_loss.is_some());
            if let (Some(got), Some(want)) = (stats.kl, kl_loss) {
                close(got.loss, want, 1e-4, &format!("kl loss {what}"));
            }
            close(stats.total_loss(), loss.stats.loss + kl_loss.unwrap_or(0.0), 1e-4, &what);
        }
    }
    // A `[B, T]` view that does not cover the token rows.
    let mut c = FusedCase::<T>::random(2, 3, 20, 20, false, 9);
    c.sequences = RowShape::new(2, 2);
    assert!(matches!(
        b.fused(&c, &c.options(&PolicyLossOptions::default()), false),
        Err(Error::ShapeMismatch { what: "sequences", .. })
    ));
    // No ignore index: an unmasked -100 (the usual padding id) is an out-of-range target, not
    // padding the loss would still count. On the GPU the stages share one status word, whose
    // lowest row wins: the loss's report of the NaN log-prob in that token's sequence (row 1)
    // comes before the token's own (row 4).
    let mut c = FusedCase::<T>::random(2, 3, 20, 20, false, 11);
    c.mask.fill(1);
    c.targets[4] = -100;
    let r = b.fused(&c, &c.options(&PolicyLossOptions::default()), false);
    use rlhf_kernels::RowProblem::{NonFinite, TargetOutOfRange};
    assert!(
        matches!(
            r,
            Err(Error::TargetOutOfRange { row: 4, .. }
                | Error::InvalidRow { op: "token_logprobs", row: 4, problem: TargetOutOfRange }
                | Error::InvalidRow { op: "policy_loss", row: 1, problem: NonFinite })
        ),
        "{r:?}"
    );
    // The KL term needs both its options and the reference log-probs.
    let loss = rlhf_kernels::FusedPolicyOptions::default();
    for (with_kl, opts) in [(true, loss), (false, loss.kl(fused_kl()))] {
        let c = FusedCase::<T>::random(2, 3, 20, 20, with_kl, 10);
        assert!(
            matches!(b.fused(&c, &opts, false), Err(Error::InvalidOption { name: "kl", .. })),
            "ref_logp {with_kl} with KL options {}",
            opts.kl.is_some()
        );
    }
}
