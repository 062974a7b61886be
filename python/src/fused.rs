//! The fused path from logits: the policy loss (with the entropy bonus and an optional sampled
//! KL term) and its gradient with respect to the logits, from `[B, T, V]` logits in two passes,
//! without an `[N, V]` temporary.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rlhf_kernels::cuda::raw;
use rlhf_kernels::{DType, FusedPolicyInputs, FusedPolicyOptions, RowShape, SampledKlOptions, Tokens, cpu};

use crate::batch::{batch_dims, parse_aggregation, parse_normaliser, policy_options};
use crate::cuda;
use crate::dl::{Dl, Kind, Place, check_together, err};
use crate::losses::parse_estimator;
use crate::{bytemuck_cast, bytemuck_cast_mut, float_type, index_type};

/// f64 words of the fused path's statistics: the policy loss's, then the KL term's (zeros
/// without one).
pub const FUSED_STATS_WORDS: usize = raw::POLICY_STATS_WORDS + raw::SAMPLED_KL_STATS_WORDS;

/// Bytes of device workspace the fused path uses for `rows` logits rows of `vocab` columns in
/// `dtype` (`"float32"`, `"bfloat16"` or `"float16"`) over a `[B, T]` batch.
#[pyfunction]
pub fn fused_workspace_bytes(
    rows: usize,
    vocab: usize,
    dtype: &str,
    sequences: (usize, usize),
) -> PyResult<usize> {
    let dtype = match dtype {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype: {other:?}, expected \"float32\", \"bfloat16\" or \"float16\""
            )));
        }
    };
    let (shape, seqs) = (RowShape::new(rows, vocab), RowShape::new(sequences.0, sequences.1));
    shape.validate("logits").and(seqs.validate("sequences")).map_err(err)?;
    if seqs.len() != rows {
        return Err(PyValueError::new_err(format!("sequences: {sequences:?} for {rows} logits rows")));
    }
    Ok(raw::fused_workspace_bytes(shape, dtype, seqs))
}

