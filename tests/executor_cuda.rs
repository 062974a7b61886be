//! One pipeline written once over `Executor` (token log-probs, the policy loss with its
//! statistics, the backward in place), run on the CPU executor and, when a GPU (or the emulated
//! device) is there, on the CUDA executor: both held to the CPU ops called directly.

use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    Backend, Executor, Job, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, PolicyLossStats, Result,
    RowShape, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, cpu,
};

/// `[B, T] = [3, 5]` tokens over a vocabulary of 37, the last two tokens of each row padding.
struct Batch {
    logits: Vec<f32>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
}

const SEQS: RowShape = RowShape { rows: 3, cols: 5, row_stride: 5 };
const SHAPE: RowShape = RowShape { rows: 15, cols: 37, row_stride: 37 };

fn batch() -> Batch {
    let mut rng = Rng::new(7);
    Batch {
        logits: rng.normals(SHAPE.len(), 3.0),
        targets: (0..15).map(|i| (i * 5 % 37) as i64).collect(),
        mask: (0..15).map(|i| u8::from(i % 5 < 3)).collect(),
        old_logp: (0..15).map(|_| (-3.0 - rng.uniform()) as f32).collect(),
        advantages: rng.normals(15, 1.0),
    }
}

/// The pipeline, once: what it produced, downloaded.
struct Step<'a>(&'a Batch);

struct Produced {
    logp: Vec<f32>,
    grad_logits: Vec<f32>,
    stats: PolicyLossStats,
}

impl Job for Step<'_> {
    type Output = Produced;

    fn run<E: Executor>(self, e: &mut E) -> Result<Produced> {
        let b = self.0;
        let (logits, targets, mask) = (e.upload(&b.logits)?, e.upload(&b.targets)?, e.upload(&b.mask)?);
        let (old_logp, advantages) = (e.upload(&b.old_logp)?, e.upload(&b.advantages)?);
        let (mut logp, mut lse, mut grad_logp) =
            (e.zeros::<f32>(15)?, e.zeros::<f32>(15)?, e.zeros::<f32>(15)?);
        let mut grad_logits = e.zeros::<f32>(SHAPE.len())?;
        let mut stats = e.stats::<PolicyLossStats>()?;
        let opts = TokenLogprobsOptions::default();
        let tokens = Tokens::new(E::view(&targets)).with_mask(E::view(&mask));

        let out = TokenOutputs::default().logp(E::view_mut(&mut logp)).lse(E::view_mut(&mut lse));
        e.token_logprobs(E::view(&logits), SHAPE, &tokens, out, &opts)?;
        let inputs = PolicyLossInputs::new(SEQS, E::view(&logp), E::view(&old_logp), E::view(&advantages))
            .mask(E::view(&mask));
        let out = PolicyLossOutputs::default()
            .grad_logp(E::view_mut(&mut grad_logp))
            .stats(E::stats_out(&mut stats));
        e.policy_loss(&inputs, out, &PolicyLossOptions::default())?;
        e.copy(&logits, &mut grad_logits)?;
        let grads = TokenGrads::new(E::view(&lse)).grad_logp(E::view(&grad_logp));
        e.token_logprobs_backward_in_place(E::view_mut(&mut grad_logits), SHAPE, &tokens, &grads, &opts)?;
        e.finish()?;
        Ok(Produced {
            logp: e.download(&logp)?,
            grad_logits: e.download(&grad_logits)?,
            stats: e.read(&stats)?,
        })
    }
}

/// The same step through the CPU functions directly.
fn direct(b: &Batch) -> Produced {
    let opts = TokenLogprobsOptions::default();
    let tokens = Tokens::new(&b.targets).with_mask(&b.mask);
    let (mut logp, mut lse, mut grad_logp) = (vec![0.0f32; 15], vec![0.0f32; 15], vec![0.0f32; 15]);
    cpu::token_logprobs(
        &b.logits,
        SHAPE,
        &tokens,
        TokenOutputs::default().logp(&mut logp).lse(&mut lse),
        &opts,
    )
    .unwrap();
    let inputs = PolicyLossInputs::new(SEQS, &logp, &b.old_logp, &b.advantages).mask(&b.mask);
    let out = PolicyLossOutputs::default().grad_logp(&mut grad_logp);
    let stats = cpu::policy_loss(&inputs, out, &PolicyLossOptions::default()).unwrap();
    let mut grad_logits = b.logits.clone();
    let grads = TokenGrads::new(&lse).grad_logp(&grad_logp);
    cpu::token_logprobs_backward_in_place(&mut grad_logits, SHAPE, &tokens, &grads, &opts).unwrap();
    Produced { logp, grad_logits, stats }
}

#[cfg(feature = "cuda")]
fn check(got: &Produced, want: &Produced, what: &str) {
    use rlhf_kernels::testing::{Tolerance, assert_close};
    let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(&got.logp, &f64s(&want.logp), tol, &format!("{what}: logp"));
    assert_close(&got.grad_logits, &f64s(&want.grad_logits), tol, &format!("{what}: grad logits"));
    let (g, w) = (got.stats, want.stats);
    assert_eq!(g.counts, w.counts, "{what}: counts");
    assert!((g.loss - w.loss).abs() <= 1e-5 * w.loss.abs().max(1.0), "{what}: loss {} vs {}", g.loss, w.loss);
}

#[test]
fn cpu_executor_matches_the_cpu_functions() {
    let b = batch();
    let got = Backend::Cpu.run(Step(&b)).unwrap();
    let want = direct(&b);
    // The executor calls the same functions: bit for bit.
    assert_eq!(got.logp, want.logp);
    assert_eq!(got.grad_logits, want.grad_logits);
    assert_eq!(got.stats, want.stats);
}

#[test]
fn cuda_executor_matches_the_cpu_functions() {
    #[cfg(feature = "cuda")]
    {
        let device = rlhf_kernels::cuda_or_skip!();
        let b = batch();
        let got = Backend::Cuda(device).run(Step(&b)).unwrap();
        check(&got, &direct(&b), "cuda executor");
    }
    #[cfg(not(feature = "cuda"))]
    rlhf_kernels::testing::skip("executor::cuda_executor_matches_the_cpu_functions", "built without `cuda`");
}

#[test]
fn executor_errors_are_typed() {
    // A shape mismatch reaches the caller as the op's error, not a panic.
    struct Bad;
    impl Job for Bad {
        type Output = ();
        fn run<E: Executor>(self, e: &mut E) -> Result<()> {
            let (logits, targets) = (e.upload(&[0.0f32; 6])?, e.upload(&[0i64; 2])?);
            let mut logp = e.zeros::<f32>(3)?;
            let out = TokenOutputs::default().logp(E::view_mut(&mut logp));
            let tokens = Tokens::new(E::view(&targets));
            e.token_logprobs(
                E::view(&logits),
                RowShape::new(3, 2),
                &tokens,
                out,
                &TokenLogprobsOptions::default(),
            )
        }
    }
    assert!(matches!(Backend::Cpu.run(Bad), Err(rlhf_kernels::Error::ShapeMismatch { what: "targets", .. })));
}
