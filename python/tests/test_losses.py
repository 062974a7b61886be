"""The per-token loss terms and batch reductions of rlhf_kernels.torch (sampled KL, KL-in-reward
shaping, the value loss, aggregation, masked moments, whitening) against plain PyTorch formulas
in float64: values, gradients through autograd, statistics and error paths; the fused path from
logits against the composition of the package's own ops. Runs on the CPU, and again on CUDA
when a GPU is present."""

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.torch import (
    aggregate,
    check_status,
    kl_rewards,
    kl_stats,
    masked_moments,
    policy_loss,
    policy_loss_from_logits,
    policy_stats,
    sampled_kl,
    token_logprobs,
    value_loss,
    value_stats,
    whiten,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and rlhf_kernels.cuda_available() else [])
AGGREGATIONS = ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs() - (tol + tol * expected.abs())
    assert err.max().item() <= 0, f"max excess {err.max().item():.3e}"


def batch(b=5, t=9, device="cpu", seed=0):
    """Log-probs, a nearby reference and a ragged mask with one empty sequence."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 6
    ref = logp + torch.randn(b, t, generator=g) * 0.5
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[1] = 0
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return logp.to(device), ref.to(device), mask.to(device)


def reference_aggregate(x, mask, aggregation, max_len=0):
    """verl's agg_loss over float64 values (masked tokens are 0 there)."""
    m = mask.double()
    x = x.double() * m
    if aggregation == "token_mean":
        return x.sum() / m.sum().clamp_min(1)
    rows = m.sum(-1)
    valid = rows > 0
    n_valid = valid.sum().clamp_min(1)
    if aggregation == "seq_mean_token_sum":
        return x.sum(-1)[valid].sum() / n_valid
    if aggregation == "seq_mean_token_mean":
        return (x.sum(-1)[valid] / rows[valid]).sum() / n_valid
    return x.sum() / (x.shape[0] * max_len)


