//! The ops over `[B, T]` batches: the policy loss (loss, gradients and statistics in one
//! pass), GAE and the group advantages.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rlhf_kernels::PolicyLossOutputs;
use rlhf_kernels::cuda::raw;
use rlhf_kernels::{
    Aggregation, GaeInputs, GaeOptions, GroupAdvantageOptions, GroupEstimator, GroupStd, Groups, MaskedSteps,
    Normaliser, PolicyLossInputs, PolicyLossOptions, PolicyObjective, RowShape,
};
use rlhf_kernels::{GaeOutputs, GroupAdvantageOutputs, cpu};

use crate::cuda;
use crate::dl::{Dl, Kind, Place, check_together, err};

/// f64 words of the policy statistics, in the GPU's order (see
/// `rlhf_kernels::cuda::raw::policy_stats_from_words`).
pub const STATS_WORDS: usize = raw::POLICY_STATS_WORDS;

/// The policy loss of a `[B, T]` batch (float32 `logp`, `old_logp`, `advantages`; optional
/// byte `mask` and float32 `entropy`): writes `∂loss/∂logp` into `grad_logp` and `∂loss/∂H`
/// into `grad_entropy` when given, and the statistics into `stats` (float64, 15 words; the
/// scalar loss is word 0), all on the tensors' device.
#[pyfunction]
#[pyo3(signature = (logp, old_logp, advantages, stats, *, mask=None, entropy=None, grad_logp=None, grad_entropy=None, objective="clip", beta=0.0, tau_pos=1.0, tau_neg=1.05, clip_low=0.2, clip_high=0.2, dual_clip=None, log_ratio_clamp=20.0, entropy_coef=0.0, aggregation="token_mean", max_len=0, global_counts=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    advantages: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    entropy: Option<&Bound<'_, PyAny>>,
    grad_logp: Option<&Bound<'_, PyAny>>,
    grad_entropy: Option<&Bound<'_, PyAny>>,
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
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = policy_options(
        objective,
        beta,
        [tau_pos, tau_neg],
        [clip_low, clip_high],
        dual_clip,
        log_ratio_clamp,
        entropy_coef,
        parse_aggregation(aggregation, max_len)?,
        parse_normaliser(global_counts),
    )?;
    let logp = Dl::import(logp, stream, "logp")?;
    let dims = batch_dims(&logp)?;
    let shape = RowShape::new(dims[0], dims[1]);
    let import = |o: Option<&Bound<'_, PyAny>>, what, kind| -> PyResult<Option<Dl>> {
        let t = Dl::maybe(o, stream, what)?;
        if let Some(t) = &t {
            t.per_row(&dims)?.expect(&[kind])?;
        }
        Ok(t)
    };
    logp.per_row(&dims)?.expect(&[Kind::F32])?;
    let (old, adv) =
        (import(Some(old_logp), "old_logp", Kind::F32)?, import(Some(advantages), "advantages", Kind::F32)?);
    let (mask, entropy) = (import(mask, "mask", Kind::Byte)?, import(entropy, "entropy", Kind::F32)?);
    let (gl, gh) =
        (import(grad_logp, "grad_logp", Kind::F32)?, import(grad_entropy, "grad_entropy", Kind::F32)?);
    let stats = Dl::import(stats, stream, "stats")?;
    stats.per_row(&[STATS_WORDS])?.expect(&[Kind::F64])?;
    let place = check_together(
        &[Some(&logp), old.as_ref(), adv.as_ref(), mask.as_ref(), entropy.as_ref()],
        &[gl.as_ref(), gh.as_ref(), Some(&stats)],
    )?;
    let (old, adv) = (old.expect("required"), adv.expect("required"));
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no other tensor.
            let (l, o, a) = unsafe { (logp.elems::<f32>(), old.elems::<f32>(), adv.elems::<f32>()) };
            // SAFETY: as above.
            let (m, h) =
                unsafe { (mask.as_ref().map(|m| m.bytes()), entropy.as_ref().map(|h| h.elems::<f32>())) };
            // SAFETY: as above; each output is one mutable slice.
            let (gl, gh) = unsafe {
                (gl.as_ref().map(|g| g.elems_mut::<f32>()), gh.as_ref().map(|g| g.elems_mut::<f32>()))
            };
            // SAFETY: as above.
            let words = unsafe { stats.elems_mut::<f64>() };
            let s = py
                .detach(move || {
                    let mut inputs = PolicyLossInputs::new(shape, l, o, a);
                    if let Some(m) = m {
                        inputs = inputs.mask(m);
                    }
                    if let Some(h) = h {
                        inputs = inputs.entropy(h);
                    }
                    let out = PolicyLossOutputs { grad_logp: gl, grad_entropy: gh, ..Default::default() };
                    cpu::policy_loss(&inputs, out, &opts)
                })
                .map_err(err)?;
            words.copy_from_slice(&raw::policy_stats_to_words(&s));
            Ok(())
        }
        Place::Cuda(ordinal) => cuda::policy_loss(
            ordinal,
            stream,
            status,
            shape,
            [&logp, &old, &adv],
            [mask.as_ref(), entropy.as_ref()],
            [gl.as_ref(), gh.as_ref()],
            &stats,
            &opts,
        ),
    }
}

