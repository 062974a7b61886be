//! GAE, the group advantages and DAPO's overlong shaping on candle tensors (constants: no
//! autograd).

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, bail};

use super::storage::{cpu_side, flat, guard, per_row, tensor};
use super::to_candle;
use crate::cpu::{self};
use crate::{
    GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, OverlongInputs, OverlongOptions, RowShape,
};
use crate::{GaeOutputs, GroupAdvantageOutputs};

/// The inputs of [`gae`]: `[B, T]` tensors (f32; the mask `u8`) and per-sequence scores
/// (`[B]`, f32). At least one of `rewards`, `kl_penalty` and `scores` gives the reward.
#[derive(Debug, Clone, Copy, Default)]
pub struct GaeTensors<'a> {
    /// Dense per-token rewards `[B, T]`.
    pub rewards: Option<&'a Tensor>,
    /// Per-token KL estimates `[B, T]` and β: each valid token's reward gets `−β·kl_t`.
    pub kl_penalty: Option<(&'a Tensor, f32)>,
    /// One score per sequence `[B]`, added to its last valid token.
    pub scores: Option<&'a Tensor>,
    /// Value estimates `V(s_t)` `[B, T]`; `None`: discounted returns (`V = 0`).
    pub values: Option<&'a Tensor>,
    /// Response mask `[B, T]` (`u8`, 0 = padding).
    pub mask: Option<&'a Tensor>,
}

/// [`gae`]'s outputs, `[B, T]` f32, 0 at masked tokens.
#[derive(Debug, Clone)]
pub struct GaeAdvantages {
    /// `A_t = Σ_l (γλ)^l·δ_{t+l}`, `δ_t = r_t + γ·V_{t+1} − V_t`.
    pub advantages: Tensor,
    /// `R_t = A_t + V_t`, the value head's target.
    pub returns: Tensor,
}

/// Generalised advantage estimation over a `[B, T]` batch, on the tensors' device (the GPU
/// path is the parallel scan of this crate's `cuda::gae`), accumulated in f64 on the CPU. See
/// [`GaeOptions`] for γ, λ and how masked positions inside a response are treated.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rlhf_kernels::GaeOptions;
/// use rlhf_kernels::candle::{GaeTensors, gae};
/// let rewards = Tensor::new(&[[0.0f32, 0.0, 1.0]], &Device::Cpu)?;
/// let inputs = GaeTensors { rewards: Some(&rewards), ..Default::default() };
/// let out = gae(&inputs, &GaeOptions::new(1.0, 1.0))?;
/// assert_eq!(out.returns.to_vec2::<f32>()?, vec![vec![1.0, 1.0, 1.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gae(inputs: &GaeTensors<'_>, opts: &GaeOptions) -> Result<GaeAdvantages> {
    let GaeTensors { rewards, kl_penalty, scores, values, mask } = *inputs;
    let Some(like) = [rewards, kl_penalty.map(|k| k.0), values, mask].into_iter().flatten().next() else {
        bail!("gae: needs a [B, T] input (rewards, kl_penalty, values or mask) for the batch's shape")
    };
    let dims = like.dims().to_vec();
    if dims.len() != 2 {
        bail!("gae: the per-token inputs are {dims:?}, expected [B, T]")
    }
    let f32s = |t: Option<&Tensor>, what| t.map(|t| per_row(t, &dims, like, &[DType::F32], what)).transpose();
    let tensors = [
        f32s(rewards, "rewards")?,
        f32s(kl_penalty.map(|k| k.0), "kl")?,
        f32s(values, "values")?,
        mask.map(|m| per_row(m, &dims, like, &[DType::U8], "mask")).transpose()?,
        scores.map(|s| per_row(s, &dims[..1], like, &[DType::F32], "scores")).transpose()?,
    ];
    let beta = kl_penalty.map(|k| k.1);
    let shape = RowShape::new(dims[0], dims[1]);
    let guards: Vec<_> = tensors.iter().map(|t| guard(t.as_ref())).collect();
    let (advantages, returns) = match like.device() {
        Device::Cpu => {
            let n = shape.len();
            let [r, k, v, m, s] = [0, 1, 2, 3, 4].map(|i| &guards[i]);
            let mut gae_inputs = GaeInputs::new(shape);
            gae_inputs.rewards = cpu_side::<f32>(r, n, "rewards")?;
            gae_inputs.kl_penalty = cpu_side::<f32>(k, n, "kl")?.zip(beta);
            gae_inputs.values = cpu_side::<f32>(v, n, "values")?;
            gae_inputs.mask = cpu_side::<u8>(m, n, "mask")?;
            gae_inputs.scores = cpu_side::<f32>(s, shape.rows, "scores")?;
            let (mut adv, mut ret) = (vec![0f32; n], vec![0f32; n]);
            let out = GaeOutputs::default().advantages(&mut adv).returns(&mut ret);
            cpu::gae(&gae_inputs, out, opts).map_err(to_candle)?;
            let wrap = |x| tensor(Storage::Cpu(CpuStorage::F32(x)), (shape.rows, shape.cols));
            (wrap(adv), wrap(ret))
        }
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(_) => gpu::gae(&guards, beta, shape, opts)?,
        other => bail!("gae: unsupported device {:?}", other.location()),
    };
    Ok(GaeAdvantages { advantages, returns })
}

