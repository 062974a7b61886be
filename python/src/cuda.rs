//! The GPU paths: device addresses of the imported tensors to the crate's raw layer, enqueued
//! on the caller's stream. Nothing here waits for the GPU.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rlhf_kernels::cuda::raw::{
    self, ExactKlArgs, ExactKlBackwardArgs, FusedPolicyArgs, GaeArgs, GroupAdvantageArgs, KlRewardsArgs,
    OverlongArgs, PairArgs, PolicyLossArgs, RawStream, ReductionArgs, SampledKlArgs, TokenLogprobsArgs,
    TokenLogprobsBackwardArgs, ValueLossArgs,
};
use rlhf_kernels::cudarc::driver::sys::CUstream;
use rlhf_kernels::{
    Aggregation, ExactKlOptions, FusedPolicyOptions, GaeOptions, GroupAdvantageOptions, Groups, IndexType,
    KlRewardsOptions, Normaliser, OverlongOptions, PolicyLossOptions, RowBlocks, RowShape, SampledKlOptions,
    TokenLogprobsOptions, ValueLossOptions, WhitenOptions,
};

use crate::dl::{Dl, Kind, Pair, err};

pub fn available() -> bool {
    rlhf_kernels::cuda::kernels_built()
}

/// Raises the problem a status word reports (its int64 value; -1 is clear).
#[pyfunction]
pub fn check_status(word: i64) -> PyResult<()> {
    raw::decode_status(word as u64).map_err(err)
}

/// The caller's stream and the address of its status word (one writable int64 on the same
/// device, overlapping none of the op's `tensors`).
fn launch_context(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    tensors: &[Option<&Dl>],
) -> PyResult<(RawStream, Dl)> {
    let Some(status) = status else {
        return Err(PyValueError::new_err(
            "status: a one-element int64 tensor filled with -1 is required on the GPU",
        ));
    };
    let status = Dl::import(status, stream, "status")?;
    status.per_row(&[1])?.expect(&[Kind::I64])?.output()?;
    crate::dl::check_together(tensors, &[Some(&status)])?;
    Ok((RawStream { ordinal, stream: stream as CUstream }, status))
}

fn index_type(kind: Kind) -> IndexType {
    match kind {
        Kind::I32 => IndexType::I32,
        Kind::U32 => IndexType::U32,
        _ => IndexType::I64,
    }
}

/// The address of an optional per-row tensor's row `row` (0 when absent).
fn row_ptr(t: Option<&Dl>, row: usize) -> u64 {
    t.map_or(0, |t| t.at(row))
}

/// Row block `k` of both logits tensors of `pair`, with its slice of the row mask.
fn pair_block(pair: &Pair, k: usize, mask: Option<&Dl>) -> PyResult<PairArgs> {
    let (p_rows, q_rows) = (&pair.p_rows, &pair.q_rows);
    Ok(PairArgs {
        policy: pair.policy.at(p_rows.offsets[k]),
        policy_dtype: pair.policy.kind.float("policy")?,
        policy_shape: p_rows.shape,
        reference: pair.reference.at(q_rows.offsets[k]),
        ref_dtype: pair.reference.kind.float("reference")?,
        ref_shape: q_rows.shape,
        mask: row_ptr(mask, p_rows.block_rows(k).start),
    })
}