/// The policy loss's options from the Python arguments (shared by `policy_loss` and the fused
/// path).
#[allow(clippy::too_many_arguments)]
pub(crate) fn policy_options(
    objective: &str,
    beta: f32,
    [tau_pos, tau_neg]: [f32; 2],
    [clip_low, clip_high]: [f32; 2],
    dual_clip: Option<f32>,
    log_ratio_clamp: Option<f32>,
    entropy_coef: f32,
    aggregation: Aggregation,
    normaliser: Normaliser,
) -> PyResult<PolicyLossOptions> {
    let objective = match objective {
        "clip" => PolicyObjective::Clip,
        "kl_penalty" => PolicyObjective::KlPenalty { beta },
        "gspo" => PolicyObjective::Gspo,
        "cispo" => PolicyObjective::Cispo,
        "sapo" => PolicyObjective::Sapo { tau_pos, tau_neg },
        "gmpo" => PolicyObjective::Gmpo,
        other => {
            return Err(PyValueError::new_err(format!(
                "objective: {other:?}, expected \"clip\", \"kl_penalty\", \"gspo\", \"cispo\", \"sapo\" or \"gmpo\""
            )));
        }
    };
    Ok(PolicyLossOptions::new(objective)
        .clip(clip_low, clip_high)
        .dual_clip(dual_clip)
        .log_ratio_clamp(log_ratio_clamp)
        .entropy_coef(entropy_coef)
        .aggregation(aggregation)
        .normaliser(normaliser))
}

/// The normaliser of `global_counts` (`(valid tokens, valid sequences, sequences)` of the whole
/// batch when this is a micro-batch), or the batch's own counts.
pub(crate) fn parse_normaliser(global_counts: Option<(f64, f64, f64)>) -> Normaliser {
    match global_counts {
        Some((valid_tokens, valid_sequences, sequences)) => {
            Normaliser::Global { valid_tokens, valid_sequences, sequences }
        }
        None => Normaliser::Local,
    }
}

/// An aggregation mode by its Python name.
pub(crate) fn parse_aggregation(name: &str, max_len: usize) -> PyResult<Aggregation> {
    match name {
        "token_mean" => Ok(Aggregation::TokenMean),
        "seq_mean_token_sum" => Ok(Aggregation::SeqMeanTokenSum),
        "seq_mean_token_mean" => Ok(Aggregation::SeqMeanTokenMean),
        "seq_mean_token_sum_norm" => Ok(Aggregation::SeqMeanTokenSumNorm { max_len }),
        other => Err(PyValueError::new_err(format!(
            "aggregation: {other:?}, expected \"token_mean\", \"seq_mean_token_sum\", \"seq_mean_token_mean\" or \"seq_mean_token_sum_norm\""
        ))),
    }
}

/// The `[B, T]` dims of a batch tensor.
pub(crate) fn batch_dims(t: &Dl) -> PyResult<Vec<usize>> {
    if t.dims.len() != 2 {
        return Err(PyValueError::new_err(format!("{}: shape {:?}, expected [B, T]", t.what, t.dims)));
    }
    Ok(t.dims.clone())
}

