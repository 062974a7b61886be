//! The CPU backend behind the shared test bodies: each trait of the families' modules
//! implemented once over `rlhf_kernels::cpu`.

use super::advantages::{AdvantagesBackend, GaeCase, out_buffer};
use super::kl::{self, ExactBackend, ExactCase};
use super::ppo::{FusedBackend, FusedCase, PolicyCase, PolicyOut, PpoBackend, ValueCase};
use super::tokens::{Case, Fwd, TokenBackend};
use super::{Backward, Forward, advantages as adv};
use rlhf_kernels::*;

/// The CPU backend.
pub struct Cpu;

impl Forward for Cpu {
    fn forward<T: Element>(
        &self,
        logits: &[T],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0.0; shape.len()];
        cpu::log_softmax(logits, shape, &mut out, opts)?;
        Ok(out)
    }
}

impl Backward for Cpu {
    fn backward<T: Element>(
        &self,
        out: &[f32],
        grad_out: &[f32],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<T>> {
        let mut grad = vec![T::from_f32(f32::NAN); shape.rows * shape.row_stride];
        cpu::log_softmax_backward(out, grad_out, shape, &mut grad, opts)?;
        Ok(grad)
    }
}

impl TokenBackend for Cpu {
    fn forward<T: Element>(&self, case: &Case<T>, with_entropy: bool) -> Result<Fwd> {
        let n = case.shape.rows;
        let mut f = Fwd { logp: vec![0.0; n], entropy: vec![0.0; n], lse: vec![0.0; n] };
        let out = TokenOutputs::default().logp(&mut f.logp).lse(&mut f.lse);
        let out = if with_entropy { out.entropy(&mut f.entropy) } else { out };
        cpu::token_logprobs(&case.logits, case.shape, &case.tokens(), out, &case.opts)?;
        Ok(f)
    }

    fn backward<T: Element>(&self, case: &Case<T>, grads: &TokenGrads<'_>, in_place: bool) -> Result<Vec<T>> {
        if in_place {
            let mut x = case.logits.clone();
            cpu::token_logprobs_backward_in_place(&mut x, case.shape, &case.tokens(), grads, &case.opts)?;
            Ok(x)
        } else {
            let mut g = vec![T::from_f32(f32::NAN); case.logits.len()];
            cpu::token_logprobs_backward(
                &case.logits,
                case.shape,
                &case.tokens(),
                grads,
                &mut g,
                &case.opts,
            )?;
            Ok(g)
        }
    }
}

impl kl::SampledBackend for Cpu {
    fn sampled(
        &self,
        c: &kl::SampledCase,
    ) -> rlhf_kernels::Result<(Vec<f32>, Vec<f32>, rlhf_kernels::SampledKlStats)> {
        let n = c.logp.len();
        let (mut v, mut g) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        let out = SampledKlOutputs::default().values(&mut v).grad_logp(&mut g);
        let stats = cpu::sampled_kl(&c.inputs(), out, &c.opts)?;
        Ok((v, g, stats))
    }

    fn rewards(
        &self,
        inputs: &KlRewardsInputs<'_>,
        opts: &KlRewardsOptions,
    ) -> rlhf_kernels::Result<Vec<f32>> {
        let mut r = vec![f32::NAN; inputs.kl.len()];
        cpu::kl_rewards(inputs, &mut r, opts)?;
        Ok(r)
    }
}

impl ExactBackend for Cpu {
    fn forward<P: rlhf_kernels::Element, Q: rlhf_kernels::Element>(
        &self,
        c: &ExactCase<P, Q>,
    ) -> rlhf_kernels::Result<kl::ExactOut> {
        let n = c.policy_shape.rows;
        let mut o = kl::ExactOut::zeros(n);
        let out = ExactKlOutputs::default()
            .value(&mut o.value)
            .lse(&mut o.policy_lse, &mut o.ref_lse)
            .policy_term(&mut o.policy_term);
        cpu::exact_kl(&c.policy, c.policy_shape, &c.reference_rows(), out, &c.opts)?;
        Ok(o)
    }

