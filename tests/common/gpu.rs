//! The CUDA backend behind the shared test bodies: each trait of the families' modules
//! implemented once over `rlhf_kernels::cuda`, on one stream.

mod exact;

use std::sync::Arc;

use super::advantages::{AdvantagesBackend, GaeCase, out_buffer};
use super::kl::{SampledBackend, SampledCase};
use super::ppo::{FusedBackend, FusedCase, PolicyCase, PolicyOut, PpoBackend, ValueCase};
use super::tokens::{Case, Fwd, TokenBackend};
use super::{Backward, Forward, advantages as adv};
use rlhf_kernels::cuda::*;
use rlhf_kernels::cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr, ValidAsZeroBits};
use rlhf_kernels::*;

/// The CUDA backend on one stream.
pub struct Gpu(pub Arc<CudaStream>);

impl Gpu {
    pub fn upload<T: Element>(&self, case: &Case<T>) -> Uploaded<T> {
        let s = &self.0;
        Uploaded {
            x: s.clone_htod(&case.logits).unwrap(),
            targets: s.clone_htod(&case.targets).unwrap(),
            mask: case.mask.as_ref().map(|m| s.clone_htod(m).unwrap()),
        }
    }

    /// Uploads `v` (at least one element, so empty inputs reach the op's own checks).
    pub fn up<T: DeviceRepr + ValidAsZeroBits + Copy>(&self, v: &[T]) -> (CudaSlice<T>, usize) {
        let s = &self.0;
        let buf = if v.is_empty() { s.alloc_zeros::<T>(1).unwrap() } else { s.clone_htod(v).unwrap() };
        (buf, v.len())
    }

    pub fn dense(&self, b: &CudaSlice<f32>, shape: RowShape) -> Vec<f32> {
        let v = self.0.clone_dtoh(b).unwrap();
        (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
    }
}

impl Forward for Gpu {
    fn forward<T: Element>(
        &self,
        logits: &[T],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<f32>> {
        let s = &self.0;
        let x = s.clone_htod(logits).unwrap();
        let mut y = s.alloc_zeros::<f32>(shape.len()).unwrap();
        let mut ctx = LaunchContext::new(s)?;
        cuda::log_softmax(&mut ctx, &x, shape, &mut y, opts)?;
        ctx.check()?;
        Ok(s.clone_dtoh(&y).unwrap())
    }
}

impl Backward for Gpu {
    fn backward<T: Element>(
        &self,
        out: &[f32],
        g: &[f32],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<T>> {
        let s = &self.0;
        let (y, g) = (s.clone_htod(out).unwrap(), s.clone_htod(g).unwrap());
        let mut dx = s.clone_htod(&vec![T::from_f32(f32::NAN); shape.rows * shape.row_stride]).unwrap();
        let mut ctx = LaunchContext::new(s)?;
        cuda::log_softmax_backward(&mut ctx, &y, &g, shape, &mut dx, opts)?;
        ctx.check()?;
        Ok(s.clone_dtoh(&dx).unwrap())
    }
}

pub struct Uploaded<T> {
    pub x: CudaSlice<T>,
    pub targets: CudaSlice<i64>,
    pub mask: Option<CudaSlice<u8>>,
}

impl<T> Uploaded<T> {
    pub fn tokens(&self) -> Tokens<'_, i64, Cuda> {
        let t = Tokens::new(self.targets.as_view());
        match &self.mask {
            Some(m) => t.with_mask(m.as_view()),
            None => t,
        }
    }
}

impl TokenBackend for Gpu {
    fn forward<T: Element>(&self, case: &Case<T>, with_entropy: bool) -> Result<Fwd> {
        let s = &self.0;
        let n = case.shape.rows;
        let up = self.upload(case);
        let (mut logp, mut entropy, mut lse) = (
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
        );
        let mut ctx = LaunchContext::new(s)?;
        {
            let out = TokenOutputs::default().logp(logp.as_view_mut()).lse(lse.as_view_mut());
            let out = if with_entropy { out.entropy(entropy.as_view_mut()) } else { out };
            cuda::token_logprobs(&mut ctx, &up.x, case.shape, &up.tokens(), out, &case.opts)?;
        }
        ctx.check()?;
        Ok(Fwd {
            logp: s.clone_dtoh(&logp).unwrap(),
            entropy: s.clone_dtoh(&entropy).unwrap(),
            lse: s.clone_dtoh(&lse).unwrap(),
        })
    }

