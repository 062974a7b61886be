//! The per-token loss terms over `[B, T]` batches beside the policy loss: the sampled KL
//! estimators (values, `∂loss/∂logp` and statistics in one pass), KL-in-reward shaping and the
//! clipped value loss.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rlhf_kernels::cuda::raw;
use rlhf_kernels::{
    KlEstimator, KlRewardsInputs, KlRewardsOptions, OverlongInputs, OverlongOptions, RowShape,
    SampledKlInputs, SampledKlOptions, SampledKlOutputs, ValueLossInputs, ValueLossOptions, ValueLossOutputs,
    cpu,
};

use crate::batch::{batch_dims, parse_aggregation, parse_normaliser};
use crate::cuda;
use crate::dl::{Dl, Kind, Place, check_together, err};

/// f64 words of the sampled-KL statistics (`[loss, the eight estimator means, clamped fraction,
/// valid tokens, valid sequences, sequences]`).
pub const KL_STATS_WORDS: usize = raw::SAMPLED_KL_STATS_WORDS;
/// f64 words of the value-loss statistics (`[loss, clip fraction, valid tokens, valid
/// sequences, sequences]`).
pub const VALUE_STATS_WORDS: usize = raw::VALUE_STATS_WORDS;

/// The `[B, T]` shape of `first` and the other optional tensors of a batch op, each checked to
/// be a dense `[B, T]` of its kind.
fn batch_shape(first: &Dl, others: &[(Option<&Dl>, Kind)]) -> PyResult<RowShape> {
    let dims = batch_dims(first)?;
    first.per_row(&dims)?.expect(&[Kind::F32])?;
    for (t, kind) in others {
        if let Some(t) = t {
            t.per_row(&dims)?.expect(&[*kind])?;
        }
    }
    Ok(RowShape::new(dims[0], dims[1]))
}

/// A statistics output of `words` f64.
fn stats_output(stats: Option<&Bound<'_, PyAny>>, stream: usize, words: usize) -> PyResult<Option<Dl>> {
    let stats = Dl::maybe(stats, stream, "stats")?;
    if let Some(s) = &stats {
        s.per_row(&[words])?.expect(&[Kind::F64])?;
    }
    Ok(stats)
}

pub(crate) fn parse_estimator(name: &str) -> PyResult<KlEstimator> {
    Ok(match name {
        "k1" => KlEstimator::K1,
        "k2" => KlEstimator::K2,
        "k3" => KlEstimator::K3,
        "abs" => KlEstimator::Abs,
        "k1_rev" => KlEstimator::K1Rev,
        "k3_rev" => KlEstimator::K3Rev,
        "grad_policy_ref" => KlEstimator::GradPolicyRef,
        "grad_ref_policy" => KlEstimator::GradRefPolicy,
        other => {
            return Err(PyValueError::new_err(format!(
                "estimator: {other:?}, expected \"k1\", \"k2\", \"k3\", \"abs\" (of KL[π ‖ π_ref]), \
                 \"k1_rev\", \"k3_rev\" (of KL[π_ref ‖ π]), \"grad_policy_ref\" or \"grad_ref_policy\""
            )));
        }
    })
}