#[allow(clippy::too_many_arguments)]
pub fn token_logprobs(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    logits: &Dl,
    rows: &RowBlocks,
    targets: &Dl,
    mask: Option<&Dl>,
    outs: &[Option<Dl>],
    opts: &TokenLogprobsOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[Some(logits), Some(targets), mask, outs[0].as_ref(), outs[1].as_ref(), outs[2].as_ref()],
    )?;
    let dtype = logits.kind.float("logits")?;
    for k in 0..rows.offsets.len() {
        let first = rows.block_rows(k).start;
        let args = TokenLogprobsArgs {
            logits: logits.at(rows.offsets[k]),
            dtype,
            shape: rows.shape,
            targets: targets.at(first),
            index_type: index_type(targets.kind),
            mask: row_ptr(mask, first),
            logp: row_ptr(outs[0].as_ref(), first),
            entropy: row_ptr(outs[1].as_ref(), first),
            lse: row_ptr(outs[2].as_ref(), first),
            workspace: 0,
            status: status.ptr,
        };
        // SAFETY: every address is inside a tensor imported above (kept alive until return,
        // and by the caller's framework until the stream ran), on `ordinal`, with the dtype
        // and the per-row length checked; the outputs overlap nothing else (check_together).
        unsafe { raw::token_logprobs(raw_stream, &args, opts) }.map_err(err)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    logits: &Dl,
    grad: &Dl,
    rows: &RowBlocks,
    targets: &Dl,
    mask: Option<&Dl>,
    saved: &[Option<Dl>],
    opts: &TokenLogprobsOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[
            Some(logits),
            Some(grad),
            Some(targets),
            mask,
            saved[0].as_ref(),
            saved[1].as_ref(),
            saved[2].as_ref(),
            saved[3].as_ref(),
        ],
    )?;
    let dtype = logits.kind.float("logits")?;
    for k in 0..rows.offsets.len() {
        let first = rows.block_rows(k).start;
        let args = TokenLogprobsBackwardArgs {
            logits: logits.at(rows.offsets[k]),
            dtype,
            shape: rows.shape,
            targets: targets.at(first),
            index_type: index_type(targets.kind),
            mask: row_ptr(mask, first),
            lse: row_ptr(saved[0].as_ref(), first),
            entropy: row_ptr(saved[1].as_ref(), first),
            grad_logp: row_ptr(saved[2].as_ref(), first),
            grad_entropy: row_ptr(saved[3].as_ref(), first),
            grad_logits: grad.at(rows.offsets[k]),
            status: status.ptr,
        };
        // SAFETY: as in `token_logprobs`; `grad` has the logits' layout (checked) and is either
        // the logits themselves or overlaps nothing.
        unsafe { raw::token_logprobs_backward(raw_stream, &args, opts) }.map_err(err)?;
    }
    Ok(())
}