    fn backward<T: Element>(&self, case: &Case<T>, grads: &TokenGrads<'_>, in_place: bool) -> Result<Vec<T>> {
        let s = &self.0;
        let mut up = self.upload(case);
        let lse = s.clone_htod(grads.lse).unwrap();
        let opt = |v: Option<&[f32]>| v.map(|v| s.clone_htod(v).unwrap());
        let (entropy, gl, gh) = (opt(grads.entropy), opt(grads.grad_logp), opt(grads.grad_entropy));
        let dg = TokenGrads {
            lse: lse.as_view(),
            entropy: entropy.as_ref().map(|v| v.as_view()),
            grad_logp: gl.as_ref().map(|v| v.as_view()),
            grad_entropy: gh.as_ref().map(|v| v.as_view()),
        };
        let mut ctx = LaunchContext::new(s)?;
        let targets = up.targets.clone();
        let mask = up.mask.clone();
        let tokens = Tokens { targets: targets.as_view(), mask: mask.as_ref().map(|m| m.as_view()) };
        if in_place {
            cuda::token_logprobs_backward_in_place(
                &mut ctx, &mut up.x, case.shape, &tokens, &dg, &case.opts,
            )?;
            ctx.check()?;
            Ok(s.clone_dtoh(&up.x).unwrap())
        } else {
            let mut dx = s.clone_htod(&vec![T::from_f32(f32::NAN); case.logits.len()]).unwrap();
            cuda::token_logprobs_backward(&mut ctx, &up.x, case.shape, &tokens, &dg, &mut dx, &case.opts)?;
            ctx.check()?;
            Ok(s.clone_dtoh(&dx).unwrap())
        }
    }
}

impl SampledBackend for Gpu {
    fn sampled(&self, c: &SampledCase) -> Result<(Vec<f32>, Vec<f32>, SampledKlStats)> {
        let s = &self.0;
        let (lp, rlp) = (s.clone_htod(&c.logp).unwrap(), s.clone_htod(&c.ref_logp).unwrap());
        let mask = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let old = c.old_logp.as_ref().map(|o| s.clone_htod(o).unwrap());
        let mut v = s.clone_htod(&vec![f32::NAN; c.logp.len()]).unwrap();
        let mut g = s.clone_htod(&vec![f32::NAN; c.logp.len()]).unwrap();
        let (mut stats, mut ctx) = (DeviceStats::<SampledKlStats>::new(s)?, LaunchContext::new(s)?);
        let inputs = SampledKlInputs {
            shape: c.shape,
            logp: lp.as_view(),
            ref_logp: rlp.as_view(),
            mask: mask.as_ref().map(|m| m.as_view()),
            old_logp: old.as_ref().map(|o| o.as_view()),
        };
        let out = SampledKlOutputs {
            values: Some(v.as_view_mut()),
            grad_logp: Some(g.as_view_mut()),
            stats: Some(&mut stats),
            workspace: None,
        };
        cuda::sampled_kl(&mut ctx, &inputs, out, &c.opts)?;
        ctx.check()?;
        Ok((s.clone_dtoh(&v).unwrap(), s.clone_dtoh(&g).unwrap(), stats.read(s)?))
    }