/// A sampled KL estimator over a `[B, T]` batch of float32 `logp` (policy) and `ref_logp`
/// (reference) with `log r = ref_logp − logp`: the per-token value into `values`,
/// `∂(coef·aggregate(k))/∂logp` into `grad_logp` and the statistics (float64,
/// [`KL_STATS_WORDS`]) into `stats`, each when given, in one pass on the tensors' device. With
/// float32 `old_logp` (the sampling policy's) each estimate is weighted by `π/π_old`, not
/// detached (the bias-corrected KL).
#[pyfunction]
#[pyo3(signature = (logp, ref_logp, *, mask=None, old_logp=None, values=None, grad_logp=None, stats=None, estimator="k3", coef=1.0, log_ratio_clamp=Some(20.0), value_clamp=Some(10.0), aggregation="token_mean", max_len=0, global_counts=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn sampled_kl(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    ref_logp: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    old_logp: Option<&Bound<'_, PyAny>>,
    values: Option<&Bound<'_, PyAny>>,
    grad_logp: Option<&Bound<'_, PyAny>>,
    stats: Option<&Bound<'_, PyAny>>,
    estimator: &str,
    coef: f32,
    log_ratio_clamp: Option<f32>,
    value_clamp: Option<f32>,
    aggregation: &str,
    max_len: usize,
    global_counts: Option<(f64, f64, f64)>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = SampledKlOptions::new(parse_estimator(estimator)?)
        .coef(coef)
        .log_ratio_clamp(log_ratio_clamp)
        .value_clamp(value_clamp)
        .aggregation(parse_aggregation(aggregation, max_len)?)
        .normaliser(parse_normaliser(global_counts))
        .bias_correction(old_logp.is_some());
    let logp = Dl::import(logp, stream, "logp")?;
    let ref_logp = Dl::import(ref_logp, stream, "ref_logp")?;
    let [mask, old, values, grad] =
        [(mask, "mask"), (old_logp, "old_logp"), (values, "values"), (grad_logp, "grad_logp")]
            .map(|(o, what)| Dl::maybe(o, stream, what));
    let (mask, old, values, grad) = (mask?, old?, values?, grad?);
    let shape = batch_shape(
        &logp,
        &[
            (Some(&ref_logp), Kind::F32),
            (mask.as_ref(), Kind::Byte),
            (old.as_ref(), Kind::F32),
            (values.as_ref(), Kind::F32),
            (grad.as_ref(), Kind::F32),
        ],
    )?;
    let stats = stats_output(stats, stream, KL_STATS_WORDS)?;
    if values.is_none() && grad.is_none() && stats.is_none() {
        return Err(PyValueError::new_err("sampled_kl: give at least one of values, grad_logp, stats"));
    }
    let place = check_together(
        &[Some(&logp), Some(&ref_logp), mask.as_ref(), old.as_ref()],
        &[values.as_ref(), grad.as_ref(), stats.as_ref()],
    )?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no other tensor.
            let (lp, rlp, m, o) = unsafe {
                (
                    logp.elems::<f32>(),
                    ref_logp.elems::<f32>(),
                    mask.as_ref().map(|m| m.bytes()),
                    old.as_ref().map(|o| o.elems::<f32>()),
                )
            };
            // SAFETY: as above; each output is one mutable slice.
            let (v, g, words) = unsafe {
                (
                    values.as_ref().map(|t| t.elems_mut::<f32>()),
                    grad.as_ref().map(|t| t.elems_mut::<f32>()),
                    stats.as_ref().map(|t| t.elems_mut::<f64>()),
                )
            };
            let st = py
                .detach(move || {
                    let out = SampledKlOutputs { values: v, grad_logp: g, ..Default::default() };
                    cpu::sampled_kl(
                        &SampledKlInputs { mask: m, old_logp: o, ..SampledKlInputs::new(shape, lp, rlp) },
                        out,
                        &opts,
                    )
                })
                .map_err(err)?;
            if let Some(w) = words {
                w.copy_from_slice(&raw::sampled_kl_stats_to_words(&st));
            }
            Ok(())
        }
        Place::Cuda(ordinal) => cuda::sampled_kl(
            ordinal,
            stream,
            status,
            shape,
            [&logp, &ref_logp],
            [mask.as_ref(), old.as_ref()],
            [values.as_ref(), grad.as_ref(), stats.as_ref()],
            &opts,
        ),
    }
}

/// KL-in-reward shaping over a `[B, T]` batch: `rewards = −beta·kl` at valid tokens plus each
/// sequence's float32 `scores` entry (`[B]`) on its last valid token, 0 at padding.
#[pyfunction]
#[pyo3(signature = (kl, scores, rewards, *, mask=None, beta, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn kl_rewards(
    py: Python<'_>,
    kl: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    rewards: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    beta: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let kl = Dl::import(kl, stream, "kl")?;
    let rewards = Dl::import(rewards, stream, "rewards")?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    let shape = batch_shape(&kl, &[(Some(&rewards), Kind::F32), (mask.as_ref(), Kind::Byte)])?;
    let scores = Dl::import(scores, stream, "scores")?;
    scores.per_row(&[shape.rows])?.expect(&[Kind::F32])?;
    let place = check_together(&[Some(&kl), Some(&scores), mask.as_ref()], &[Some(&rewards)])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; `rewards` overlaps no other tensor.
            let (k, sc, m, r) = unsafe {
                (
                    kl.elems::<f32>(),
                    scores.elems::<f32>(),
                    mask.as_ref().map(|m| m.bytes()),
                    rewards.elems_mut(),
                )
            };
            let inputs = KlRewardsInputs { mask: m, ..KlRewardsInputs::new(shape, k, sc) };
            py.detach(move || cpu::kl_rewards(&inputs, r, &KlRewardsOptions::new(beta))).map_err(err)
        }
        Place::Cuda(ordinal) => {
            cuda::kl_rewards(ordinal, stream, status, shape, [&kl, &scores], mask.as_ref(), &rewards, beta)
        }
    }
}

