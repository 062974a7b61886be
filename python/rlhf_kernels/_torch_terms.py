"""The per-token loss terms and batch reductions of :mod:`rlhf_kernels.torch`: the sampled KL,
KL-in-reward shaping, the value loss, aggregation, masked moments and whitening."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _native
from ._torch_common import _counts_options, _f32, _f32_keep_grad, _mask, _status, _stream

class _SampledKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, mask, old_logp, options):
        values = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        grad_logp = torch.empty_like(values)
        stats = torch.empty(_native.KL_STATS_WORDS, dtype=torch.float64, device=logp.device)
        _native.sampled_kl(
            logp.detach().contiguous(), ref_logp, mask=mask, old_logp=old_logp, values=values,
            grad_logp=grad_logp, stats=stats, status=_status(logp), stream=_stream(logp), **options,
        )
        ctx.save_for_backward(grad_logp)
        ctx.mark_non_differentiable(values, stats)
        return stats[0].to(torch.float32), values, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_values, _grad_stats):
        (grad_logp,) = ctx.saved_tensors
        return grad_logp * grad_loss.to(torch.float32), None, None, None, None


def sampled_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    estimator: str = "k3",
    coef: float = 1.0,
    log_ratio_clamp: Optional[float] = 20.0,
    value_clamp: Optional[float] = 10.0,
    aggregation: str = "token_mean",
    max_len: int = 0,
    global_counts: Optional[Sequence[float]] = None,
    old_logp: Optional[torch.Tensor] = None,
):
    """A sampled KL estimate over a ``[B, T]`` batch of the sampled tokens' log-probs (float32),
    with ``log r = ref_logp − logp``: ``"k1"`` (``−log r``), ``"k2"`` (``½(log r)²``), ``"k3"``
    (``(r − 1) − log r``) and ``"abs"`` estimate ``KL[π ‖ π_ref]``; ``"k1_rev"`` (``r·log r``) and
    ``"k3_rev"`` (``r·log r − (r − 1)``) estimate ``KL[π_ref ‖ π]``; ``"grad_policy_ref"`` /
    ``"grad_ref_policy"`` have the value of k3 / k3_rev and, in expectation, the gradient of
    ``KL[π ‖ π_ref]`` / ``KL[π_ref ‖ π]``. ``log_ratio_clamp`` bounds ``|log r|`` before any
    ``exp`` and ``value_clamp`` the exp-based values (k3, k1_rev, k3_rev); k1, k2 and abs take
    ``log r`` as it is; no gradient flows where a clamp is active; ``None`` turns a clamp off
    (the defaults, 20 and 10, are verl's).

    With ``old_logp`` (the log-probs of the policy that sampled the tokens: π_old, or the
    inference engine's) each estimate is weighted by ``ρ = exp(logp − old_logp)`` (clamped with
    ``log_ratio_clamp``), ``ρ`` not detached: the bias-corrected KL of DeepSeek-V3.2 and TRL's
    ``use_bias_correction_kl``, whose value estimates the current policy's KL and whose gradient
    includes ``ρ``'s (``∂(ρk)/∂logp = ρ·(∂k/∂logp + k)``).

    Returns ``(loss, values, stats)``: ``loss = coef·aggregate(k)`` (differentiable in ``logp``;
    ``ref_logp`` is a constant), the per-token values (0 at padding) and a float64 statistics
    tensor on the device (:func:`kl_stats` reads it).
    """
    options = dict(
        estimator=estimator, coef=float(coef),
        log_ratio_clamp=None if log_ratio_clamp is None else float(log_ratio_clamp),
        value_clamp=None if value_clamp is None else float(value_clamp),
        **_counts_options(aggregation, max_len, global_counts),
    )
    old = None if old_logp is None else _f32(old_logp, "old_logp")
    return _SampledKl.apply(logp, _f32(ref_logp, "ref_logp"), _mask(mask), old, options)


_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1_rev", "k3_rev", "grad_policy_ref", "grad_ref_policy")


def kl_stats(stats: torch.Tensor) -> dict:
    """The statistics of :func:`sampled_kl` as a dict of floats (reads the device): the loss,
    every estimator aggregated as the loss is (``k1`` ... ``grad_ref_policy``, without
    ``coef``), the fraction of valid tokens where a clamp was active, and the batch's counts."""
    w = stats.tolist()
    out = {"loss": w[0]}
    out.update(zip(_ESTIMATORS, w[1:9]))
    out.update(clamped_fraction=w[9], valid_tokens=w[10], valid_sequences=w[11], sequences=w[12])
    return out


def kl_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor] = None, *, beta: float):
    """KL-in-reward shaping (InstructGPT): ``−beta·kl`` at every valid token of a ``[B, T]``
    batch plus each sequence's score (``[B]``) on its last valid token, 0 at padding. No
    gradient (rewards are constants of the policy update)."""
    rewards = torch.empty(kl.shape, dtype=torch.float32, device=kl.device)
    _native.kl_rewards(
        _f32(kl, "kl"), _f32(scores, "scores"), rewards, mask=_mask(mask), beta=float(beta),
        status=_status(kl), stream=_stream(kl),
    )
    return rewards