    fn rewards(&self, inputs: &KlRewardsInputs<'_>, opts: &KlRewardsOptions) -> Result<Vec<f32>> {
        let s = &self.0;
        let (k, sc) = (s.clone_htod(inputs.kl).unwrap(), s.clone_htod(inputs.scores).unwrap());
        let m = inputs.mask.map(|m| s.clone_htod(m).unwrap());
        let mut r = s.clone_htod(&vec![f32::NAN; inputs.kl.len()]).unwrap();
        let mut ctx = LaunchContext::new(s)?;
        let device = KlRewardsInputs::new(inputs.shape, &k, &sc);
        let device = match &m {
            Some(m) => device.mask(m),
            None => device,
        };
        cuda::kl_rewards(&mut ctx, &device, &mut r, opts)?;
        ctx.check()?;
        Ok(s.clone_dtoh(&r).unwrap())
    }
}

impl AdvantagesBackend for Gpu {
    fn overlong(&self, inputs: &OverlongInputs<'_>, opts: &OverlongOptions) -> Result<Vec<f32>> {
        let s = &self.0;
        let (scores, n) = self.up(inputs.scores);
        let mask = inputs.mask.map(|m| self.up(m));
        let mut shaped = s.clone_htod(&vec![f32::NAN; n.max(1)]).unwrap();
        let mut ctx = LaunchContext::new(s)?;
        let mask_view = mask.as_ref().map(|(m, k)| m.slice(0..*k));
        let device = OverlongInputs { shape: inputs.shape, scores: scores.slice(0..n), mask: mask_view };
        cuda::overlong_shaping(&mut ctx, &device, shaped.slice_mut(0..n), opts)?;
        ctx.check()?;
        Ok(s.clone_dtoh(&shaped).unwrap()[..n].to_vec())
    }

    fn gae(&self, c: &GaeCase, opts: &GaeOptions) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = &self.0;
        let up = |v: &Option<Vec<f32>>| v.as_ref().map(|v| self.up(v));
        let (rewards, kl, scores, values) = (up(&c.rewards), up(&c.kl), up(&c.scores), up(&c.values));
        let mask = c.mask.as_ref().map(|m| self.up(m));
        let (mut a, _) = self.up(&out_buffer(c.shape));
        let (mut r, _) = self.up(&out_buffer(c.shape));
        let mut ctx = LaunchContext::new(s)?;
        fn view(b: &Option<(CudaSlice<f32>, usize)>) -> Option<CudaView<'_, f32>> {
            b.as_ref().map(|(b, n)| b.slice(0..*n))
        }
        let mut inputs = GaeInputs::new(c.shape);
        inputs.rewards = view(&rewards);
        inputs.kl_penalty = view(&kl).map(|k| (k, c.beta));
        inputs.scores = view(&scores);
        inputs.values = view(&values);
        inputs.mask = mask.as_ref().map(|(m, n)| m.slice(0..*n));
        let n = c.shape.min_len();
        let out = GaeOutputs::default().advantages(a.slice_mut(0..n)).returns(r.slice_mut(0..n));
        cuda::gae(&mut ctx, &inputs, out, opts)?;
        ctx.check()?;
        let d = |b: &CudaSlice<f32>| s.clone_dtoh(b).unwrap()[..n].to_vec();
        Ok((d(&a), d(&r)))
    }

    fn group(
        &self,
        scores: &[f32],
        groups: &Groups,
        opts: &GroupAdvantageOptions,
        tokens: Option<(RowShape, Option<&[u8]>)>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let s = &self.0;
        let dg = DeviceGroups::new(s, groups)?;
        let (sc, n_sc) = self.up(scores);
        let (mut per_seq, _) = self.up(&vec![f32::NAN; groups.sequences()]);
        let mut tok = tokens.map(|(shape, m)| (self.up(&out_buffer(shape)), shape, m.map(|m| self.up(m))));
        let mut ctx = LaunchContext::new(s)?;
        let mut out = GroupAdvantageOutputs::default().per_sequence(per_seq.slice_mut(0..groups.sequences()));
        if let Some(((buf, n), shape, m)) = tok.as_mut() {
            out = out.per_token(buf.slice_mut(0..*n), *shape, m.as_ref().map(|(m, n)| m.slice(0..*n)));
        }
        cuda::group_advantages(&mut ctx, &sc.slice(0..n_sc), &dg, out, opts)?;
        ctx.check()?;
        let tokens = tok.map(|((buf, n), _, _)| s.clone_dtoh(&buf).unwrap()[..n].to_vec());
        Ok((s.clone_dtoh(&per_seq).unwrap(), tokens))
    }