/// DAPO's overlong shaping: each float32 score (`[B]`) plus the length penalty of its
/// response (the valid tokens of its `mask` row, `[B, T]` bytes; `T` without a mask) with
/// `L_max = max_len`, `L_buf = buffer_len`, written to `shaped` (`[B]` float32).
#[pyfunction]
#[pyo3(signature = (scores, shaped, *, mask=None, cols=0, max_len, buffer_len, penalty=1.0, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn overlong_shaping(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    shaped: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    cols: usize,
    max_len: usize,
    buffer_len: usize,
    penalty: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = OverlongOptions::new(max_len, buffer_len).penalty(penalty);
    let scores = Dl::import(scores, stream, "scores")?;
    let shaped = Dl::import(shaped, stream, "shaped")?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    let rows = scores.dims.first().copied().unwrap_or(0);
    scores.per_row(&[rows])?.expect(&[Kind::F32])?;
    shaped.per_row(&[rows])?.expect(&[Kind::F32])?;
    // The mask's rows are the sequences; without one every response is `cols` long.
    let shape = match &mask {
        Some(m) => {
            let dims = batch_dims(m)?;
            m.per_row(&dims)?.expect(&[Kind::Byte])?;
            RowShape::new(dims[0], dims[1])
        }
        None => RowShape::new(rows, cols),
    };
    let place = check_together(&[Some(&scores), mask.as_ref()], &[Some(&shaped)])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked here and by the op; `shaped` overlaps no other
            // tensor.
            let (sc, m, out) =
                unsafe { (scores.elems::<f32>(), mask.as_ref().map(|m| m.bytes()), shaped.elems_mut()) };
            let inputs = OverlongInputs { mask: m, ..OverlongInputs::new(shape, sc) };
            py.detach(move || cpu::overlong_shaping(&inputs, out, &opts)).map_err(err)
        }
        Place::Cuda(ordinal) => {
            cuda::overlong_shaping(ordinal, stream, status, shape, &scores, mask.as_ref(), &shaped, &opts)
        }
    }
}

/// The clipped value loss of a `[B, T]` batch (float32 `values`, `old_values`, `returns`):
/// per-token loss into `loss`, `∂loss/∂values` into `grad_values` and the statistics (float64,
/// [`VALUE_STATS_WORDS`]; word 0 is the scalar loss) into `stats`.
#[pyfunction]
#[pyo3(signature = (values, old_values, returns, stats, *, mask=None, loss=None, grad_values=None, clip=None, coef=0.5, aggregation="token_mean", max_len=0, global_counts=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn value_loss(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    old_values: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    loss: Option<&Bound<'_, PyAny>>,
    grad_values: Option<&Bound<'_, PyAny>>,
    clip: Option<f32>,
    coef: f32,
    aggregation: &str,
    max_len: usize,
    global_counts: Option<(f64, f64, f64)>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = ValueLossOptions::default()
        .clip(clip)
        .coef(coef)
        .aggregation(parse_aggregation(aggregation, max_len)?)
        .normaliser(parse_normaliser(global_counts));
    let values = Dl::import(values, stream, "values")?;
    let old = Dl::import(old_values, stream, "old_values")?;
    let ret = Dl::import(returns, stream, "returns")?;
    let [mask, loss, grad] = [(mask, "mask"), (loss, "loss"), (grad_values, "grad_values")]
        .map(|(o, what)| Dl::maybe(o, stream, what));
    let (mask, loss, grad) = (mask?, loss?, grad?);
    let shape = batch_shape(
        &values,
        &[
            (Some(&old), Kind::F32),
            (Some(&ret), Kind::F32),
            (mask.as_ref(), Kind::Byte),
            (loss.as_ref(), Kind::F32),
            (grad.as_ref(), Kind::F32),
        ],
    )?;
    let stats = stats_output(Some(stats), stream, VALUE_STATS_WORDS)?.expect("given");
    let place = check_together(
        &[Some(&values), Some(&old), Some(&ret), mask.as_ref()],
        &[loss.as_ref(), grad.as_ref(), Some(&stats)],
    )?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; the outputs overlap no other tensor.
            let (v, o, r, m) = unsafe {
                (
                    values.elems::<f32>(),
                    old.elems::<f32>(),
                    ret.elems::<f32>(),
                    mask.as_ref().map(|m| m.bytes()),
                )
            };
            // SAFETY: as above; each output is one mutable slice.
            let (l, g, words) = unsafe {
                (
                    loss.as_ref().map(|t| t.elems_mut::<f32>()),
                    grad.as_ref().map(|t| t.elems_mut::<f32>()),
                    stats.elems_mut::<f64>(),
                )
            };
            let st = py
                .detach(move || {
                    let inputs = ValueLossInputs { shape, values: v, old_values: o, returns: r, mask: m };
                    cpu::value_loss(
                        &inputs,
                        ValueLossOutputs { loss: l, grad_values: g, ..Default::default() },
                        &opts,
                    )
                })
                .map_err(err)?;
            words.copy_from_slice(&raw::value_stats_to_words(&st));
            Ok(())
        }
        Place::Cuda(ordinal) => cuda::value_loss(
            ordinal,
            stream,
            status,
            shape,
            [&values, &old, &ret],
            mask.as_ref(),
            [loss.as_ref(), grad.as_ref()],
            &stats,
            &opts,
        ),
    }
}