    fn forward_with_statistic<P: rlhf_kernels::Element, Q: rlhf_kernels::Element>(
        &self,
        c: &ExactCase<P, Q>,
        stat: rlhf_kernels::ExactKlStatistic,
        with_value: bool,
    ) -> rlhf_kernels::Result<(Vec<f32>, Aggregated)> {
        let mut value = vec![f32::NAN; if with_value { c.policy_shape.rows } else { 0 }];
        let mut statistic = Aggregated { value: f64::NAN, ..Default::default() };
        let mut out = ExactKlOutputs::default().statistic(&mut statistic, stat);
        if with_value {
            out = out.value(&mut value);
        }
        cpu::exact_kl(&c.policy, c.policy_shape, &c.reference_rows(), out, &c.opts)?;
        Ok((value, statistic))
    }

    fn forward_sharded<P: rlhf_kernels::Element, Q: rlhf_kernels::Element>(
        &self,
        c: &ExactCase<P, Q>,
        shards: &[kl::Shard<P, Q>],
    ) -> rlhf_kernels::Result<kl::ExactOut> {
        let rows = c.policy_shape.rows;
        let mask = c.mask.as_deref();
        let mut parts = vec![ExactKlPartial::EMPTY; rows * shards.len()];
        for (s, part) in shards.iter().zip(parts.chunks_mut(rows)) {
            let r = ReferenceRows { mask, ..ReferenceRows::new(&s.reference, s.shape) };
            cpu::exact_kl_shard_partials(&s.policy, s.shape, &r, part, &c.opts)?;
        }
        let mut o = kl::ExactOut::zeros(rows);
        let jsd = matches!(c.opts.divergence, ExactDivergence::Jsd { .. });
        let out = ExactKlOutputs::default().lse(&mut o.policy_lse, &mut o.ref_lse);
        let out = if jsd { out } else { out.value(&mut o.value) };
        cpu::finish_exact_kl_partials(&parts, mask, out, &c.opts)?;
        if jsd {
            let mut sums = vec![[0.0f32; 2]; rows * shards.len()];
            for (s, mine) in shards.iter().zip(sums.chunks_mut(rows)) {
                let r = ReferenceRows { mask, ..ReferenceRows::new(&s.reference, s.shape) };
                cpu::jsd_shard_sums(&s.policy, s.shape, &r, &o.policy_lse, &o.ref_lse, mine, &c.opts)?;
            }
            let out = ExactKlOutputs::default().value(&mut o.value);
            cpu::finish_jsd_sums(&sums, mask, [&o.policy_lse, &o.ref_lse], out, &c.opts)?;
        }
        Ok(o)
    }

    fn backward<P: rlhf_kernels::Element, Q: rlhf_kernels::Element>(
        &self,
        c: &ExactCase<P, Q>,
        f: &kl::ExactOut,
        g: &[f32],
        in_place: bool,
    ) -> rlhf_kernels::Result<Vec<P>> {
        let grads =
            ExactKlGrads::new(g, &f.policy_lse, &f.ref_lse).value(&f.value).policy_term(&f.policy_term);
        if in_place {
            let mut x = c.policy.clone();
            cpu::exact_kl_backward_in_place(&mut x, c.policy_shape, &c.reference_rows(), &grads, &c.opts)?;
            Ok(x)
        } else {
            let mut dx = vec![P::from_f32(f32::NAN); c.policy.len()];
            cpu::exact_kl_backward(&c.policy, c.policy_shape, &c.reference_rows(), &grads, &mut dx, &c.opts)?;
            Ok(dx)
        }
    }
}

impl AdvantagesBackend for Cpu {
    fn overlong(&self, inputs: &OverlongInputs<'_>, opts: &OverlongOptions) -> Result<Vec<f32>> {
        let mut shaped = vec![f32::NAN; inputs.scores.len()];
        cpu::overlong_shaping(inputs, &mut shaped, opts)?;
        Ok(shaped)
    }