def reference_k(logp, ref, name):
    lr = ref.double() - logp.double()
    r = lr.exp()
    return {
        "k1": -lr, "k2": 0.5 * lr * lr, "k3": (r - 1) - lr, "abs": lr.abs(),
        "k1_rev": r * lr, "k3_rev": r * lr - (r - 1),
    }[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1_rev", "k3_rev"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_sampled_kl_values_gradients_and_stats(device, estimator, aggregation):
    logp, ref, mask = batch(device=device, seed=len(estimator))
    x = logp.clone().requires_grad_(True)
    loss, values, stats = sampled_kl(x, ref, mask, estimator=estimator, coef=0.3,
                                     aggregation=aggregation, max_len=12)
    loss.backward()
    check_status()
    exact = logp.double().requires_grad_(True)
    k = reference_k(exact, ref, estimator)
    ref_loss = 0.3 * reference_aggregate(k, mask, aggregation, max_len=12)
    ref_loss.backward()
    close(loss, ref_loss)
    close(values, torch.where(mask, k, torch.zeros_like(k)))
    close(x.grad, exact.grad)
    s = kl_stats(stats)
    assert s["valid_tokens"] == mask.sum().item() and s["sequences"] == mask.shape[0]
    close(s["loss"], ref_loss)
    for name in ["k1", "k3", "k3_rev"]:
        close(s[name], reference_aggregate(reference_k(logp, ref, name), mask, aggregation, max_len=12))


def test_sampled_kl_clamps_and_errors():
    logp, ref, mask = batch(seed=3)
    ref = ref.clone()
    ref[0, 0] = logp[0, 0] + 30.0
    mask[0, 0] = True
    x = logp.clone().requires_grad_(True)
    # k3 at log r = 30: log r clamped to 5 before the exp, then (with the value clamp off)
    # e^5 − 1 − 5; k2 takes log r as it is.
    loss, values, stats = sampled_kl(x, ref, mask, estimator="k3", log_ratio_clamp=5.0, value_clamp=None)
    loss.backward()
    assert values[0, 0].item() == pytest.approx(float(torch.tensor(5.0).exp()) - 6.0, rel=1e-6)
    assert x.grad[0, 0].item() == 0.0, "no gradient past the clamp"
    assert kl_stats(stats)["clamped_fraction"] > 0
    _, values, _ = sampled_kl(logp, ref, mask, estimator="k3")
    assert values[0, 0].item() == 10.0, "the default value clamp (verl's k3 clamp)"
    _, values, _ = sampled_kl(logp, ref, mask, estimator="k2", log_ratio_clamp=5.0)
    assert values[0, 0].item() == pytest.approx(450.0)
    with pytest.raises(ValueError, match="estimator"):
        sampled_kl(logp, ref, mask, estimator="forward")
    with pytest.raises(TypeError, match="ref_logp"):
        sampled_kl(logp, ref.double(), mask)
    bad = logp.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        sampled_kl(bad, ref, torch.ones_like(mask))


@pytest.mark.parametrize("device", DEVICES)
def test_kl_rewards(device):
    logp, ref, mask = batch(device=device, seed=4)
    kl = (logp - ref).contiguous()
    scores = torch.arange(mask.shape[0], dtype=torch.float32, device=device)
    rewards = kl_rewards(kl, scores, mask, beta=0.1)
    check_status()
    expected = torch.where(mask, -0.1 * kl.double(), torch.zeros_like(kl, dtype=torch.float64))
    for i, n in enumerate(mask.sum(-1).tolist()):
        if n > 0:
            expected[i, n - 1] += scores[i].item()
    close(rewards, expected)
    with pytest.raises(ValueError, match="row 0"):
        kl_rewards(kl, torch.full_like(scores, float("nan")), mask, beta=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_value_loss(device, clip, aggregation):
    g = torch.Generator().manual_seed(5)
    _, _, mask = batch(device=device, seed=5)
    values = torch.randn(mask.shape, generator=g).to(device)
    old = (values + torch.randn(mask.shape, generator=g) * 0.3).to(device)
    returns = torch.randn(mask.shape, generator=g).to(device)
    v = values.clone().requires_grad_(True)
    loss, stats = value_loss(v, old, returns, mask, clip=clip, coef=0.5, aggregation=aggregation, max_len=12)
    loss.backward()
    check_status()
    exact = values.double().requires_grad_(True)
    err = (exact - returns.double()) ** 2
    if clip is not None:
        clipped = old.double() + (exact - old.double()).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns.double()) ** 2)
    ref_loss = 0.5 * reference_aggregate(0.5 * err, mask, aggregation, max_len=12)
    ref_loss.backward()
    close(loss, ref_loss)
    close(v.grad, exact.grad)
    s = value_stats(stats)
    assert s["valid_tokens"] == mask.sum().item()
    close(s["loss"], ref_loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregate_and_its_gradient(device, aggregation):
    logp, _, mask = batch(device=device, seed=6)
    x = logp.clone().requires_grad_(True)
    value = aggregate(x, mask, aggregation=aggregation, max_len=12)
    value.backward()
    check_status()
    exact = logp.double().requires_grad_(True)
    expected = reference_aggregate(exact, mask, aggregation, max_len=12)
    expected.backward()
    assert value.dtype == torch.float64
    close(value, expected)
    close(x.grad, exact.grad)
    # Global counts: the micro-batch's share of the whole batch's loss.
    value = aggregate(logp, mask, aggregation="token_mean", global_counts=(100.0, 10.0, 10.0))
    close(value, (logp.double() * mask).sum() / 100.0)
    bad = logp.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        aggregate(bad, torch.ones_like(mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep_mean", [False, True])
def test_moments_and_whiten(device, keep_mean):
    logp, _, mask = batch(device=device, seed=7)
    m = masked_moments(logp, mask)
    valid = logp[mask].double()
    close(m["count"], valid.numel())
    close(m["mean"], valid.mean())
    close(m["var"], valid.var())
    close(m["min"], valid.min())
    close(m["max"], valid.max())
    w = whiten(logp, mask, keep_mean=keep_mean)
    check_status()
    expected = (valid - valid.mean()) / (valid.var() + 1e-8).sqrt() + (valid.mean() if keep_mean else 0.0)
    close(w[mask], expected)
    assert (w[~mask] == 0).all()
    assert not torch.equal(w, logp), "whiten returns a new tensor, the input is kept"
    with pytest.raises(TypeError, match="values"):
        masked_moments(logp.double(), mask)


FUSED_OBJECTIVES = [
    dict(dual_clip=3.0),
    dict(objective="sapo", tau_pos=0.8, tau_neg=1.3),
    dict(objective="gmpo", clip_low=0.3, clip_high=0.4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", FUSED_OBJECTIVES, ids=["clip", "sapo", "gmpo"])
def test_policy_loss_from_logits_equals_the_composition(device, with_kl, dtype, objective):
    """The fused path's loss, gradient w.r.t. the logits and statistics equal token_logprobs →
    policy_loss (+ sampled_kl) → autograd, on the same logits, for the clipped surrogate and the
    sequence (GMPO) and soft-gate (SAPO) variants; a causal-shift view is copied."""
    torch.manual_seed(3)
    b, t, v = 3, 6, 77
    base = (torch.randn(b, t + 1, v) * 2).to(device=device, dtype=dtype)
    logp_ref, ref, mask = batch(b, t, device, seed=4)
    targets = torch.randint(0, v, (b, t), device=device)
    old = logp_ref - 1.0
    adv = torch.randn(b, t, device=device)
    options = dict(entropy_coef=0.01, aggregation="seq_mean_token_mean", **objective)
    kl = dict(ref_logp=ref, kl_estimator="grad_policy_ref", kl_coef=0.1) if with_kl else {}

    fused_logits = base.clone().requires_grad_(True)
    loss, stats = policy_loss_from_logits(
        fused_logits[:, :-1], targets, old, adv, mask, temperature=0.9, **kl, **options
    )
    loss.backward()

    composed_logits = base.clone().requires_grad_(True)
    logp, entropy = token_logprobs(composed_logits[:, :-1], targets, mask, temperature=0.9)
    expected, expected_stats = policy_loss(logp, old, adv, mask, entropy=entropy, **options)
    if with_kl:
        kl_loss, _, expected_kl = sampled_kl(
            logp, ref, mask, estimator="grad_policy_ref", coef=0.1, aggregation="seq_mean_token_mean"
        )
        expected = expected + kl_loss
    expected.backward()
    check_status(device)

    close(loss, expected, 1e-5)
    scale = composed_logits.grad.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    close(fused_logits.grad / scale, composed_logits.grad / scale, tol)
    words = rlhf_kernels.POLICY_STATS_WORDS
    got, want = policy_stats(stats[:words]), policy_stats(expected_stats)
    assert got["valid_tokens"] == want["valid_tokens"] and got["sequences"] == want["sequences"]
    close(got["clip_fraction_high"], want["clip_fraction_high"])
    if with_kl:
        close(kl_stats(stats[words:])["loss"], kl_stats(expected_kl)["loss"])
    else:
        assert stats[words:].abs().sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_policy_loss_from_logits_bad_input_raises(device):
    logits = torch.randn(2, 3, 10, device=device)
    targets = torch.randint(0, 10, (2, 3), device=device)
    old, adv = torch.zeros(2, 3, device=device), torch.ones(2, 3, device=device)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss_from_logits(logits, targets, old[:, :2], adv)
    with pytest.raises(ValueError, match="expected"):
        policy_loss_from_logits(logits[:1], targets, old, adv)
    with pytest.raises(ValueError, match="expected"):
        policy_loss_from_logits(logits[0], targets[0], old[0], adv[0])
    # No ignore index: an unmasked -100 is out of range (on the GPU, reported by the status).
    for bad_id in (10, -100):
        bad = targets.clone()
        bad[1, 2] = bad_id
        with pytest.raises(ValueError, match="target"):
            policy_loss_from_logits(logits, bad, old, adv)
            check_status(device)


def test_native_fused_path_checks_its_outputs():
    """The native layer refuses a gradient of another layout, a statistics tensor of the wrong
    size and a workspace that is not one contiguous run of bytes; a bad KL estimator name is an
    error even without a KL term."""
    from rlhf_kernels import _native

    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    old, adv = torch.zeros(2, 3), torch.ones(2, 3)
    stats = torch.zeros(_native.FUSED_STATS_WORDS, dtype=torch.float64)
    grad = torch.empty_like(logits)
    _native.policy_loss_from_logits(logits, targets, old, adv, grad, stats)
    assert stats[_native.POLICY_STATS_WORDS:].abs().sum().item() == 0  # written only with a KL term
    with pytest.raises(ValueError, match="grad_logits"):
        _native.policy_loss_from_logits(logits, targets, old, adv, torch.empty(2, 3, 12)[..., :10], stats)
    with pytest.raises(ValueError, match="stats"):
        _native.policy_loss_from_logits(logits, targets, old, adv, grad, stats[:-1])
    with pytest.raises(ValueError, match="rows"):
        _native.policy_loss_from_logits(logits[:1], targets, old, adv, grad[:1], stats)
    with pytest.raises(ValueError, match="workspace"):
        strided = torch.empty(4096, dtype=torch.uint8)[::2]
        _native.policy_loss_from_logits(logits, targets, old, adv, grad, stats, workspace=strided)
    with pytest.raises(ValueError, match="estimator"):
        _native.policy_loss_from_logits(logits, targets, old, adv, grad, stats, kl_estimator="k4")
    with pytest.raises(ValueError, match="sequences"):
        _native.fused_workspace_bytes(6, 10, "float32", (2, 4))