/// [`group_advantages`]'s outputs.
#[derive(Debug, Clone)]
pub struct GroupAdvantages {
    /// One advantage per sequence, `[B]` f32.
    pub per_sequence: Tensor,
    /// With a response mask: the advantage on every valid token, `[B, T]` f32, 0 at padding.
    pub per_token: Option<Tensor>,
}

/// Outcome advantages over groups of responses to the same prompt: GRPO (`(s − mean)/std`,
/// biased or unbiased std, or none: Dr. GRPO), RLOO (leave-one-out mean) or the group mean, as
/// `opts` says (formulas: [`GroupEstimator`](crate::GroupEstimator)), from one score per
/// sequence (`[B]`, f32); group sums in f64. With `response_mask` (`[B, T]`, `u8`) the
/// advantages are also broadcast to every valid token.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rlhf_kernels::{GroupAdvantageOptions, Groups};
/// let scores = Tensor::new(&[1.0f32, 0.0, 3.0, 1.0], &Device::Cpu)?;
/// let groups = Groups::new(&[0, 0, 1, 1], 2)?;
/// let out = rlhf_kernels::candle::group_advantages(&scores, &groups, None, &GroupAdvantageOptions::grpo())?;
/// let a = out.per_sequence.to_vec1::<f32>()?;
/// assert!((a[0] + a[1]).abs() < 1e-6 && a[0] > 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn group_advantages(
    scores: &Tensor,
    groups: &Groups,
    response_mask: Option<&Tensor>,
    opts: &GroupAdvantageOptions,
) -> Result<GroupAdvantages> {
    let b = groups.sequences();
    let scores = per_row(scores, &[b], scores, &[DType::F32], "scores")?;
    let mask = match response_mask {
        Some(m) if m.rank() == 2 && m.dims()[0] == b => {
            Some(per_row(m, m.dims(), &scores, &[DType::U8], "mask")?)
        }
        Some(m) => bail!("response mask: shape {:?}, expected [{b}, T]", m.dims()),
        None => None,
    };
    let shape = mask.as_ref().map(|m| RowShape::new(b, m.dims()[1]));
    let (sg, sl) = scores.storage_and_layout();
    let mask_guard = guard(mask.as_ref());
    let (per_sequence, per_token) = match &*sg {
        Storage::Cpu(s) => {
            let scores = flat::<f32>(s, sl, b, "scores")?;
            let mask = match shape {
                Some(shape) => cpu_side::<u8>(&mask_guard, shape.len(), "mask")?,
                None => None,
            };
            let mut seq = vec![0f32; b];
            let mut tok = vec![0f32; shape.map_or(0, |s| s.len())];
            let mut out = GroupAdvantageOutputs::default().per_sequence(&mut seq);
            if let Some(shape) = shape {
                out = out.per_token(&mut tok, shape, mask);
            }
            cpu::group_advantages(scores, groups, out, opts).map_err(to_candle)?;
            let per_token = shape.map(|s| tensor(Storage::Cpu(CpuStorage::F32(tok)), (s.rows, s.cols)));
            (tensor(Storage::Cpu(CpuStorage::F32(seq)), b), per_token)
        }
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(s) => gpu::group_advantages((s, sl), groups, mask_guard.as_ref().zip(shape), opts)?,
        _ => bail!("group_advantages: unsupported device"),
    };
    Ok(GroupAdvantages { per_sequence, per_token })
}

