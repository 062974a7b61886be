"""PyTorch functions backed by rlhf-kernels, with autograd.

Every function takes tensors on the CPU or a CUDA device, allocates its outputs with PyTorch
(the kernels write into them through DLPack: nothing is copied), runs on the current CUDA
stream and never synchronises. Rows the GPU kernels cannot process (a NaN logit, a row of only
``-inf``) are recorded on the device; :func:`check_status` raises them (once per training step
is enough). On the CPU they raise at once.

Replacing ``log_softmax(...).gather(...)`` in a trainer::

    from rlhf_kernels.torch import token_logprobs
    logp, entropy = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=0.7)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, entropy=entropy)
    loss.backward()
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _native
from ._torch_common import _counts_options, _f32, _mask, _rows, _status, _stream, check_status
from ._torch_terms import (
    aggregate,
    kl_rewards,
    kl_stats,
    masked_moments,
    overlong_shaping,
    sampled_kl,
    value_loss,
    value_stats,
    whiten,
)

__all__ = [
    "token_logprobs",
    "exact_kl",
    "policy_loss",
    "policy_stats",
    "policy_loss_from_logits",
    "sampled_kl",
    "kl_stats",
    "kl_rewards",
    "overlong_shaping",
    "value_loss",
    "value_stats",
    "aggregate",
    "masked_moments",
    "whiten",
    "gae",
    "group_advantages",
    "check_status",
]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, ignore_index):
        lead = logits.shape[:-1]
        logp = torch.empty(lead, dtype=torch.float32, device=logits.device)
        entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
        _native.token_logprobs(
            logits.detach(), targets, mask=mask, logp=logp, entropy=entropy, lse=lse,
            temperature=temperature, ignore_index=ignore_index,
            status=_status(logits), stream=_stream(logits),
        )
        ctx.save_for_backward(logits, targets, mask, lse, entropy)
        ctx.options = (temperature, ignore_index)
        # An unused output's gradient stays None, and the backward skips its term.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, mask, lse, entropy = ctx.saved_tensors
        temperature, ignore_index = ctx.options
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad = torch.empty_strided(logits.size(), logits.stride(), dtype=logits.dtype, device=logits.device)
        _native.token_logprobs_backward(
            logits.detach(), targets, lse.detach(), grad, mask=mask, entropy=entropy.detach(),
            grad_logp=None if grad_logp is None else grad_logp.contiguous(),
            grad_entropy=None if grad_entropy is None else grad_entropy.contiguous(),
            temperature=temperature, ignore_index=ignore_index,
            status=_status(logits), stream=_stream(logits),
        )
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: Optional[int] = None,
):
    """``log_softmax(logits / temperature).gather(-1, targets)`` and the entropy of every row,
    in nats, as float32 tensors shaped like ``targets``, without materialising the softmax.

    ``logits``: ``[..., V]`` float32 / bfloat16 / float16, any view with a unit stride on the
    last dimension (``logits[:, :-1]`` is read in place). ``targets``: int64 / int32 ids.
    Rows with ``mask`` false or ``target == ignore_index`` give 0 and no gradient. Both outputs
    are differentiable in ``logits``.
    """
    targets = targets.detach().contiguous()
    return _TokenLogprobs.apply(_rows(logits), targets, _mask(mask), float(temperature), ignore_index)


class _ExactKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy, reference, mask, divergence, jsd_beta, temperature):
        lead = policy.shape[:-1]
        value = torch.empty(lead, dtype=torch.float32, device=policy.device)
        policy_lse, ref_lse, term = (torch.empty_like(value) for _ in range(3))
        options = dict(divergence=divergence, jsd_beta=jsd_beta, temperature=temperature)
        _native.exact_kl(
            policy.detach(), reference, mask=mask, value=value, policy_lse=policy_lse, ref_lse=ref_lse,
            policy_term=term, status=_status(policy), stream=_stream(policy), **options,
        )
        ctx.save_for_backward(policy, reference, mask, value, policy_lse, ref_lse, term)
        ctx.options = options
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        policy, reference, mask, value, policy_lse, ref_lse, term = ctx.saved_tensors
        out = torch.empty_strided(policy.size(), policy.stride(), dtype=policy.dtype, device=policy.device)
        _native.exact_kl_backward(
            policy.detach(), reference, grad.contiguous(), policy_lse.detach(), ref_lse.detach(), out, mask=mask,
            value=value.detach(), policy_term=term.detach(), status=_status(policy), stream=_stream(policy),
            **ctx.options,
        )
        return out, None, None, None, None, None


def exact_kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    divergence: str = "policy_ref",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The exact divergence between the two next-token distributions of every row, over the
    whole vocabulary, in nats (float32, shaped like the leading dimensions).

    ``divergence``: ``"policy_ref"`` = KL[π ‖ π_ref], ``"ref_policy"`` = KL[π_ref ‖ π], ``"jsd"``
    (β·KL[p ‖ m] + (1 − β)·KL[q ‖ m], m = β·p + (1 − β)·q, β = ``jsd_beta``). Differentiable in
    ``policy_logits``; the reference is a constant.
    """
    return _ExactKl.apply(
        _rows(policy_logits), ref_logits.detach(), _mask(mask), divergence, float(jsd_beta), float(temperature)
    )