/// The policy loss straight from the policy logits (`[B, T, V]` float32 / bfloat16 / float16,
/// one block of evenly spaced rows: contiguous, or rows padded to a stride), with `targets`,
/// `old_logp`, `advantages` (and the optional byte `mask`, float32 `ref_logp`) `[B, T]`: the
/// gradient of the total loss w.r.t. the logits into `grad_logits` (the logits' dtype and
/// layout) and the statistics into `stats` (float64, [`FUSED_STATS_WORDS`]: the policy loss's,
/// then the KL term's, written only with a KL term). With `ref_logp` a sampled KL loss term (`kl_estimator`, `kl_coef`,
/// aggregated as the policy loss; with `kl_bias_correction` weighted by `π/π_old` from
/// `old_logp`) joins the loss. On the GPU `workspace` (uint8, at least
/// `fused_workspace_bytes`, 1-D contiguous, 16-byte aligned) holds the temporaries; without it
/// they are allocated per call.
#[pyfunction]
#[pyo3(signature = (logits, targets, old_logp, advantages, grad_logits, stats, *, mask=None, ref_logp=None, workspace=None, temperature=1.0, objective="clip", beta=0.0, tau_pos=1.0, tau_neg=1.05, clip_low=0.2, clip_high=0.2, dual_clip=None, log_ratio_clamp=20.0, entropy_coef=0.0, aggregation="token_mean", max_len=0, global_counts=None, kl_estimator="grad_policy_ref", kl_coef=1.0, kl_log_ratio_clamp=Some(20.0), kl_value_clamp=Some(10.0), kl_bias_correction=false, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_from_logits(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    advantages: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    ref_logp: Option<&Bound<'_, PyAny>>,
    workspace: Option<&Bound<'_, PyAny>>,
    temperature: f32,
    objective: &str,
    beta: f32,
    tau_pos: f32,
    tau_neg: f32,
    clip_low: f32,
    clip_high: f32,
    dual_clip: Option<f32>,
    log_ratio_clamp: Option<f32>,
    entropy_coef: f32,
    aggregation: &str,
    max_len: usize,
    global_counts: Option<(f64, f64, f64)>,
    kl_estimator: &str,
    kl_coef: f32,
    kl_log_ratio_clamp: Option<f32>,
    kl_value_clamp: Option<f32>,
    kl_bias_correction: bool,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let (aggregation, normaliser) =
        (parse_aggregation(aggregation, max_len)?, parse_normaliser(global_counts));
    let loss = policy_options(
        objective,
        beta,
        [tau_pos, tau_neg],
        [clip_low, clip_high],
        dual_clip,
        log_ratio_clamp,
        entropy_coef,
        aggregation,
        normaliser,
    )?;
    let mut opts = FusedPolicyOptions::new(loss).temperature(temperature);
    let logits = Dl::import(logits, stream, "logits")?;
    let rows = logits.rows()?;
    if rows.offsets.len() != 1 {
        return Err(PyValueError::new_err(
            "logits: the fused path reads one block of evenly spaced rows ([B, T, V] contiguous, or rows \
             padded to a stride); pass .contiguous()",
        ));
    }
    let dtype = logits.kind.float("logits")?;
    let targets = Dl::import(targets, stream, "targets")?;
    let dims = batch_dims(&targets)?;
    targets.per_row(&dims)?.expect(&[Kind::I64, Kind::I32, Kind::U32])?;
    let seqs = RowShape::new(dims[0], dims[1]);
    if rows.shape.rows != seqs.len() {
        return Err(PyValueError::new_err(format!(
            "logits: {} rows for a [B, T] = {dims:?} batch of targets",
            rows.shape.rows
        )));
    }
    let import = |o: Option<&Bound<'_, PyAny>>, what, kind| -> PyResult<Option<Dl>> {
        let t = Dl::maybe(o, stream, what)?;
        if let Some(t) = &t {
            t.per_row(&dims)?.expect(&[kind])?;
        }
        Ok(t)
    };
    let old = Dl::import(old_logp, stream, "old_logp")?;
    old.per_row(&dims)?.expect(&[Kind::F32])?;
    let adv = Dl::import(advantages, stream, "advantages")?;
    adv.per_row(&dims)?.expect(&[Kind::F32])?;
    let (mask, ref_logp) = (import(mask, "mask", Kind::Byte)?, import(ref_logp, "ref_logp", Kind::F32)?);
    let kl = SampledKlOptions::new(parse_estimator(kl_estimator)?)
        .coef(kl_coef)
        .log_ratio_clamp(kl_log_ratio_clamp)
        .value_clamp(kl_value_clamp)
        .aggregation(aggregation)
        .normaliser(normaliser)
        .bias_correction(kl_bias_correction);
    if kl_bias_correction && ref_logp.is_none() {
        return Err(PyValueError::new_err("kl_bias_correction: weights the KL term, which needs ref_logp"));
    }
    if ref_logp.is_some() {
        opts = opts.kl(kl);
    }
    let grad = Dl::import(grad_logits, stream, "grad_logits")?;
    if grad.kind != logits.kind || grad.rows()? != rows {
        return Err(PyValueError::new_err(
            "grad_logits: must have the logits' dtype, shape and strides (torch.empty_strided(logits.size(), logits.stride()))",
        ));
    }
    grad.output()?;
    let stats = Dl::import(stats, stream, "stats")?;
    stats.per_row(&[FUSED_STATS_WORDS])?.expect(&[Kind::F64])?;
    let workspace = Dl::maybe(workspace, stream, "workspace")?;
    if let Some(w) = &workspace {
        if w.dims.len() != 1 {
            return Err(PyValueError::new_err(format!("workspace: shape {:?}, expected 1-D", w.dims)));
        }
        w.per_row(&w.dims.clone())?.expect(&[Kind::Byte])?.output()?;
    }
    let place = check_together(
        &[Some(&logits), Some(&targets), Some(&old), Some(&adv), mask.as_ref(), ref_logp.as_ref()],
        &[Some(&grad), Some(&stats), workspace.as_ref()],
    )?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no input
            // (`check_together`) and nothing else runs on this memory during the call.
            let (l, t, m) = unsafe { (logits.bytes(), targets.bytes(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above.
            let (o, a, r) = unsafe {
                (old.elems::<f32>(), adv.elems::<f32>(), ref_logp.as_ref().map(|r| r.elems::<f32>()))
            };
            // SAFETY: as above; the two mutable slices are different tensors.
            let (g, words) = unsafe { (grad.bytes_mut(), stats.elems_mut::<f64>()) };
            let kind = targets.kind;
            let range = rows.block_range(0);
            let s = py
                .detach(move || {
                    float_type!(dtype, T => index_type!(kind, I => {
                        let (l, g): (&[T], &mut [T]) = (bytemuck_cast(l), bytemuck_cast_mut(g));
                        let tokens = Tokens { targets: bytemuck_cast::<I>(t), mask: m };
                        let inputs = FusedPolicyInputs { ref_logp: r, ..FusedPolicyInputs::new(tokens, seqs, o, a) };
                        cpu::policy_loss_from_logits(&l[range.clone()], rows.shape, &inputs, &mut g[range], &opts)
                    }))
                })
                .map_err(err)?;
            let (policy, kl) = words.split_at_mut(raw::POLICY_STATS_WORDS);
            policy.copy_from_slice(&raw::policy_stats_to_words(&s.policy));
            if let Some(k) = s.kl {
                kl.copy_from_slice(&raw::sampled_kl_stats_to_words(&k));
            }
            Ok(())
        }
        Place::Cuda(ordinal) => cuda::policy_loss_from_logits(
            ordinal,
            stream,
            status,
            [&logits, &grad],
            rows.shape,
            seqs,
            [&targets, &old, &adv],
            [mask.as_ref(), ref_logp.as_ref(), workspace.as_ref()],
            &stats,
            &opts,
        ),
    }
}