/// DAPO's overlong shaping ([`OverlongOptions`]): each score (`[B]`, f32) plus the length
/// penalty of its response, the valid tokens of its row of `response_mask` (`[B, T]`, `u8`).
/// Returns the shaped `[B]` scores.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rlhf_kernels::OverlongOptions;
/// let scores = Tensor::new(&[1.0f32, 1.0], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u8, 1, 0, 0], [1, 1, 1, 1]], &Device::Cpu)?;
/// let shaped = rlhf_kernels::candle::overlong_shaping(&scores, &mask, &OverlongOptions::new(4, 2))?;
/// assert_eq!(shaped.to_vec1::<f32>()?, [1.0, 0.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn overlong_shaping(scores: &Tensor, response_mask: &Tensor, opts: &OverlongOptions) -> Result<Tensor> {
    let dims = response_mask.dims().to_vec();
    if dims.len() != 2 {
        bail!("response mask: shape {dims:?}, expected [B, T]")
    }
    let scores = per_row(scores, &dims[..1], scores, &[DType::F32], "scores")?;
    let mask = per_row(response_mask, &dims, &scores, &[DType::U8], "mask")?;
    let shape = RowShape::new(dims[0], dims[1]);
    let (sg, sl) = scores.storage_and_layout();
    let mask_guard = guard(Some(&mask));
    match &*sg {
        Storage::Cpu(s) => {
            let scores = flat::<f32>(s, sl, shape.rows, "scores")?;
            let mask = cpu_side::<u8>(&mask_guard, shape.len(), "mask")?;
            let mut shaped = vec![0f32; shape.rows];
            let inputs = OverlongInputs { mask, ..OverlongInputs::new(shape, scores) };
            cpu::overlong_shaping(&inputs, &mut shaped, opts).map_err(to_candle)?;
            Ok(tensor(Storage::Cpu(CpuStorage::F32(shaped)), shape.rows))
        }
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(s) => gpu::overlong_shaping((s, sl), &mask_guard, shape, opts),
        _ => bail!("overlong_shaping: unsupported device"),
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Storage, Tensor, bail};

    use super::super::storage::{check, cuda_side, flat_view, stream_of, tensor};
    use super::super::to_candle;
    use crate::cuda::{self, DeviceGroups};
    use crate::{
        GaeInputs, GaeOptions, GaeOutputs, GroupAdvantageOptions, GroupAdvantageOutputs, Groups,
        OverlongInputs, OverlongOptions, RowShape, TokenOutput,
    };

    pub(super) fn overlong_shaping(
        (scores, sl): (&CudaStorage, &Layout),
        mask: &super::super::storage::Guard<'_>,
        shape: RowShape,
        opts: &OverlongOptions,
    ) -> Result<Tensor> {
        let (_, mut ctx) = stream_of(scores)?;
        let Some((m, ml)) = cuda_side(mask, "mask")? else { bail!("overlong_shaping: missing mask") };
        let dev = &scores.device;
        let mut shaped = dev.alloc_zeros::<f32>(shape.rows)?;
        let inputs = OverlongInputs {
            mask: Some(flat_view::<u8>(m, ml, shape.len(), "mask")?),
            ..OverlongInputs::new(shape, flat_view::<f32>(scores, sl, shape.rows, "scores")?)
        };
        cuda::overlong_shaping(&mut ctx, &inputs, &mut shaped, opts).map_err(to_candle)?;
        check(ctx)?;
        Ok(tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(shaped, dev.clone())), shape.rows))
    }

    /// `guards`: rewards, kl, values, mask, scores.
    pub(super) fn gae(
        guards: &[super::super::storage::Guard<'_>],
        beta: Option<f32>,
        shape: RowShape,
        opts: &GaeOptions,
    ) -> Result<(Tensor, Tensor)> {
        let n = shape.len();
        let names = ["rewards", "kl", "values", "mask", "scores"];
        let mut storages = Vec::with_capacity(guards.len());
        for (guard, what) in guards.iter().zip(names) {
            storages.push(cuda_side(guard, what)?);
        }
        let Some(&(first, _)) = storages.iter().flatten().next() else { bail!("gae: no input") };
        let (_, mut ctx) = stream_of(first)?;
        let view = |i: usize, len: usize| {
            storages[i].map(|(s, l)| flat_view::<f32>(s, l, len, names[i])).transpose()
        };
        let inputs = GaeInputs {
            shape,
            rewards: view(0, n)?,
            kl_penalty: view(1, n)?.zip(beta),
            scores: view(4, shape.rows)?,
            values: view(2, n)?,
            mask: storages[3].map(|(s, l)| flat_view::<u8>(s, l, n, "mask")).transpose()?,
        };
        let dev = &first.device;
        let (mut adv, mut ret) = (dev.alloc_zeros::<f32>(n)?, dev.alloc_zeros::<f32>(n)?);
        let out = GaeOutputs {
            advantages: Some(adv.slice_mut(..)),
            returns: Some(ret.slice_mut(..)),
            workspace: None,
        };
        cuda::gae(&mut ctx, &inputs, out, opts).map_err(to_candle)?;
        check(ctx)?;
        let wrap =
            |x| tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone())), (shape.rows, shape.cols));
        Ok((wrap(adv), wrap(ret)))
    }

    pub(super) fn group_advantages(
        (scores, sl): (&CudaStorage, &Layout),
        groups: &Groups,
        mask: Option<(&(candle_core::StorageRef<'_>, &Layout), RowShape)>,
        opts: &GroupAdvantageOptions,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = groups.sequences();
        let (stream, mut ctx) = stream_of(scores)?;
        let device_groups = DeviceGroups::new(&stream, groups).map_err(to_candle)?;
        let dev = &scores.device;
        let mut seq = dev.alloc_zeros::<f32>(b)?;
        // Only with a mask: a zero-length device allocation is an error.
        let mut tok = mask.map(|(_, s)| dev.alloc_zeros::<f32>(s.len())).transpose()?;
        let mut out = GroupAdvantageOutputs { per_sequence: Some(seq.slice_mut(..)), per_token: None };
        if let (Some(((guard, layout), shape)), Some(tok)) = (mask, tok.as_mut()) {
            let Storage::Cuda(m) = &**guard else { bail!("mask: on another device than the scores") };
            out.per_token = Some(TokenOutput {
                out: tok.slice_mut(..),
                shape,
                mask: Some(flat_view::<u8>(m, layout, shape.len(), "mask")?),
            });
        }
        let scores = flat_view::<f32>(scores, sl, b, "scores")?;
        cuda::group_advantages(&mut ctx, &scores, &device_groups, out, opts).map_err(to_candle)?;
        check(ctx)?;
        let per_token = mask.zip(tok).map(|((_, s), tok)| {
            tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(tok, dev.clone())), (s.rows, s.cols))
        });
        Ok((tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(seq, dev.clone())), b), per_token))
    }
}