def _policy_options(
    objective, beta, tau, clip_low, clip_high, dual_clip, log_ratio_clamp, entropy_coef, aggregation, max_len,
    global_counts,
) -> dict:
    """The native policy-loss keywords (shared by :func:`policy_loss` and the fused path)."""
    return dict(
        objective=objective, beta=float(beta), tau_pos=float(tau[0]), tau_neg=float(tau[1]),
        clip_low=float(clip_low), clip_high=float(clip_high),
        dual_clip=dual_clip, log_ratio_clamp=None if log_ratio_clamp is None else float(log_ratio_clamp),
        entropy_coef=float(entropy_coef), **_counts_options(aggregation, max_len, global_counts),
    )


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, mask, options):
        stats = torch.empty(_native.POLICY_STATS_WORDS, dtype=torch.float64, device=logp.device)
        grad_logp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        grad_entropy = None if entropy is None else torch.empty_like(grad_logp)
        _native.policy_loss(
            logp.detach().contiguous(), old_logp, advantages, stats, mask=mask,
            entropy=None if entropy is None else entropy.detach().contiguous(),
            grad_logp=grad_logp, grad_entropy=grad_entropy,
            status=_status(logp), stream=_stream(logp), **options,
        )
        ctx.save_for_backward(grad_logp, grad_entropy)
        ctx.mark_non_differentiable(stats)
        return stats[0].to(torch.float32), stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        grad_logp, grad_entropy = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        return (
            grad_logp * scale,
            None if grad_entropy is None else grad_entropy * scale,
            None, None, None, None,
        )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    entropy: Optional[torch.Tensor] = None,
    objective: str = "clip",
    beta: float = 0.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = 20.0,
    entropy_coef: float = 0.0,
    aggregation: str = "token_mean",
    max_len: int = 0,
    global_counts: Optional[Sequence[float]] = None,
):
    """The PPO / GRPO policy loss of a ``[B, T]`` batch (float32), with its statistics.

    ``objective``: ``"clip"`` (per token ``max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))``,
    ``r = exp(logp − old_logp)``, optional dual clip), ``"kl_penalty"`` (``−A·r + β·KL[π_old ‖ π]``),
    ``"gspo"``, ``"cispo"``, ``"sapo"`` (the soft gate ``−A·(4/τ)·σ(τ·(r − 1))``, ``τ = tau_pos``
    where ``A > 0``, else ``tau_neg``: TRL's and verl's ``sapo``), ``"gmpo"`` (the geometric-mean
    ratio of the sequence, each token's log-ratio clipped one-sided in log space by
    ``clip_low`` / ``clip_high``: verl's ``geo_mean``); ``aggregation``: ``"token_mean"``, ``"seq_mean_token_sum"``,
    ``"seq_mean_token_mean"``, ``"seq_mean_token_sum_norm"`` (with ``max_len``);
    ``global_counts``: ``(valid_tokens, valid_sequences, sequences)`` of the whole batch when
    this is a micro-batch. With ``entropy`` the bonus ``−entropy_coef·H`` is included.

    Returns ``(loss, stats)``: the scalar loss (differentiable in ``logp`` and ``entropy``) and
    a float64 tensor of statistics on the device; :func:`policy_stats` reads it.
    """
    options = _policy_options(
        objective, beta, (tau_pos, tau_neg), clip_low, clip_high, dual_clip, log_ratio_clamp, entropy_coef,
        aggregation, max_len, global_counts,
    )
    return _PolicyLoss.apply(
        logp, entropy, _f32(old_logp, "old_logp"), _f32(advantages, "advantages"), _mask(mask), options
    )