    fn gae(&self, c: &GaeCase, opts: &GaeOptions) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut a, mut r) = (out_buffer(c.shape), out_buffer(c.shape));
        cpu::gae(&c.inputs(), GaeOutputs::default().advantages(&mut a).returns(&mut r), opts)?;
        Ok((a, r))
    }

    fn group(
        &self,
        scores: &[f32],
        groups: &Groups,
        opts: &GroupAdvantageOptions,
        tokens: Option<(RowShape, Option<&[u8]>)>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut per_seq = vec![f32::NAN; groups.sequences()];
        let mut tok = tokens.map(|(shape, _)| out_buffer(shape));
        let mut out = GroupAdvantageOutputs::default().per_sequence(&mut per_seq);
        if let (Some(buf), Some((shape, mask))) = (tok.as_mut(), tokens) {
            out = out.per_token(buf, shape, mask);
        }
        cpu::group_advantages(scores, groups, out, opts)?;
        Ok((per_seq, tok))
    }

    fn moments(&self, values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments> {
        cpu::masked_moments(values, shape, mask)
    }

    fn whiten(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        opts: &WhitenOptions,
    ) -> Result<(Vec<f32>, Moments)> {
        let mut v = values.to_vec();
        for i in 0..shape.rows.saturating_sub(1) {
            v[shape.row_range(i).end..shape.row_start(i + 1)].fill(adv::UNTOUCHED);
        }
        let m = cpu::whiten(&mut v, shape, mask, opts)?;
        Ok((v, m))
    }
}

/// The dense part of a strided buffer.
pub fn dense(v: &[f32], shape: RowShape) -> Vec<f32> {
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
}

impl PpoBackend for Cpu {
    fn policy(&self, c: &PolicyCase, opts: &PolicyLossOptions) -> Result<PolicyOut> {
        let n = c.shape.min_len();
        let (mut l, mut g, mut h) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let out = PolicyLossOutputs::default().loss(&mut l).grad_logp(&mut g).grad_entropy(&mut h);
        let stats = cpu::policy_loss(&c.inputs(), out, opts)?;
        Ok(PolicyOut {
            loss: dense(&l, c.shape),
            grad_logp: dense(&g, c.shape),
            grad_entropy: dense(&h, c.shape),
            stats,
        })
    }

    fn policy_onto(
        &self,
        c: &PolicyCase,
        opts: &PolicyLossOptions,
        start: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut g, mut h) = (start.to_vec(), start.to_vec());
        let out = PolicyLossOutputs::default().grad_logp(&mut g).grad_entropy(&mut h).accumulate(true);
        cpu::policy_loss(&c.inputs(), out, opts)?;
        Ok((dense(&g, c.shape), dense(&h, c.shape)))
    }

    fn value(&self, c: &ValueCase, opts: &ValueLossOptions) -> Result<(Vec<f32>, Vec<f32>, ValueLossStats)> {
        let n = c.shape.min_len();
        let (mut l, mut g) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        let stats =
            cpu::value_loss(&c.inputs(), ValueLossOutputs::default().loss(&mut l).grad_values(&mut g), opts)?;
        Ok((dense(&l, c.shape), dense(&g, c.shape), stats))
    }

    fn aggregate(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        aggregation: Aggregation,
        norm: Normaliser,
    ) -> Result<f64> {
        aggregation.aggregate(values, shape, mask, norm)
    }
}

impl FusedBackend for Cpu {
    fn fused<T: Element>(
        &self,
        c: &FusedCase<T>,
        opts: &FusedPolicyOptions,
        in_place: bool,
    ) -> Result<(Vec<T>, FusedPolicyStats)> {
        let inputs = c.inputs();
        if in_place {
            let mut logits = c.logits.clone();
            let stats = cpu::policy_loss_from_logits_in_place(&mut logits, c.shape, &inputs, opts)?;
            Ok((logits, stats))
        } else {
            let mut grad = vec![T::from_f32(f32::NAN); c.logits.len()];
            let stats = cpu::policy_loss_from_logits(&c.logits, c.shape, &inputs, &mut grad, opts)?;
            Ok((grad, stats))
        }
    }
}