def overlong_shaping(
    scores: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    max_len: int,
    buffer_len: int,
    penalty: float = 1.0,
    response_len: Optional[int] = None,
):
    """DAPO's overlong reward shaping (verl's ``overlong_buffer``): each sequence's score
    (``[B]``) plus ``−penalty·(L − (max_len − buffer_len))/buffer_len`` for a response of ``L``
    valid tokens inside the band ``(max_len − buffer_len, max_len]``, 0 before it and
    ``−penalty`` beyond. ``L`` is the row's valid tokens of ``mask`` (``[B, T]``), or
    ``response_len`` for every sequence without one. Returns the shaped ``[B]`` scores (no
    gradient: scores are constants of the policy update)."""
    if mask is None and response_len is None:
        raise ValueError("overlong_shaping: give the response mask, or response_len without one")
    shaped = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    _native.overlong_shaping(
        _f32(scores, "scores"), shaped, mask=_mask(mask), cols=int(response_len or 0), max_len=int(max_len),
        buffer_len=int(buffer_len), penalty=float(penalty), status=_status(scores), stream=_stream(scores),
    )
    return shaped


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, options):
        stats = torch.empty(_native.VALUE_STATS_WORDS, dtype=torch.float64, device=values.device)
        grad_values = torch.empty(values.shape, dtype=torch.float32, device=values.device)
        _native.value_loss(
            values.detach().contiguous(), old_values, returns, stats, mask=mask, grad_values=grad_values,
            status=_status(values), stream=_stream(values), **options,
        )
        ctx.save_for_backward(grad_values)
        ctx.mark_non_differentiable(stats)
        return stats[0].to(torch.float32), stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        (grad_values,) = ctx.saved_tensors
        return grad_values * grad_loss.to(torch.float32), None, None, None, None


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip: Optional[float] = None,
    coef: float = 0.5,
    aggregation: str = "token_mean",
    max_len: int = 0,
    global_counts: Optional[Sequence[float]] = None,
):
    """The clipped value loss of a ``[B, T]`` batch (float32): per token
    ``½·max((v − R)², (v_clip − R)²)`` with ``v_clip = old + clamp(v − old, −clip, clip)`` (no
    clipping with ``clip=None``), aggregated and scaled by ``coef``.

    Returns ``(loss, stats)``: the scalar loss (differentiable in ``values``) and a float64
    statistics tensor on the device (:func:`value_stats` reads it)."""
    options = dict(clip=None if clip is None else float(clip), coef=float(coef),
                   **_counts_options(aggregation, max_len, global_counts))
    return _ValueLoss.apply(
        values, _f32(old_values, "old_values"), _f32(returns, "returns"), _mask(mask), options
    )


def value_stats(stats: torch.Tensor) -> dict:
    """The statistics of :func:`value_loss` as a dict of floats (reads the device)."""
    return dict(zip(("loss", "clip_fraction", "valid_tokens", "valid_sequences", "sequences"), stats.tolist()))


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, mask, options):
        out = torch.empty(4, dtype=torch.float64, device=values.device)
        _native.aggregate(values.detach().contiguous(), out, mask=mask, status=_status(values),
                          stream=_stream(values), **options)
        ctx.save_for_backward(mask, out)
        ctx.options = options
        ctx.shape = values.shape
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        mask, out = ctx.saved_tensors
        o = ctx.options
        m = torch.ones(ctx.shape, dtype=torch.float64, device=out.device) if mask is None else mask.double()
        counts = o["global_counts"]
        tokens, seqs_valid, seqs = (
            (out[1], out[2], out[3]) if counts is None
            else (torch.tensor(c, dtype=torch.float64, device=out.device) for c in counts)
        )
        agg = o["aggregation"]
        if agg == "token_mean":
            denominator = tokens.expand(ctx.shape[0], 1)
        elif agg == "seq_mean_token_sum":
            denominator = seqs_valid.expand(ctx.shape[0], 1)
        elif agg == "seq_mean_token_mean":
            denominator = seqs_valid * m.sum(-1, keepdim=True)
        else:
            denominator = (seqs * o["max_len"]).expand(ctx.shape[0], 1)
        weight = torch.where(denominator > 0, 1.0 / denominator.clamp_min(1e-300), torch.zeros_like(denominator))
        return (m * weight * grad).to(torch.float32), None, None


def aggregate(
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    aggregation: str = "token_mean",
    max_len: int = 0,
    global_counts: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Aggregates per-token values of a ``[B, T]`` batch (float32) over its valid tokens, as
    the losses do: ``"token_mean"`` (over the batch's valid tokens), ``"seq_mean_token_sum"``,
    ``"seq_mean_token_mean"``, ``"seq_mean_token_sum_norm"`` (each sequence's sum over
    ``max_len``); ``global_counts`` as in :func:`policy_loss`. Returns a float64 scalar on the
    device, differentiable in ``values`` (the gradient of each valid token is its weight)."""
    return _Aggregate.apply(_f32_keep_grad(values, "values"), _mask(mask),
                            _counts_options(aggregation, max_len, global_counts))


_MOMENTS = ("count", "mean", "var", "min", "max")


def masked_moments(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
    """Count, mean, unbiased variance, min and max of the valid tokens of a ``[B, T]`` batch
    (float64, deterministic), as a dict of 0-d float64 tensors on the device (no
    synchronisation)."""
    out = torch.empty(5, dtype=torch.float64, device=values.device)
    _native.masked_moments(_f32(values, "values"), out, mask=_mask(mask), status=_status(values),
                           stream=_stream(values))
    return dict(zip(_MOMENTS, out.unbind()))


def whiten(values: torch.Tensor, mask: Optional[torch.Tensor] = None, *, keep_mean: bool = False,
           eps: float = 1e-8) -> torch.Tensor:
    """Whitening over the valid tokens of a ``[B, T]`` batch (verl's ``masked_whiten``):
    ``(x − mean)/sqrt(var + eps)`` with the unbiased variance, the mean added back with
    ``keep_mean``; padding becomes 0. Returns a new float32 tensor (no gradient: advantages are
    constants of the update)."""
    out = _f32(values, "values").clone()
    moments = torch.empty(5, dtype=torch.float64, device=values.device)
    _native.whiten(out, moments, mask=_mask(mask), keep_mean=keep_mean, eps=float(eps),
                   status=_status(values), stream=_stream(values))
    return out