pub fn exact_kl(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    pair: &Pair,
    mask: Option<&Dl>,
    outs: &[Option<Dl>],
    opts: &ExactKlOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[
            Some(&pair.policy),
            Some(&pair.reference),
            mask,
            outs[0].as_ref(),
            outs[1].as_ref(),
            outs[2].as_ref(),
            outs[3].as_ref(),
        ],
    )?;
    let p_rows = &pair.p_rows;
    for k in 0..p_rows.offsets.len() {
        let first = p_rows.block_rows(k).start;
        let args = ExactKlArgs {
            pair: pair_block(pair, k, mask)?,
            value: row_ptr(outs[0].as_ref(), first),
            policy_lse: row_ptr(outs[1].as_ref(), first),
            ref_lse: row_ptr(outs[2].as_ref(), first),
            policy_term: row_ptr(outs[3].as_ref(), first),
            workspace: 0,
            status: status.ptr,
        };
        // SAFETY: as in `token_logprobs`.
        unsafe { raw::exact_kl(raw_stream, &args, opts) }.map_err(err)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn exact_kl_backward(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    pair: &Pair,
    mask: Option<&Dl>,
    saved: &[Option<Dl>],
    out: &Dl,
    opts: &ExactKlOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[
            Some(&pair.policy),
            Some(&pair.reference),
            mask,
            Some(out),
            saved[0].as_ref(),
            saved[1].as_ref(),
            saved[2].as_ref(),
            saved[3].as_ref(),
            saved[4].as_ref(),
        ],
    )?;
    let p_rows = &pair.p_rows;
    for k in 0..p_rows.offsets.len() {
        let first = p_rows.block_rows(k).start;
        let args = ExactKlBackwardArgs {
            pair: pair_block(pair, k, mask)?,
            grad: row_ptr(saved[0].as_ref(), first),
            policy_lse: row_ptr(saved[1].as_ref(), first),
            ref_lse: row_ptr(saved[2].as_ref(), first),
            value: row_ptr(saved[3].as_ref(), first),
            policy_term: row_ptr(saved[4].as_ref(), first),
            grad_policy: out.at(p_rows.offsets[k]),
            status: status.ptr,
        };
        // SAFETY: as in `token_logprobs`; `out` has the policy's layout (checked) and overlaps
        // nothing.
        unsafe { raw::exact_kl_backward(raw_stream, &args, opts) }.map_err(err)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    [logp, old, adv]: [&Dl; 3],
    [mask, entropy]: [Option<&Dl>; 2],
    [grad_logp, grad_entropy]: [Option<&Dl>; 2],
    stats: &Dl,
    opts: &PolicyLossOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[Some(logp), Some(old), Some(adv), mask, entropy, grad_logp, grad_entropy, Some(stats)],
    )?;
    let args = PolicyLossArgs {
        shape,
        logp: logp.ptr,
        old_logp: old.ptr,
        advantages: adv.ptr,
        mask: row_ptr(mask, 0),
        entropy: row_ptr(entropy, 0),
        loss: 0,
        grad_logp: row_ptr(grad_logp, 0),
        grad_entropy: row_ptr(grad_entropy, 0),
        accumulate: false,
        stats: stats.ptr,
        workspace: 0,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`; `stats` holds the 15 words (checked).
    unsafe { raw::policy_loss(raw_stream, &args, opts) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn gae(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    [rewards, kl, values, mask, scores]: [Option<&Dl>; 5],
    beta: f32,
    [advantages, returns]: [Option<&Dl>; 2],
    opts: &GaeOptions,
) -> PyResult<()> {
    let (raw_stream, status) =
        launch_context(ordinal, stream, status, &[rewards, kl, values, mask, scores, advantages, returns])?;
    let args = GaeArgs {
        shape,
        rewards: row_ptr(rewards, 0),
        kl: row_ptr(kl, 0),
        beta,
        scores: row_ptr(scores, 0),
        values: row_ptr(values, 0),
        mask: row_ptr(mask, 0),
        advantages: row_ptr(advantages, 0),
        returns: row_ptr(returns, 0),
        workspace: 0,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`.
    unsafe { raw::gae(raw_stream, &args, opts) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    groups: &Groups,
    scores: &Dl,
    [per_sequence, per_token]: [Option<&Dl>; 2],
    token_shape: RowShape,
    mask: Option<&Dl>,
    opts: &GroupAdvantageOptions,
) -> PyResult<()> {
    let (raw_stream, status) =
        launch_context(ordinal, stream, status, &[Some(scores), per_sequence, per_token, mask])?;
    let args = GroupAdvantageArgs {
        scores: scores.ptr,
        per_sequence: row_ptr(per_sequence, 0),
        per_token: row_ptr(per_token, 0),
        token_shape,
        mask: row_ptr(mask, 0),
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`.
    unsafe { raw::group_advantages(raw_stream, groups, &args, opts) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn sampled_kl(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    [logp, ref_logp]: [&Dl; 2],
    [mask, old_logp]: [Option<&Dl>; 2],
    [values, grad_logp, stats]: [Option<&Dl>; 3],
    opts: &SampledKlOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[Some(logp), Some(ref_logp), mask, old_logp, values, grad_logp, stats],
    )?;
    let args = SampledKlArgs {
        shape,
        logp: logp.ptr,
        ref_logp: ref_logp.ptr,
        mask: row_ptr(mask, 0),
        old_logp: row_ptr(old_logp, 0),
        values: row_ptr(values, 0),
        grad_logp: row_ptr(grad_logp, 0),
        stats: row_ptr(stats, 0),
        workspace: 0,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`; `stats` holds the 13 words (checked).
    unsafe { raw::sampled_kl(raw_stream, &args, opts) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn kl_rewards(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    [kl, scores]: [&Dl; 2],
    mask: Option<&Dl>,
    rewards: &Dl,
    beta: f32,
) -> PyResult<()> {
    let (raw_stream, status) =
        launch_context(ordinal, stream, status, &[Some(kl), Some(scores), mask, Some(rewards)])?;
    let args = KlRewardsArgs {
        shape,
        kl: kl.ptr,
        mask: row_ptr(mask, 0),
        scores: scores.ptr,
        rewards: rewards.ptr,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`.
    unsafe { raw::kl_rewards(raw_stream, &args, &KlRewardsOptions::new(beta)) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn overlong_shaping(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    scores: &Dl,
    mask: Option<&Dl>,
    shaped: &Dl,
    opts: &OverlongOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(ordinal, stream, status, &[Some(scores), mask, Some(shaped)])?;
    let args = OverlongArgs {
        shape,
        scores: scores.ptr,
        mask: row_ptr(mask, 0),
        shaped: shaped.ptr,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`.
    unsafe { raw::overlong_shaping(raw_stream, &args, opts) }.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn value_loss(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    [values, old_values, returns]: [&Dl; 3],
    mask: Option<&Dl>,
    [loss, grad_values]: [Option<&Dl>; 2],
    stats: &Dl,
    opts: &ValueLossOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[Some(values), Some(old_values), Some(returns), mask, loss, grad_values, Some(stats)],
    )?;
    let args = ValueLossArgs {
        shape,
        values: values.ptr,
        old_values: old_values.ptr,
        returns: returns.ptr,
        mask: row_ptr(mask, 0),
        loss: row_ptr(loss, 0),
        grad_values: row_ptr(grad_values, 0),
        stats: stats.ptr,
        workspace: 0,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`; `stats` holds the five words (checked).
    unsafe { raw::value_loss(raw_stream, &args, opts) }.map_err(err)
}

/// A batch reduction of the Python module over `values` into `out`.
pub enum Reduction<'a> {
    /// The loss aggregation (four f64 out).
    Aggregate(Aggregation, Normaliser),
    /// The masked moments (five f64 out).
    Moments,
    /// The moments, then `values` whitened in place.
    Whiten(&'a WhitenOptions),
}

#[allow(clippy::too_many_arguments)]
pub fn reduction(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    shape: RowShape,
    values: &Dl,
    mask: Option<&Dl>,
    out: &Dl,
    op: Reduction<'_>,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(ordinal, stream, status, &[Some(values), mask, Some(out)])?;
    let args = ReductionArgs {
        shape,
        values: values.ptr,
        mask: row_ptr(mask, 0),
        out: out.ptr,
        workspace: 0,
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`; `out` holds the reduction's words (checked by the
    // caller); for whitening `values` is writable and overlaps nothing (checked by the caller).
    let r = unsafe {
        match op {
            Reduction::Aggregate(aggregation, norm) => raw::aggregate(raw_stream, &args, aggregation, norm),
            Reduction::Moments => raw::masked_moments(raw_stream, &args),
            Reduction::Whiten(opts) => raw::whiten(raw_stream, &args, opts),
        }
    };
    r.map_err(err)
}

#[allow(clippy::too_many_arguments)]
pub fn policy_loss_from_logits(
    ordinal: usize,
    stream: usize,
    status: Option<&Bound<'_, PyAny>>,
    [logits, grad]: [&Dl; 2],
    shape: RowShape,
    sequences: RowShape,
    [targets, old, adv]: [&Dl; 3],
    [mask, ref_logp, workspace]: [Option<&Dl>; 3],
    stats: &Dl,
    opts: &FusedPolicyOptions,
) -> PyResult<()> {
    let (raw_stream, status) = launch_context(
        ordinal,
        stream,
        status,
        &[
            Some(logits),
            Some(grad),
            Some(targets),
            Some(old),
            Some(adv),
            mask,
            ref_logp,
            workspace,
            Some(stats),
        ],
    )?;
    let dtype = logits.kind.float("logits")?;
    if let Some(w) = workspace {
        let need = raw::fused_workspace_bytes(shape, dtype, sequences);
        if w.span() < need || w.ptr % 16 != 0 {
            return Err(PyValueError::new_err(format!(
                "workspace: {} bytes at {:#x}, expected at least {need} bytes at a 16-byte aligned address",
                w.span(),
                w.ptr
            )));
        }
    }
    let args = FusedPolicyArgs {
        logits: logits.ptr,
        dtype,
        shape,
        targets: targets.ptr,
        index_type: index_type(targets.kind),
        mask: row_ptr(mask, 0),
        sequences,
        old_logp: old.ptr,
        advantages: adv.ptr,
        ref_logp: row_ptr(ref_logp, 0),
        grad_logits: grad.ptr,
        policy_stats: stats.ptr,
        kl_stats: if ref_logp.is_some() { stats.at(raw::POLICY_STATS_WORDS) } else { 0 },
        workspace: row_ptr(workspace, 0),
        status: status.ptr,
    };
    // SAFETY: as in `token_logprobs`; `grad` has the logits' layout (checked), `stats` holds the
    // policy and KL words (checked), the workspace its bytes (checked above).
    unsafe { raw::policy_loss_from_logits(raw_stream, &args, opts) }.map_err(err)
}
