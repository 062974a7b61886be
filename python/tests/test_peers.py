"""The loss variants held to the formulas of the peers that ship them, restated here in plain
PyTorch (float64, autograd for the gradients) from the sources read:

- TRL ``trl/trainer/grpo_trainer.py`` at f2cd57710ae345ea6428ae95363267fcf38a3dc8
  (``loss_type="sapo"``: no log-ratio clamp, τ₊ where A > 0, per-sequence token means
  averaged over all B rows; ``use_bias_correction_kl``: the k3 term times the importance
  ratio ``exp(logp − old_logp)``, neither clamped nor detached; ``loss_type="dr_grpo"`` with
  ``scale_rewards="none"``);
- verl ``verl/trainer/ppo/core_algos.py`` at b178a3cd56f58b2d502255daba591e92833930a7
  (``compute_policy_loss_sapo``: log-ratio clamped to ±20, ``agg_loss`` seq-mean-token-mean
  over the non-empty rows; ``compute_policy_loss_geo_mean``: GMPO, one-sided clip of the
  token log-ratios in log space, mean over all B rows).

Each test runs on the CPU, and again on CUDA when a GPU is present.
"""

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.torch import (
    check_status,
    group_advantages,
    kl_stats,
    overlong_shaping,
    policy_loss,
    policy_loss_from_logits,
    policy_stats,
    sampled_kl,
    token_logprobs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and rlhf_kernels.cuda_available() else [])


def close(actual, expected, tol=1e-5):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs() - tol * (1.0 + expected.abs())
    assert err.max().item() <= 0, f"max excess {err.max().item():.3e}"


def batch(device, b=5, t=11, spread=0.6, seed=0):
    """A [B, T] batch with ragged lengths, one empty row, sequence-level advantages (as GRPO
    gives) perturbed per token so that the per-token and sequence forms differ."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4 - 0.05
    logp = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([t, 7, 0, 3, 9][:b])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    # float32 inputs, so that the float64 formulas see exactly what the kernels see
    to = lambda x: x.float().to(device)  # noqa: E731
    return to(logp), to(old), to(adv), mask.to(device)


def ours(logp, old, adv, mask, **options):
    x = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(x, old, adv, mask, **options)
    loss.backward()
    check_status()
    return loss, x.grad, policy_stats(stats)


def exact(logp):
    return logp.detach().double().cpu().requires_grad_(True)


def seq_mean_token_mean(per_token, mask, rows=None):
    """verl's ``agg_loss`` seq-mean-token-mean (over the non-empty rows, or over ``rows``)."""
    m = mask.double()
    n = m.sum(-1)
    seq = (per_token * m).sum(-1) / (n + 1e-8)
    return seq.sum() / (rows if rows is not None else (n > 0).double().sum())


def sapo_gate(ratio, adv, tau_pos, tau_neg):
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_trl(device, tau):
    logp, old, adv, mask = batch(device, spread=1.5)
    b = logp.shape[0]
    valid = mask.sum().item()
    # TRL: ((per_token_loss · mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() over all B rows,
    # which is seq-mean-token-mean with B sequences as the denominator.
    loss, grad, stats = ours(
        logp, old, adv, mask, objective="sapo", tau_pos=tau[0], tau_neg=tau[1], log_ratio_clamp=None,
        aggregation="seq_mean_token_mean", global_counts=(valid, b, b),
    )
    x, a, m = exact(logp), adv.double().cpu(), mask.cpu().double()
    coef_1 = torch.exp(x - old.double().cpu())
    per_token = -sapo_gate(coef_1, a, *tau) * a
    expected = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    expected.backward()
    close(loss, expected)
    close(grad, x.grad)
    assert stats["clip_fraction_low"] == stats["clip_fraction_high"] == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_sapo_matches_verl(device):
    logp, old, adv, mask = batch(device, spread=1.5, seed=1)
    # verl clamps the log-ratio to ±20 and averages over the non-empty rows.
    loss, grad, _ = ours(logp, old, adv, mask, objective="sapo", aggregation="seq_mean_token_mean")
    x, a = exact(logp), adv.double().cpu()
    ratio = torch.exp(torch.clamp(x - old.double().cpu(), min=-20.0, max=20.0))
    expected = seq_mean_token_mean(-sapo_gate(ratio, a, 1.0, 1.05) * a, mask.cpu())
    expected.backward()
    close(loss, expected)
    close(grad, x.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [(0.4, 0.4), (0.1, 0.2)])