class _PolicyLossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old_logp, advantages, mask, ref_logp, options):
        stats = torch.zeros(_native.FUSED_STATS_WORDS, dtype=torch.float64, device=logits.device)
        grad = torch.empty_strided(logits.size(), logits.stride(), dtype=logits.dtype, device=logits.device)
        workspace = None
        if logits.is_cuda:
            dtype = str(logits.dtype).removeprefix("torch.")
            need = _native.fused_workspace_bytes(targets.numel(), logits.shape[-1], dtype, tuple(targets.shape))
            workspace = torch.empty(max(need, 16), dtype=torch.uint8, device=logits.device)
        _native.policy_loss_from_logits(
            logits.detach(), targets, old_logp, advantages, grad, stats, mask=mask, ref_logp=ref_logp,
            workspace=workspace, status=_status(logits), stream=_stream(logits), **options,
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        total = stats[0] + stats[_native.POLICY_STATS_WORDS]  # the KL words are 0 without a term
        return total.to(torch.float32), stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    kl_estimator: str = "grad_policy_ref",
    kl_coef: float = 1.0,
    kl_log_ratio_clamp: Optional[float] = 20.0,
    kl_value_clamp: Optional[float] = 10.0,
    kl_bias_correction: bool = False,
    temperature: float = 1.0,
    objective: str = "clip",
    beta: float = 0.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = 20.0,
    entropy_coef: float = 0.0,
    aggregation: str = "token_mean",
    max_len: int = 0,
    global_counts: Optional[Sequence[float]] = None,
):
    """The policy loss straight from the policy logits ``[B, T, V]``: :func:`token_logprobs`,
    :func:`policy_loss` (with the entropy bonus) and, with ``ref_logp``, a :func:`sampled_kl`
    loss term (``kl_estimator``, ``kl_coef``, aggregated as the policy loss) fused, the gradient
    w.r.t. the logits computed in the forward (two passes over the logits, no ``[N, V]``
    softmax) and scaled in the backward. ``targets``, ``old_logp``, ``advantages``, ``mask`` and
    ``ref_logp`` are ``[B, T]``; padding comes from ``mask`` only (no ignore index). Logits that
    are not one block of evenly spaced rows (``logits[:, :-1]`` of a ``[B, T + 1, V]`` tensor)
    are copied first. ``kl_bias_correction`` weights the KL term by ``π/π_old`` with
    ``old_logp`` (see :func:`sampled_kl`).

    Returns ``(loss, stats)``: the total loss (differentiable in ``logits``) and a float64
    tensor on the device: ``stats[:POLICY_STATS_WORDS]`` reads with :func:`policy_stats`,
    ``stats[POLICY_STATS_WORDS:]`` with :func:`kl_stats` (zeros without a KL term).
    """
    if logits.dim() != 3 or targets.dim() != 2 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected [B, T, V] and [B, T]"
        )
    b, t, _ = logits.shape
    one_block = b == 1 or t == 1 or logits.stride(0) == t * logits.stride(1)
    if logits.stride(2) != 1 or not one_block:
        logits = logits.contiguous()
    options = dict(
        temperature=float(temperature), kl_estimator=kl_estimator, kl_coef=float(kl_coef),
        kl_log_ratio_clamp=None if kl_log_ratio_clamp is None else float(kl_log_ratio_clamp),
        kl_value_clamp=None if kl_value_clamp is None else float(kl_value_clamp),
        kl_bias_correction=bool(kl_bias_correction),
        **_policy_options(
            objective, beta, (tau_pos, tau_neg), clip_low, clip_high, dual_clip, log_ratio_clamp, entropy_coef,
            aggregation, max_len, global_counts,
        ),
    )
    return _PolicyLossFromLogits.apply(
        logits, targets.detach().contiguous(), _f32(old_logp, "old_logp"), _f32(advantages, "advantages"),
        _mask(mask), None if ref_logp is None else _f32(ref_logp, "ref_logp"), options,
    )


