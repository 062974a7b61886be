//! The CUDA backend of the exact divergences' shared cases: whole rows, vocabulary shards
//! (both rounds of the JSD), the statistic and the backward.

use super::Gpu;
use crate::common::kl::{ExactBackend, ExactCase, ExactOut, Shard};
use rlhf_kernels::cuda::*;
use rlhf_kernels::*;

impl ExactBackend for Gpu {
    fn forward<P: Element, Q: Element>(&self, c: &ExactCase<P, Q>) -> Result<ExactOut> {
        let s = &self.0;
        let n = c.policy_shape.rows;
        let (p, q) = (s.clone_htod(&c.policy).unwrap(), s.clone_htod(&c.reference).unwrap());
        let mask = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let mut bufs: Vec<_> = (0..4).map(|_| s.alloc_zeros::<f32>(n).unwrap()).collect();
        let mut ctx = LaunchContext::new(s)?;
        {
            let [v, pl, ql, t] = bufs.as_mut_slice() else { unreachable!() };
            let r = ReferenceRows {
                logits: q.as_view(),
                shape: c.ref_shape,
                mask: mask.as_ref().map(|m| m.as_view()),
            };
            let out = ExactKlOutputs {
                value: Some(v.as_view_mut()),
                policy_lse: Some(pl.as_view_mut()),
                ref_lse: Some(ql.as_view_mut()),
                policy_term: Some(t.as_view_mut()),
                workspace: None,
                statistic: None,
            };
            cuda::exact_kl(&mut ctx, &p, c.policy_shape, &r, out, &c.opts)?;
        }
        ctx.check()?;
        let d = |b: &rlhf_kernels::cudarc::driver::CudaSlice<f32>| s.clone_dtoh(b).unwrap();
        Ok(ExactOut {
            value: d(&bufs[0]),
            policy_lse: d(&bufs[1]),
            ref_lse: d(&bufs[2]),
            policy_term: d(&bufs[3]),
        })
    }

