//! The ops over logits rows: token log-probabilities (+ backward) and the exact divergences
//! (+ backward). The logits may be any view whose last dimension has unit stride; they are
//! read in place, one launch (or CPU call) per block of evenly spaced rows.

use pyo3::prelude::*;
use rlhf_kernels::{ExactDivergence, ExactKlOptions, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens};
use rlhf_kernels::{ExactKlGrads, ReferenceRows};
use rlhf_kernels::{ExactKlOutputs, cpu};

use crate::cuda;
use crate::dl::{Dl, Kind, Place, check_together, err, import_pair};
use crate::{bytemuck_cast, bytemuck_cast_mut, float_type, index_type, lead};

const INDEX: [Kind; 3] = [Kind::I64, Kind::I32, Kind::U32];

/// `log softmax(logits/τ)[target]`, the entropy and the log-sum-exp of every row of `logits`
/// (`[..., V]`, float32 / bfloat16 / float16), written into the float32 outputs given (shaped
/// like `targets`). Masked rows (`mask` 0) and rows whose target is `ignore_index` get 0.
#[pyfunction]
#[pyo3(signature = (logits, targets, *, mask=None, logp=None, entropy=None, lse=None, temperature=1.0, ignore_index=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    logp: Option<&Bound<'_, PyAny>>,
    entropy: Option<&Bound<'_, PyAny>>,
    lse: Option<&Bound<'_, PyAny>>,
    temperature: f32,
    ignore_index: Option<i64>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = TokenLogprobsOptions::default().temperature(temperature).ignore_index(ignore_index);
    let logits = Dl::import(logits, stream, "logits")?;
    let rows = logits.rows()?;
    let lead = lead(&logits);
    let targets = Dl::import(targets, stream, "targets")?;
    targets.per_row(lead)?.expect(&INDEX)?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    let outs = [(logp, "logp"), (entropy, "entropy"), (lse, "lse")]
        .map(|(o, what)| Dl::maybe(o, stream, what))
        .into_iter()
        .collect::<PyResult<Vec<_>>>()?;
    for t in mask.iter() {
        t.per_row(lead)?.expect(&[Kind::Byte])?;
    }
    for t in outs.iter().flatten() {
        t.per_row(lead)?.expect(&[Kind::F32])?;
    }
    let dtype = logits.kind.float("logits")?;
    let place = check_together(
        &[Some(&logits), Some(&targets), mask.as_ref()],
        &outs.iter().map(Option::as_ref).collect::<Vec<_>>(),
    )?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes checked above; the outputs overlap no other tensor
            // (`check_together`) and nothing else runs on this memory during the call.
            let (l, t, m) = unsafe { (logits.bytes(), targets.bytes(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above.
            let mut o: Vec<Option<&mut [f32]>> =
                outs.iter().map(|d| d.as_ref().map(|d| unsafe { d.elems_mut::<f32>() })).collect();
            let (lse, entropy, logp) = (o.pop().flatten(), o.pop().flatten(), o.pop().flatten());
            let kind = targets.kind;
            py.detach(move || {
                float_type!(dtype, T => index_type!(kind, I => {
                    let (l, t): (&[T], &[I]) = (bytemuck_cast(l), bytemuck_cast(t));
                    let (mut logp, mut entropy, mut lse) = (logp, entropy, lse);
                    for k in 0..rows.offsets.len() {
                        let r = rows.block_rows(k);
                        let tokens = Tokens { targets: &t[r.clone()], mask: m.map(|m| &m[r.clone()]) };
                        let out = TokenOutputs {
                            logp: logp.as_deref_mut().map(|s| &mut s[r.clone()]),
                            entropy: entropy.as_deref_mut().map(|s| &mut s[r.clone()]),
                            lse: lse.as_deref_mut().map(|s| &mut s[r.clone()]),
                            workspace: None,
                        };
                        cpu::token_logprobs(&l[rows.block_range(k)], rows.shape, &tokens, out, &opts).map_err(|e| rows.block_error(k, e))?;
                    }
                    Ok(())
                }))
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => cuda::token_logprobs(
            ordinal,
            stream,
            status,
            &logits,
            &rows,
            &targets,
            mask.as_ref(),
            &outs,
            &opts,
        ),
    }
}

/// The backward of [`token_logprobs`]: `grad_logits` (laid out like `logits`, same dtype) gets
/// `∂/∂logits` of `Σ grad_logp·logp + Σ grad_entropy·entropy` from the saved `lse` (and
/// `entropy`, needed with `grad_entropy`). `grad_logits` may be `logits` itself (in place).
#[pyfunction]
#[pyo3(signature = (logits, targets, lse, grad_logits, *, mask=None, entropy=None, grad_logp=None, grad_entropy=None, temperature=1.0, ignore_index=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    entropy: Option<&Bound<'_, PyAny>>,
    grad_logp: Option<&Bound<'_, PyAny>>,
    grad_entropy: Option<&Bound<'_, PyAny>>,
    temperature: f32,
    ignore_index: Option<i64>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = TokenLogprobsOptions::default().temperature(temperature).ignore_index(ignore_index);
    let in_place = logits.is(grad_logits);
    let logits = Dl::import(logits, stream, "logits")?;
    let rows = logits.rows()?;
    let lead = lead(&logits);
    let grad_out = if in_place { None } else { Some(Dl::import(grad_logits, stream, "grad_logits")?) };
    if let Some(g) = &grad_out
        && (g.kind != logits.kind || g.rows()? != rows)
    {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "grad_logits: must have the logits' dtype, shape and strides (torch.empty_strided(logits.size(), logits.stride()))",
        ));
    }
    let targets = Dl::import(targets, stream, "targets")?;
    targets.per_row(lead)?.expect(&INDEX)?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    for t in mask.iter() {
        t.per_row(lead)?.expect(&[Kind::Byte])?;
    }
    let saved =
        [(Some(lse), "lse"), (entropy, "entropy"), (grad_logp, "grad_logp"), (grad_entropy, "grad_entropy")]
            .map(|(o, what)| Dl::maybe(o, stream, what))
            .into_iter()
            .collect::<PyResult<Vec<_>>>()?;
    for t in saved.iter().flatten() {
        t.per_row(lead)?.expect(&[Kind::F32])?;
    }
    let dtype = logits.kind.float("logits")?;
    let mut inputs: Vec<Option<&Dl>> = vec![Some(&targets), mask.as_ref()];
    inputs.extend(saved.iter().map(Option::as_ref));
    if in_place {
        check_together(&inputs, &[Some(&logits)])?;
    } else {
        inputs.push(Some(&logits));
        check_together(&inputs, &[grad_out.as_ref()])?;
    }
    match logits.place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; `grad_logits` overlaps no input other than
            // the logits when it is the logits (the in-place path reads no other slice of them).
            let (t, m) = unsafe { (targets.bytes(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above.
            let f: Vec<Option<&[f32]>> =
                saved.iter().map(|d| d.as_ref().map(|d| unsafe { d.elems::<f32>() })).collect();
            // SAFETY: as above; the only mutable slice.
            let g = unsafe { grad_out.as_ref().unwrap_or(&logits).bytes_mut() };
            // SAFETY: as above; absent on the in-place path.
            let l = (!in_place).then(|| unsafe { logits.bytes() });
            let kind = targets.kind;
            py.detach(move || {
                float_type!(dtype, T => index_type!(kind, I => {
                    let (t, g): (&[I], &mut [T]) = (bytemuck_cast(t), bytemuck_cast_mut(g));
                    let l: Option<&[T]> = l.map(bytemuck_cast);
                    for k in 0..rows.offsets.len() {
                        let r = rows.block_rows(k);
                        let at = |i: usize| f[i].map(|s| &s[r.clone()]);
                        let tokens = Tokens { targets: &t[r.clone()], mask: m.map(|m| &m[r.clone()]) };
                        let grads = TokenGrads { lse: at(0).unwrap_or_default(), entropy: at(1), grad_logp: at(2), grad_entropy: at(3) };
                        let block = &mut g[rows.block_range(k)];
                        match l {
                            Some(l) => cpu::token_logprobs_backward(&l[rows.block_range(k)], rows.shape, &tokens, &grads, block, &opts),
                            None => cpu::token_logprobs_backward_in_place(block, rows.shape, &tokens, &grads, &opts),
                        }
                        .map_err(|e| rows.block_error(k, e))?;
                    }
                    Ok(())
                }))
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => {
            let grad = grad_out.as_ref().unwrap_or(&logits);
            cuda::token_logprobs_backward(
                ordinal,
                stream,
                status,
                &logits,
                grad,
                &rows,
                &targets,
                mask.as_ref(),
                &saved,
                &opts,
            )
        }
    }
}

/// The divergence named by `divergence` ("policy_ref": `KL[π ‖ π_ref]`, "ref_policy":
/// `KL[π_ref ‖ π]`, "jsd": the generalised JSD with the policy's weight `jsd_beta`) of every
/// row pair of `policy` and `reference` (`[..., V]`, any float dtype, any row layout), into the
/// float32 outputs given (shaped like the leading dimensions).
#[pyfunction]
#[pyo3(signature = (policy, reference, *, mask=None, value=None, policy_lse=None, ref_lse=None, policy_term=None, divergence="policy_ref", jsd_beta=0.5, temperature=1.0, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn exact_kl(
    py: Python<'_>,
    policy: &Bound<'_, PyAny>,
    reference: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    value: Option<&Bound<'_, PyAny>>,
    policy_lse: Option<&Bound<'_, PyAny>>,
    ref_lse: Option<&Bound<'_, PyAny>>,
    policy_term: Option<&Bound<'_, PyAny>>,
    divergence: &str,
    jsd_beta: f32,
    temperature: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = ExactKlOptions::new(parse_divergence(divergence, jsd_beta)?).temperature(temperature);
    let (pair, mask) = import_pair(policy, reference, mask, stream)?;
    let outs =
        [(value, "value"), (policy_lse, "policy_lse"), (ref_lse, "ref_lse"), (policy_term, "policy_term")]
            .map(|(o, what)| Dl::maybe(o, stream, what))
            .into_iter()
            .collect::<PyResult<Vec<_>>>()?;
    for t in outs.iter().flatten() {
        t.per_row(lead(&pair.policy))?.expect(&[Kind::F32])?;
    }
    let place = check_together(
        &[Some(&pair.policy), Some(&pair.reference), mask.as_ref()],
        &outs.iter().map(Option::as_ref).collect::<Vec<_>>(),
    )?;
    let (p_rows, q_rows) = (pair.p_rows.clone(), pair.q_rows.clone());
    match place {
        Place::Cpu => {
            let (pt, qt) = (pair.policy.kind.float("policy")?, pair.reference.kind.float("reference")?);
            // SAFETY: dtypes and shapes checked above; the outputs overlap nothing else.
            let (p, q, m) =
                unsafe { (pair.policy.bytes(), pair.reference.bytes(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above.
            let mut o: Vec<Option<&mut [f32]>> =
                outs.iter().map(|d| d.as_ref().map(|d| unsafe { d.elems_mut::<f32>() })).collect();
            let (mut term, mut rl, mut pl, mut v) =
                (o.pop().flatten(), o.pop().flatten(), o.pop().flatten(), o.pop().flatten());
            py.detach(move || {
                float_type!(pt, P => float_type!(qt, Q => {
                    let (p, q): (&[P], &[Q]) = (bytemuck_cast(p), bytemuck_cast(q));
                    for k in 0..p_rows.offsets.len() {
                        let r = p_rows.block_rows(k);
                        let reference = ReferenceRows { logits: &q[q_rows.block_range(k)], shape: q_rows.shape, mask: m.map(|m| &m[r.clone()]) };
                        let out = ExactKlOutputs {
                            value: v.as_deref_mut().map(|s| &mut s[r.clone()]),
                            policy_lse: pl.as_deref_mut().map(|s| &mut s[r.clone()]),
                            ref_lse: rl.as_deref_mut().map(|s| &mut s[r.clone()]),
                            policy_term: term.as_deref_mut().map(|s| &mut s[r.clone()]),
                            ..Default::default()
                        };
                        cpu::exact_kl(&p[p_rows.block_range(k)], p_rows.shape, &reference, out, &opts).map_err(|e| p_rows.block_error(k, e))?;
                    }
                    Ok(())
                }))
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => cuda::exact_kl(ordinal, stream, status, &pair, mask.as_ref(), &outs, &opts),
    }
}

/// The backward of [`exact_kl`]: `grad_policy` (laid out like `policy`, same dtype) gets
/// `grad·∂divergence/∂policy` from the saved log-sum-exps (and `value`, `policy_term`).
#[pyfunction]
#[pyo3(signature = (policy, reference, grad, policy_lse, ref_lse, grad_policy, *, mask=None, value=None, policy_term=None, divergence="policy_ref", jsd_beta=0.5, temperature=1.0, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn exact_kl_backward(
    py: Python<'_>,
    policy: &Bound<'_, PyAny>,
    reference: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    policy_lse: &Bound<'_, PyAny>,
    ref_lse: &Bound<'_, PyAny>,
    grad_policy: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    value: Option<&Bound<'_, PyAny>>,
    policy_term: Option<&Bound<'_, PyAny>>,
    divergence: &str,
    jsd_beta: f32,
    temperature: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = ExactKlOptions::new(parse_divergence(divergence, jsd_beta)?).temperature(temperature);
    let (pair, mask) = import_pair(policy, reference, mask, stream)?;
    let out = Dl::import(grad_policy, stream, "grad_policy")?;
    if out.kind != pair.policy.kind || out.rows()? != pair.policy.rows()? {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "grad_policy: must have the policy's dtype, shape and strides (torch.empty_strided(policy.size(), policy.stride()))",
        ));
    }
    let saved = [
        (Some(grad), "grad"),
        (Some(policy_lse), "policy_lse"),
        (Some(ref_lse), "ref_lse"),
        (value, "value"),
        (policy_term, "policy_term"),
    ]
    .map(|(o, what)| Dl::maybe(o, stream, what))
    .into_iter()
    .collect::<PyResult<Vec<_>>>()?;
    for t in saved.iter().flatten() {
        t.per_row(lead(&pair.policy))?.expect(&[Kind::F32])?;
    }
    let mut inputs = vec![Some(&pair.policy), Some(&pair.reference), mask.as_ref()];
    inputs.extend(saved.iter().map(Option::as_ref));
    check_together(&inputs, &[Some(&out)])?;
    let (p_rows, q_rows) = (pair.p_rows.clone(), pair.q_rows.clone());
    match pair.policy.place {
        Place::Cpu => {
            let (pt, qt) = (pair.policy.kind.float("policy")?, pair.reference.kind.float("reference")?);
            // SAFETY: dtypes and shapes checked above; the output overlaps nothing else.
            let (p, q, m) =
                unsafe { (pair.policy.bytes(), pair.reference.bytes(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above.
            let f: Vec<Option<&[f32]>> =
                saved.iter().map(|d| d.as_ref().map(|d| unsafe { d.elems::<f32>() })).collect();
            // SAFETY: as above; the only mutable slice.
            let g = unsafe { out.bytes_mut() };
            py.detach(move || {
                float_type!(pt, P => float_type!(qt, Q => {
                    let (p, q, g): (&[P], &[Q], &mut [P]) = (bytemuck_cast(p), bytemuck_cast(q), bytemuck_cast_mut(g));
                    for k in 0..p_rows.offsets.len() {
                        let r = p_rows.block_rows(k);
                        let at = |i: usize| f[i].map(|s| &s[r.clone()]);
                        let reference = ReferenceRows { logits: &q[q_rows.block_range(k)], shape: q_rows.shape, mask: m.map(|m| &m[r.clone()]) };
                        let grads = ExactKlGrads {
                            grad: at(0).unwrap_or_default(),
                            policy_lse: at(1).unwrap_or_default(),
                            ref_lse: at(2).unwrap_or_default(),
                            value: at(3),
                            policy_term: at(4),
                        };
                        cpu::exact_kl_backward(&p[p_rows.block_range(k)], p_rows.shape, &reference, &grads, &mut g[p_rows.block_range(k)], &opts)
                            .map_err(|e| p_rows.block_error(k, e))?;
                    }
                    Ok(())
                }))
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => {
            cuda::exact_kl_backward(ordinal, stream, status, &pair, mask.as_ref(), &saved, &out, &opts)
        }
    }
}

fn parse_divergence(name: &str, beta: f32) -> PyResult<ExactDivergence> {
    match name {
        "policy_ref" => Ok(ExactDivergence::PolicyRef),
        "ref_policy" => Ok(ExactDivergence::RefPolicy),
        "jsd" => Ok(ExactDivergence::Jsd { beta }),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "divergence: {other:?}, expected \"policy_ref\" (KL[pi || ref]), \"ref_policy\" (KL[ref || pi]) or \"jsd\""
        ))),
    }
}