    fn moments(&self, values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments> {
        let s = &self.0;
        let (v, n) = self.up(values);
        let m = mask.map(|m| self.up(m));
        let (mut out, mut ctx) = (DeviceStats::<Moments>::new(s)?, LaunchContext::new(s)?);
        let mask_view = m.as_ref().map(|(m, n)| m.slice(0..*n));
        cuda::masked_moments(&mut ctx, &v.slice(0..n), shape, mask_view.as_ref(), &mut out)?;
        ctx.check()?;
        out.read(s)
    }

    fn whiten(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        opts: &WhitenOptions,
    ) -> Result<(Vec<f32>, Moments)> {
        let s = &self.0;
        let mut host = values.to_vec();
        for i in 0..shape.rows.saturating_sub(1) {
            host[shape.row_range(i).end..shape.row_start(i + 1)].fill(adv::UNTOUCHED);
        }
        let (mut v, n) = self.up(&host);
        let m = mask.map(|m| self.up(m));
        let (mut out, mut ctx) = (DeviceStats::<Moments>::new(s)?, LaunchContext::new(s)?);
        let mask_view = m.as_ref().map(|(m, n)| m.slice(0..*n));
        cuda::whiten(&mut ctx, &mut v.slice_mut(0..n), shape, mask_view.as_ref(), &mut out, opts)?;
        ctx.check()?;
        Ok((s.clone_dtoh(&v).unwrap()[..n].to_vec(), out.read(s)?))
    }
}

impl PpoBackend for Gpu {
    fn policy(&self, c: &PolicyCase, opts: &PolicyLossOptions) -> Result<PolicyOut> {
        let s = &self.0;
        let (lp, n) = self.up(&c.logp);
        let (old, n_old) = self.up(&c.old_logp);
        let (adv, n_adv) = self.up(&c.advantages);
        let mask = c.mask.as_ref().map(|m| self.up(m));
        let entropy = c.entropy.as_ref().map(|h| self.up(h));
        let len = c.shape.min_len();
        let nan = vec![f32::NAN; len.max(1)];
        let (mut l, mut g, mut h) = (self.up(&nan).0, self.up(&nan).0, self.up(&nan).0);
        let (mut stats, mut ctx) = (DeviceStats::<PolicyLossStats>::new(s)?, LaunchContext::new(s)?);
        let inputs = PolicyLossInputs {
            shape: c.shape,
            logp: lp.slice(0..n),
            old_logp: old.slice(0..n_old),
            advantages: adv.slice(0..n_adv),
            mask: mask.as_ref().map(|(m, n)| m.slice(0..*n)),
            entropy: entropy.as_ref().map(|(e, n)| e.slice(0..*n)),
        };
        let out = PolicyLossOutputs {
            loss: Some(l.slice_mut(0..len)),
            grad_logp: Some(g.slice_mut(0..len)),
            grad_entropy: Some(h.slice_mut(0..len)),
            stats: Some(&mut stats),
            workspace: None,
            accumulate: false,
        };
        cuda::policy_loss(&mut ctx, &inputs, out, opts)?;
        ctx.check()?;
        Ok(PolicyOut {
            loss: self.dense(&l, c.shape),
            grad_logp: self.dense(&g, c.shape),
            grad_entropy: self.dense(&h, c.shape),
            stats: stats.read(s)?,
        })
    }

    fn policy_onto(
        &self,
        c: &PolicyCase,
        opts: &PolicyLossOptions,
        start: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = &self.0;
        let (lp, old, adv) = (self.up(&c.logp).0, self.up(&c.old_logp).0, self.up(&c.advantages).0);
        let mask = c.mask.as_ref().map(|m| self.up(m).0);
        let entropy = c.entropy.as_ref().map(|h| self.up(h).0);
        let (mut g, mut h) = (self.up(start).0, self.up(start).0);
        let mut ctx = LaunchContext::new(s)?;
        let inputs = PolicyLossInputs {
            shape: c.shape,
            logp: lp.as_view(),
            old_logp: old.as_view(),
            advantages: adv.as_view(),
            mask: mask.as_ref().map(|m| m.as_view()),
            entropy: entropy.as_ref().map(|e| e.as_view()),
        };
        let out = PolicyLossOutputs {
            grad_logp: Some(g.as_view_mut()),
            grad_entropy: Some(h.as_view_mut()),
            accumulate: true,
            ..Default::default()
        };
        cuda::policy_loss(&mut ctx, &inputs, out, opts)?;
        ctx.check()?;
        Ok((self.dense(&g, c.shape), self.dense(&h, c.shape)))
    }