_STAT_NAMES = (
    "loss", "policy_loss", "entropy_loss", "clip_fraction_low", "clip_fraction_high",
    "dual_clip_fraction", "approx_kl_k1", "approx_kl_k3", "ratio_mean", "ratio_min", "ratio_max",
    "entropy_mean", "valid_tokens", "valid_sequences", "sequences",
)


def policy_stats(stats: torch.Tensor) -> dict:
    """The statistics of :func:`policy_loss` as a dict of floats (reads the device)."""
    return dict(zip(_STAT_NAMES, stats.tolist()))


def gae(
    rewards: Optional[torch.Tensor] = None,
    values: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    scores: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    reset_masked: bool = False,
):
    """Generalised advantage estimation over a ``[B, T]`` batch (float32): returns
    ``(advantages, returns)``. The reward of a token is ``rewards − beta·kl`` plus, on each
    sequence's last valid token, its ``scores`` entry; ``values=None`` gives discounted returns.
    Masked positions pass the recursion through (verl), or reset it with ``reset_masked``."""
    like = next((t for t in (rewards, kl, values, mask) if t is not None), None)
    if like is None:
        raise ValueError("gae: give rewards, kl, values or mask (a [B, T] tensor)")
    advantages = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    returns = torch.empty_like(advantages)
    _native.gae(
        advantages=advantages, returns=returns, rewards=_f32(rewards, "rewards"), kl=_f32(kl, "kl"),
        beta=float(beta), scores=_f32(scores, "scores"), values=_f32(values, "values"), mask=_mask(mask),
        gamma=float(gamma), lam=float(lam), reset_masked=reset_masked,
        status=_status(like), stream=_stream(like),
    )
    return advantages, returns


def group_advantages(
    scores: torch.Tensor,
    group_ids,
    num_groups: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    estimator: str = "grpo",
    std: str = "unbiased",
    eps: float = 1e-6,
):
    """Outcome advantages over groups of responses to the same prompt: ``"grpo"``
    (``(s − mean)/(std + eps)``, ``std`` ``"unbiased"`` / ``"biased"`` / ``"none"``), ``"rloo"``
    or ``"group_mean"``. ``group_ids``: one group index per sequence, a CPU integer tensor
    (read in place) or a list; a CUDA tensor is copied to the host (a synchronisation). Returns the
    ``[B]`` advantages, and with a ``[B, T]`` ``mask`` also the per-token ``[B, T]`` tensor
    (0 at padding) as a second value."""
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.detach().to("cpu").contiguous()
        count = ids.numel()
        if num_groups is None:
            num_groups = int(ids.max()) + 1 if count else 0
    else:
        ids = list(group_ids)
        count = len(ids)
        if num_groups is None:
            num_groups = max(ids) + 1 if ids else 0
    per_sequence = torch.empty(count, dtype=torch.float32, device=scores.device)
    mask = _mask(mask)
    per_token = None if mask is None else torch.empty(mask.shape, dtype=torch.float32, device=scores.device)
    _native.group_advantages(
        _f32(scores, "scores"), ids, num_groups, per_sequence=per_sequence, per_token=per_token, mask=mask,
        estimator=estimator, std=std, eps=float(eps), status=_status(scores), stream=_stream(scores),
    )
    return per_sequence if per_token is None else (per_sequence, per_token)