    fn forward_with_statistic<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        stat: ExactKlStatistic,
        with_value: bool,
    ) -> Result<(Vec<f32>, Aggregated)> {
        let s = &self.0;
        let n = c.policy_shape.rows;
        let (p, q) = (s.clone_htod(&c.policy).unwrap(), s.clone_htod(&c.reference).unwrap());
        let mask = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let mut v = s.alloc_zeros::<f32>(n).unwrap();
        let (mut agg, mut ctx) = (DeviceStats::<Aggregated>::new(s)?, LaunchContext::new(s)?);
        {
            let r = ReferenceRows {
                logits: q.as_view(),
                shape: c.ref_shape,
                mask: mask.as_ref().map(|m| m.as_view()),
            };
            let out = ExactKlOutputs {
                value: with_value.then(|| v.as_view_mut()),
                statistic: Some((&mut agg, stat)),
                ..Default::default()
            };
            cuda::exact_kl(&mut ctx, &p, c.policy_shape, &r, out, &c.opts)?;
        }
        ctx.check()?;
        let value = if with_value { s.clone_dtoh(&v).unwrap() } else { Vec::new() };
        Ok((value, agg.read(s)?))
    }

    fn forward_sharded<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        shards: &[Shard<P, Q>],
    ) -> Result<ExactOut> {
        let s = &self.0;
        let rows = c.policy_shape.rows;
        let mask = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let mask_view = || mask.as_ref().map(|m| m.as_view());
        let up = |s_: &Shard<P, Q>| (s.clone_htod(&s_.policy).unwrap(), s.clone_htod(&s_.reference).unwrap());
        let mut ctx = LaunchContext::new(s)?;
        // Round 1 on each "rank", gathered as [shards][rows].
        let mut gathered = s.alloc_zeros::<ExactKlPartial>(shards.len() * rows).unwrap();
        for (k, sh) in shards.iter().enumerate() {
            let (p, q) = up(sh);
            let r = ReferenceRows { logits: q.as_view(), shape: sh.shape, mask: mask_view() };
            let mut mine = gathered.slice_mut(k * rows..(k + 1) * rows);
            cuda::exact_kl_shard_partials(&mut ctx, &p, sh.shape, &r, &mut mine, &c.opts)?;
        }
        let jsd = matches!(c.opts.divergence, ExactDivergence::Jsd { .. });
        let mut bufs: Vec<_> = (0..3).map(|_| s.clone_htod(&vec![f32::NAN; rows]).unwrap()).collect();
        {
            let [v, pl, ql] = bufs.as_mut_slice() else { unreachable!() };
            let out = ExactKlOutputs {
                value: (!jsd).then(|| v.as_view_mut()),
                policy_lse: Some(pl.as_view_mut()),
                ref_lse: Some(ql.as_view_mut()),
                ..Default::default()
            };
            cuda::finish_exact_kl_partials(&mut ctx, &gathered, mask_view().as_ref(), out, &c.opts)?;
        }
        ctx.check()?;
        if jsd {
            // Round 2: each rank's sums given the merged normalisers, gathered and finished.
            let mut sums = s.alloc_zeros::<f32>(2 * shards.len() * rows).unwrap();
            for (k, sh) in shards.iter().enumerate() {
                let (p, q) = up(sh);
                let r = ReferenceRows { logits: q.as_view(), shape: sh.shape, mask: mask_view() };
                let mut mine = sums.slice_mut(2 * k * rows..2 * (k + 1) * rows);
                let (pl, ql) = (bufs[1].as_view(), bufs[2].as_view());
                cuda::jsd_shard_sums(&mut ctx, &p, sh.shape, &r, &pl, &ql, &mut mine, &c.opts)?;
            }
            let [v, pl, ql] = bufs.as_mut_slice() else { unreachable!() };
            let (pl, ql) = (pl.as_view(), ql.as_view());
            let m = mask_view();
            let out = ExactKlOutputs::default().value(v.as_view_mut());
            cuda::finish_jsd_sums(&mut ctx, &sums.as_view(), m.as_ref(), [&pl, &ql], out, &c.opts)?;
        }
        let d = |b: &rlhf_kernels::cudarc::driver::CudaSlice<f32>| s.clone_dtoh(b).unwrap();
        Ok(ExactOut {
            value: d(&bufs[0]),
            policy_lse: d(&bufs[1]),
            ref_lse: d(&bufs[2]),
            policy_term: vec![0.0; rows],
        })
    }

    fn backward<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        f: &ExactOut,
        g: &[f32],
        in_place: bool,
    ) -> Result<Vec<P>> {
        let s = &self.0;
        let (mut p, q) = (s.clone_htod(&c.policy).unwrap(), s.clone_htod(&c.reference).unwrap());
        let mask = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let up = |v: &[f32]| s.clone_htod(v).unwrap();
        let (gd, pl, ql, v, t) = (up(g), up(&f.policy_lse), up(&f.ref_lse), up(&f.value), up(&f.policy_term));
        let grads = ExactKlGrads {
            grad: gd.as_view(),
            policy_lse: pl.as_view(),
            ref_lse: ql.as_view(),
            value: Some(v.as_view()),
            policy_term: Some(t.as_view()),
        };
        let r = ReferenceRows {
            logits: q.as_view(),
            shape: c.ref_shape,
            mask: mask.as_ref().map(|m| m.as_view()),
        };
        let mut ctx = LaunchContext::new(s)?;
        if in_place {
            cuda::exact_kl_backward_in_place(&mut ctx, &mut p, c.policy_shape, &r, &grads, &c.opts)?;
            ctx.check()?;
            Ok(s.clone_dtoh(&p).unwrap())
        } else {
            let mut dx = s.clone_htod(&vec![P::from_f32(f32::NAN); c.policy.len()]).unwrap();
            cuda::exact_kl_backward(&mut ctx, &p, c.policy_shape, &r, &grads, &mut dx, &c.opts)?;
            ctx.check()?;
            Ok(s.clone_dtoh(&dx).unwrap())
        }
    }
}