def test_gmpo_matches_verl_geo_mean(device, clip):
    logp, old, adv, mask = batch(device, seed=2)
    adv[0, 4] = 0.0  # sign(A) = 0: the token's log-ratio counts as 0
    b = logp.shape[0]
    # verl: torch.mean over all B rows of −Ā·exp(Σ c_t / |y|).
    loss, grad, stats = ours(
        logp, old, adv, mask, objective="gmpo", clip_low=clip[0], clip_high=clip[1],
        aggregation="seq_mean_token_mean", global_counts=(mask.sum().item(), b, b),
    )
    x, a, m = exact(logp), adv.double().cpu(), mask.cpu().double()
    lr = x - old.double().cpu()
    sgn = torch.sign(a)
    lr_min = sgn * torch.min(sgn * lr, sgn * torch.clamp(lr, -clip[0], clip[1]))
    n = m.sum(-1)
    ratio = torch.exp((lr_min * m).sum(-1) / (n + 1e-8))
    mean_adv = (a * m).sum(-1) / (n + 1e-8)
    expected = torch.mean(-mean_adv * ratio)
    expected.backward()
    close(loss, expected)
    close(grad, x.grad)
    # Clip fractions: the tokens the one-sided clip moved (verl's metric also counts the
    # untouched side; see the crate's docs).
    ld, ad, md = lr.detach(), a, mask.cpu()
    high = (md & (ad > 0) & (ld > clip[1])).sum().item() / md.sum().item()
    low = (md & (ad < 0) & (ld < -clip[0])).sum().item() / md.sum().item()
    assert high + low > 0
    assert abs(stats["clip_fraction_high"] - high) < 1e-12
    assert abs(stats["clip_fraction_low"] - low) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_bias_corrected_kl_matches_trl(device):
    logp, old, _, mask = batch(device, seed=3)
    g = torch.Generator().manual_seed(9)
    ref = (logp.double().cpu() + torch.randn(logp.shape, generator=g, dtype=torch.float64) * 0.5).float().to(device)
    b, beta = logp.shape[0], 0.04
    x = logp.clone().requires_grad_(True)
    # TRL's per_token_kl with use_bias_correction_kl, added as β·kl and aggregated as its "grpo"
    # loss (seq-mean-token-mean over all B rows).
    loss, values, stats = sampled_kl(
        x, ref, mask, estimator="k3", coef=beta, log_ratio_clamp=None, value_clamp=None, old_logp=old,
        aggregation="seq_mean_token_mean", global_counts=(mask.sum().item(), b, b),
    )
    loss.backward()
    check_status()
    e, m = exact(logp), mask.cpu().double()
    r, o = ref.double().cpu(), old.double().cpu()
    per_token_kl = torch.exp(r - e) - (r - e) - 1
    per_token_kl = per_token_kl * torch.exp(e - o)
    expected = ((beta * per_token_kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    expected.backward()
    close(loss, expected)
    close(x.grad, e.grad)
    close(values[mask], per_token_kl.detach()[mask.cpu()])
    # Without old_logp the same call is plain k3: another value, and a gradient without the
    # ratio's score term.
    y = logp.clone().requires_grad_(True)
    plain, _, _ = sampled_kl(y, ref, mask, estimator="k3", coef=beta, log_ratio_clamp=None, value_clamp=None,
                             aggregation="seq_mean_token_mean", global_counts=(mask.sum().item(), b, b))
    plain.backward()
    assert abs(plain.item() - kl_stats(stats)["loss"]) > 1e-4
    assert (y.grad - x.grad)[mask].abs().max().item() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_fused_bias_corrected_kl_equals_the_composition(device):
    torch.manual_seed(5)
    b, t, v = 3, 6, 50
    base = torch.randn(b, t, v, device=device) * 2
    targets = torch.randint(0, v, (b, t), device=device)
    mask = torch.arange(t, device=device)[None, :] < torch.tensor([6, 4, 1], device=device)[:, None]
    with torch.no_grad():
        lp = token_logprobs(base, targets)[0]
    old, ref = lp + 0.2 * torch.randn(b, t, device=device), lp + 0.4 * torch.randn(b, t, device=device)
    adv = torch.randn(b, t, device=device)
    kl = dict(kl_estimator="k3", kl_coef=0.1, kl_bias_correction=True)
    fused = base.clone().requires_grad_(True)
    loss, stats = policy_loss_from_logits(fused, targets, old, adv, mask, ref_logp=ref, objective="sapo", **kl)
    loss.backward()
    composed = base.clone().requires_grad_(True)
    logp, entropy = token_logprobs(composed, targets, mask)
    expected, _ = policy_loss(logp, old, adv, mask, entropy=entropy, objective="sapo")
    kl_loss, _, kl_words = sampled_kl(logp, ref, mask, estimator="k3", coef=0.1, old_logp=old)
    (expected + kl_loss).backward()
    check_status()
    close(loss, expected + kl_loss)
    close(fused.grad, composed.grad)
    words = rlhf_kernels.POLICY_STATS_WORDS
    assert abs(kl_stats(stats[words:])["loss"] - kl_stats(kl_words)["loss"]) < 1e-6


def test_variant_options_are_checked():
    logp, old, adv, mask = batch("cpu")
    with pytest.raises(ValueError, match="tau_neg"):
        policy_loss(logp, old, adv, mask, objective="sapo", tau_neg=0.0)
    with pytest.raises(ValueError, match="objective"):
        policy_loss(logp, old, adv, mask, objective="geo_mean")
    with pytest.raises(ValueError, match="old_logp"):
        sampled_kl(logp, old, mask, old_logp=old[:, :3])
    logits, targets = torch.randn(*logp.shape, 7), torch.zeros(logp.shape, dtype=torch.int64)
    with pytest.raises(ValueError, match="kl_bias_correction"):
        policy_loss_from_logits(logits, targets, old, adv, mask, kl_bias_correction=True)


@pytest.mark.parametrize("device", DEVICES)
def test_dr_grpo_matches_trl(device):
    """Dr. GRPO is expressible: TRL's ``scale_rewards="none"`` advantages (``r − group mean``,
    no std) are ``group_advantages(std="none")``, and its ``loss_type="dr_grpo"`` aggregation,
    ``(per_token_loss · mask).sum() / (B · max_completion_length)``, is
    ``aggregation="seq_mean_token_sum_norm"`` with ``max_len = max_completion_length``."""
    logp, old, _, mask = batch(device, seed=4)
    b, t = logp.shape
    g = torch.Generator().manual_seed(11)
    rewards = torch.randn(b, generator=g).to(device)
    ids = [0, 0, 1, 1, 1][:b]
    adv, per_token = group_advantages(rewards, ids, 2, mask, std="none")
    check_status()
    r, i = rewards.double().cpu(), torch.tensor(ids)
    means = torch.stack([r[i == k].mean() for k in range(2)])
    close(adv, r - means[i])
    max_completion_length = t + 5
    loss, grad, _ = ours(
        logp, old, per_token, mask, aggregation="seq_mean_token_sum_norm", max_len=max_completion_length,
    )
    x, a, m = exact(logp), (r - means[i])[:, None].expand(b, t), mask.cpu().double()
    coef_1 = torch.exp(x - old.double().cpu())
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    expected = (per_token_loss * m).sum() / (b * max_completion_length)
    expected.backward()
    close(loss, expected)
    close(grad, x.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_overlong_shaping_matches_verl_dapo(device):
    """verl's DAPO reward manager (``verl/workers/reward_manager/dapo.py`` at b178a3c):
    ``expected_len = max_resp_len − overlong_buffer.len``, ``exceed_len = valid_response_length −
    expected_len``, ``reward += min(−exceed_len / overlong_buffer.len · penalty_factor, 0)``."""
    b, t, max_resp_len, buffer, factor = 6, 40, 40, 16, 0.7
    lengths = torch.tensor([0, 10, 24, 25, 33, 40])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    scores = torch.tensor([1.0, -1.0, 0.5, 0.0, 1.0, 1.0]).to(device)
    shaped = overlong_shaping(scores, mask, max_len=max_resp_len, buffer_len=buffer, penalty=factor)
    check_status()
    expected_len = max_resp_len - buffer
    exceed_len = lengths.double() - expected_len
    overlong_reward = torch.clamp(-exceed_len / buffer * factor, max=0.0)
    close(shaped, scores.double().cpu() + overlong_reward)
    # Without a mask every response has response_len tokens.
    flat = overlong_shaping(scores, max_len=max_resp_len, buffer_len=buffer, response_len=32)
    close(flat, scores.double().cpu() - 8 / 16 * 1.0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_shaping(scores, mask, max_len=8, buffer_len=16)
    with pytest.raises(ValueError, match="response_len"):
        overlong_shaping(scores, max_len=40, buffer_len=16)