/// GAE over a `[B, T]` batch into `advantages` and `returns` (float32 `[B, T]`, either may be
/// None): dense `rewards`, `kl` with `beta` (reward `−β·kl` per token), per-sequence `scores`
/// `[B]` on the last valid token, `values` (None: discounted returns), byte `mask`.
#[pyfunction]
#[pyo3(signature = (*, advantages=None, returns=None, rewards=None, kl=None, beta=0.0, scores=None, values=None, mask=None, gamma=1.0, lam=1.0, reset_masked=false, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn gae(
    py: Python<'_>,
    advantages: Option<&Bound<'_, PyAny>>,
    returns: Option<&Bound<'_, PyAny>>,
    rewards: Option<&Bound<'_, PyAny>>,
    kl: Option<&Bound<'_, PyAny>>,
    beta: f32,
    scores: Option<&Bound<'_, PyAny>>,
    values: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    gamma: f32,
    lam: f32,
    reset_masked: bool,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = GaeOptions::new(gamma, lam).masked_steps(if reset_masked {
        MaskedSteps::Reset
    } else {
        MaskedSteps::PassThrough
    });
    let names = ["rewards", "kl", "values", "mask", "advantages", "returns"];
    let tensors: Vec<Option<Dl>> = [rewards, kl, values, mask, advantages, returns]
        .into_iter()
        .zip(names)
        .map(|(o, what)| Dl::maybe(o, stream, what))
        .collect::<PyResult<_>>()?;
    let Some(first) = tensors.iter().flatten().next() else {
        return Err(PyValueError::new_err("gae: give the outputs and at least one [B, T] input"));
    };
    let dims = batch_dims(first)?;
    for (i, t) in tensors.iter().enumerate() {
        if let Some(t) = t {
            t.per_row(&dims)?.expect(&[if i == 3 { Kind::Byte } else { Kind::F32 }])?;
        }
    }
    let scores = Dl::maybe(scores, stream, "scores")?;
    if let Some(s) = &scores {
        s.per_row(&dims[..1])?.expect(&[Kind::F32])?;
    }
    let shape = RowShape::new(dims[0], dims[1]);
    let [r, k, v, m, a, ret] = [0, 1, 2, 3, 4, 5].map(|i| tensors[i].as_ref());
    let place = check_together(&[r, k, v, m, scores.as_ref()], &[a, ret])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no other tensor.
            let (r, k, v, s, m) = unsafe {
                let s = scores.as_ref();
                (
                    r.map(|t| t.elems::<f32>()),
                    k.map(|t| t.elems::<f32>()),
                    v.map(|t| t.elems::<f32>()),
                    s.map(|t| t.elems::<f32>()),
                    m.map(|m| m.bytes()),
                )
            };
            // SAFETY: as above; each output is one mutable slice.
            let out = unsafe {
                GaeOutputs {
                    advantages: a.map(|t| t.elems_mut()),
                    returns: ret.map(|t| t.elems_mut()),
                    workspace: None,
                }
            };
            py.detach(move || {
                let mut inputs = GaeInputs::new(shape);
                inputs.rewards = r;
                inputs.kl_penalty = k.map(|k| (k, beta));
                inputs.values = v;
                inputs.mask = m;
                inputs.scores = s;
                cpu::gae(&inputs, out, &opts)
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => {
            cuda::gae(ordinal, stream, status, shape, [r, k, v, m, scores.as_ref()], beta, [a, ret], &opts)
        }
    }
}

/// Group ids from a CPU integer tensor (any DLPack producer, read in place) or a sequence of
/// ints.
fn host_ids(ids: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if !ids.hasattr("__dlpack__")? {
        return ids.extract::<Vec<u32>>();
    }
    let t = Dl::import(ids, 0, "group_ids")?;
    if t.place != Place::Cpu || t.dims.len() != 1 {
        return Err(PyValueError::new_err("group_ids: expected a 1-D CPU tensor (or a list of ints)"));
    }
    t.per_row(&t.dims.clone())?.expect(&[Kind::I64, Kind::I32, Kind::U32])?;
    let range = |x: i64| {
        u32::try_from(x).map_err(|_| PyValueError::new_err(format!("group_ids: {x} is out of range")))
    };
    // SAFETY: dtype and layout checked above; nothing writes the ids during the call.
    unsafe {
        match t.kind {
            Kind::I64 => t.elems::<i64>().iter().map(|&x| range(x)).collect(),
            Kind::I32 => t.elems::<i32>().iter().map(|&x| range(x as i64)).collect(),
            _ => Ok(t.elems::<u32>().to_vec()),
        }
    }
}