    fn value(&self, c: &ValueCase, opts: &ValueLossOptions) -> Result<(Vec<f32>, Vec<f32>, ValueLossStats)> {
        let s = &self.0;
        let (v, n) = self.up(&c.values);
        let (old, n_old) = self.up(&c.old_values);
        let (ret, n_ret) = self.up(&c.returns);
        let mask = c.mask.as_ref().map(|m| self.up(m));
        let len = c.shape.min_len();
        let nan = vec![f32::NAN; len.max(1)];
        let (mut l, mut g) = (self.up(&nan).0, self.up(&nan).0);
        let (mut stats, mut ctx) = (DeviceStats::<ValueLossStats>::new(s)?, LaunchContext::new(s)?);
        let inputs = ValueLossInputs {
            shape: c.shape,
            values: v.slice(0..n),
            old_values: old.slice(0..n_old),
            returns: ret.slice(0..n_ret),
            mask: mask.as_ref().map(|(m, n)| m.slice(0..*n)),
        };
        let out = ValueLossOutputs {
            loss: Some(l.slice_mut(0..len)),
            grad_values: Some(g.slice_mut(0..len)),
            stats: Some(&mut stats),
            workspace: None,
        };
        cuda::value_loss(&mut ctx, &inputs, out, opts)?;
        ctx.check()?;
        Ok((self.dense(&l, c.shape), self.dense(&g, c.shape), stats.read(s)?))
    }

    fn aggregate(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        aggregation: Aggregation,
        norm: Normaliser,
    ) -> Result<f64> {
        let s = &self.0;
        let v = self.up(values).0;
        let m = mask.map(|m| self.up(m).0);
        let (mut out, mut ctx) = (DeviceStats::<Aggregated>::new(s)?, LaunchContext::new(s)?);
        let m = m.as_ref().map(|m| m.as_view());
        cuda::aggregate(&mut ctx, &v, shape, m.as_ref(), aggregation, norm, &mut out)?;
        ctx.check()?;
        Ok(out.read(s)?.value)
    }
}

impl FusedBackend for Gpu {
    fn fused<T: Element>(
        &self,
        c: &FusedCase<T>,
        opts: &FusedPolicyOptions,
        in_place: bool,
    ) -> Result<(Vec<T>, FusedPolicyStats)> {
        let s = &self.0;
        let mut logits = s.clone_htod(&c.logits).unwrap();
        let (targets, mask) = (s.clone_htod(&c.targets).unwrap(), s.clone_htod(&c.mask).unwrap());
        let (old, adv) = (s.clone_htod(&c.old_logp).unwrap(), s.clone_htod(&c.advantages).unwrap());
        let ref_logp = c.ref_logp.as_ref().map(|r| s.clone_htod(r).unwrap());
        let inputs = FusedPolicyInputs {
            ref_logp: ref_logp.as_ref().map(|r| r.as_view()),
            ..FusedPolicyInputs::new(Tokens::new(&targets).with_mask(&mask), c.sequences, &old, &adv)
        };
        let (mut stats, mut ctx) = (DeviceFusedStats::new(s)?, LaunchContext::new(s)?);
        let grad = if in_place {
            cuda::policy_loss_from_logits_in_place(
                &mut ctx,
                &mut logits,
                c.shape,
                &inputs,
                &mut stats,
                opts,
            )?;
            logits
        } else {
            let mut grad = s.clone_htod(&vec![T::from_f32(f32::NAN); c.logits.len()]).unwrap();
            cuda::policy_loss_from_logits(&mut ctx, &logits, c.shape, &inputs, &mut grad, &mut stats, opts)?;
            grad
        };
        ctx.check()?;
        Ok((s.clone_dtoh(&grad).unwrap(), stats.read(s)?))
    }
}