/// Outcome advantages over groups (`group_ids`: one group index per sequence, `< num_groups`,
/// as a CPU integer tensor or a list)
/// from one float32 score per sequence: into `per_sequence` (`[B]`) and/or `per_token`
/// (`[B, T]`, with the byte `mask`: 0 at padding). `estimator`: "grpo" (with `std`:
/// "unbiased", "biased" or "none", and `eps`), "rloo" or "group_mean".
#[pyfunction]
#[pyo3(signature = (scores, group_ids, num_groups, *, per_sequence=None, per_token=None, mask=None, estimator="grpo", std="unbiased", eps=1e-6, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    group_ids: &Bound<'_, PyAny>,
    num_groups: usize,
    per_sequence: Option<&Bound<'_, PyAny>>,
    per_token: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    estimator: &str,
    std: &str,
    eps: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let std = match std {
        "unbiased" => GroupStd::Unbiased,
        "biased" => GroupStd::Biased,
        "none" => GroupStd::NoStd,
        other => {
            return Err(PyValueError::new_err(format!(
                "std: {other:?}, expected \"unbiased\", \"biased\" or \"none\""
            )));
        }
    };
    let estimator = match estimator {
        "grpo" => GroupEstimator::Grpo { std, eps },
        "rloo" => GroupEstimator::Rloo,
        "group_mean" => GroupEstimator::GroupMean,
        other => {
            return Err(PyValueError::new_err(format!(
                "estimator: {other:?}, expected \"grpo\", \"rloo\" or \"group_mean\""
            )));
        }
    };
    let opts = GroupAdvantageOptions::new(estimator);
    let group_ids = host_ids(group_ids)?;
    let groups = Groups::new(&group_ids, num_groups).map_err(err)?;
    let b = group_ids.len();
    let scores = Dl::import(scores, stream, "scores")?;
    scores.per_row(&[b])?.expect(&[Kind::F32])?;
    let seq = Dl::maybe(per_sequence, stream, "per_sequence")?;
    if let Some(s) = &seq {
        s.per_row(&[b])?.expect(&[Kind::F32])?;
    }
    let tok = Dl::maybe(per_token, stream, "per_token")?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    let token_shape = match &tok {
        Some(t) => {
            let dims = batch_dims(t)?;
            if dims[0] != b {
                return Err(PyValueError::new_err(format!("per_token: shape {dims:?}, expected [{b}, T]")));
            }
            t.per_row(&dims)?.expect(&[Kind::F32])?;
            if let Some(m) = &mask {
                m.per_row(&dims)?.expect(&[Kind::Byte])?;
            }
            RowShape::new(b, dims[1])
        }
        None => RowShape::new(b, 1),
    };
    let place = check_together(&[Some(&scores), mask.as_ref()], &[seq.as_ref(), tok.as_ref()])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no other tensor.
            let (s, m) = unsafe { (scores.elems::<f32>(), mask.as_ref().map(|m| m.bytes())) };
            // SAFETY: as above; each output is one mutable slice.
            let (seq, tok) = unsafe {
                (seq.as_ref().map(|t| t.elems_mut::<f32>()), tok.as_ref().map(|t| t.elems_mut::<f32>()))
            };
            py.detach(move || {
                let mut out = GroupAdvantageOutputs::default();
                if let Some(o) = seq {
                    out = out.per_sequence(o);
                }
                if let Some(o) = tok {
                    out = out.per_token(o, token_shape, m);
                }
                cpu::group_advantages(s, &groups, out, &opts)
            })
            .map_err(err)
        }
        Place::Cuda(ordinal) => cuda::group_advantages(
            ordinal,
            stream,
            status,
            &groups,
            &scores,
            [seq.as_ref(), tok.as_ref()],
            token_shape,
            mask.as_ref(),
            &opts,
        ),
    }
}
