"""rlhf_kernels.torch against plain PyTorch formulas in float64: values, gradients through
autograd (and torch.autograd.gradcheck), every view the kernels read in place, error paths,
and that outputs are written where PyTorch allocated them. Runs on the CPU, and again on
CUDA when a GPU is present."""

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _native
from rlhf_kernels.torch import (
    check_status,
    exact_kl,
    gae,
    group_advantages,
    policy_loss,
    policy_stats,
    token_logprobs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and rlhf_kernels.cuda_available() else [])


def close(actual, expected, tol=1e-5, scale=1.0):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs() - (tol * scale + tol * expected.abs())
    assert err.max().item() <= 0, f"max excess {err.max().item():.3e}"


def reference_tokens(logits, targets, temperature=1.0):
    z = logits.double() / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def views(b, t, v, device, dtype):
    """(name, base, view): a contiguous batch, the causal shift, a vocabulary-padded view."""
    base = torch.randn(b, t + 1, v, device=device, dtype=torch.float32).mul(3).to(dtype)
    yield "contiguous", base, lambda x: x
    yield "shifted", base, lambda x: x[:, :-1]
    padded = torch.randn(b * t, v + 5, device=device).mul(3).to(dtype)
    yield "padded vocab", padded, lambda x: x[:, :v]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 3, 129, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_values_and_gradients(device, dtype, v, temperature):
    torch.manual_seed(v)
    for name, base, view in views(3, 5, v, device, dtype):
        base = base.clone().requires_grad_(True)
        logits = view(base)
        targets = torch.randint(0, v, logits.shape[:-1], device=device)
        w1, w2 = torch.randn(targets.shape, device=device), torch.randn(targets.shape, device=device)
        logp, entropy = token_logprobs(logits, targets, temperature=temperature)
        ((logp * w1).sum() + (entropy * w2).sum()).backward()
        check_status()

        exact = base.detach().double().requires_grad_(True)
        ref_logp, ref_entropy = reference_tokens(view(exact), targets, temperature)
        ((ref_logp * w1.double()).sum() + (ref_entropy * w2.double()).sum()).backward()
        scale = 3 * 6 / temperature
        close(logp, ref_logp, scale=scale)
        close(entropy, ref_entropy, scale=scale)
        grad_tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        close(base.grad, exact.grad, tol=grad_tol, scale=scale)


def test_token_logprobs_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2])

    def f(x):
        logp, entropy = token_logprobs(x.float(), targets)
        return logp.double(), entropy.double()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_ignored_and_banned_tokens(device):
    n, v = 6, 50
    logits = torch.randn(n, v, device=device)
    logits[3, 7] = float("-inf")
    logits[4] = float("nan")  # masked out: never read as a problem
    logits.requires_grad_(True)
    targets = torch.tensor([1, -100, 2, 3, 4, 5], device=device)
    mask = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool, device=device)
    logp, entropy = token_logprobs(logits, targets, mask, ignore_index=-100)
    logp.sum().backward()
    check_status()
    for r in (1, 4):
        assert logp[r].item() == 0 and entropy[r].item() == 0
        assert (logits.grad[r] == 0).all()
    assert logits.grad[3, 7].item() == 0
    assert torch.isfinite(logp).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises(device):
    logits = torch.zeros(4, 10, device=device)
    targets = torch.tensor([0, 1, 2, 3], device=device)
    with pytest.raises(ValueError, match="target"):
        token_logprobs(logits, torch.tensor([0, 1, 10, 3], device=device))
        check_status()
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, targets[:3])
    with pytest.raises(TypeError, match="dtype"):
        token_logprobs(logits.double(), targets)
    with pytest.raises(ValueError, match="unit stride"):
        token_logprobs(torch.zeros(10, 4, device=device).t(), targets)
    with pytest.raises(ValueError):
        token_logprobs(torch.tensor([[0.0, float("nan")]], device=device), torch.tensor([0], device=device))
        check_status()
    with pytest.raises(ValueError):
        token_logprobs(torch.full((1, 3), float("-inf"), device=device), torch.tensor([0], device=device))
        check_status()
    with pytest.raises(ValueError, match="empty"):
        token_logprobs(torch.zeros(0, 10, device=device), torch.zeros(0, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="mask"):
        token_logprobs(logits, targets, torch.ones(4, device=device))


def test_errors_name_the_tensors_row():
    base = torch.zeros(2, 3, 4)
    base[1, 1, 2] = float("nan")  # sequence 1, position 1 of the shifted view: row 3
    with pytest.raises(ValueError, match="row 3"):
        token_logprobs(base[:, :-1], torch.zeros(2, 2, dtype=torch.long))


def test_outputs_are_written_where_pytorch_allocated_them():
    logits = torch.randn(2, 6, 11)[:, :5]  # a view: read in place
    targets = torch.randint(0, 11, (2, 5))
    logp = torch.full((2, 5), float("nan"))
    address = logp.data_ptr()
    _native.token_logprobs(logits, targets, logp=logp)
    assert logp.data_ptr() == address
    close(logp, reference_tokens(logits, targets)[0])

    # In place: the gradient overwrites the logits' own memory.
    dense = torch.randn(4, 9)
    targets = torch.randint(0, 9, (4,))
    lse = torch.logsumexp(dense, -1)
    expected = torch.softmax(dense, -1) - torch.nn.functional.one_hot(targets, 9)
    address = dense.data_ptr()
    _native.token_logprobs_backward(dense, targets, lse, dense, grad_logp=-torch.ones(4))
    assert dense.data_ptr() == address
    close(dense, expected)

    with pytest.raises(ValueError, match="overlaps"):
        out = torch.empty(8)
        _native.token_logprobs(torch.randn(4, 9), torch.zeros(4, dtype=torch.long), logp=out[:4], entropy=out[2:6])


def test_expanded_logits_add_their_gradients():
    base = torch.randn(3, 7, requires_grad=True)
    logits = base[:, None].expand(3, 2, 7)  # rows share memory
    targets = torch.randint(0, 7, (3, 2))
    logp, _ = token_logprobs(logits, targets)
    logp.sum().backward()
    exact = base.detach().double().requires_grad_(True)
    reference_tokens(exact[:, None].expand(3, 2, 7), targets)[0].sum().backward()
    close(base.grad, exact.grad)
    # A gradient laid out like expanded logits would have its rows overwrite each other.
    expanded, grad = torch.randn(2, 7)[None].expand(3, 2, 7), torch.empty(2, 7)[None].expand(3, 2, 7)
    lse = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="share memory"):
        _native.token_logprobs_backward(expanded, targets, lse, grad, grad_logp=torch.ones(3, 2))


def test_empty_batches_raise():
    with pytest.raises(ValueError, match="empty"):
        policy_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="empty"):
        gae(torch.zeros(2, 0), torch.zeros(2, 0))


def reference_divergence(p, q, divergence, beta=0.5):
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    if divergence == "policy_ref":
        return kl(lp, lq)
    if divergence == "ref_policy":
        return kl(lq, lp)
    lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["policy_ref", "ref_policy", "jsd"])
@pytest.mark.parametrize("v", [2, 129, 1000])
def test_exact_kl_values_and_gradients(device, divergence, v):
    torch.manual_seed(v)
    for name, base, view in views(2, 5, v, device, torch.float32):
        base = base.clone().requires_grad_(True)
        policy = view(base)
        # The reference in another layout than the policy.
        reference = torch.randn(policy.numel() + 3, device=device)[3:].view(policy.shape).mul(2)
        w = torch.randn(policy.shape[:-1], device=device)
        value = exact_kl(policy, reference, divergence=divergence, jsd_beta=0.3)
        (value * w).sum().backward()
        check_status()
        exact = base.detach().double().requires_grad_(True)
        expected = reference_divergence(view(exact), reference, divergence, 0.3)
        (expected * w.double()).sum().backward()
        close(value, expected, scale=12)
        close(base.grad, exact.grad, scale=12)


def test_exact_kl_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(3, 6)
    f = lambda x: exact_kl(x.float(), reference, divergence="ref_policy").double()  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


def reference_clip_loss(logp, old, adv, mask, entropy, eps, c_h):
    ratio = (logp - old.double()).exp()
    adv = adv.double()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    m = mask.double()
    return (per_token * m).sum() / m.sum() - c_h * (entropy * m).sum() / m.sum()


@pytest.mark.parametrize("device", DEVICES)
def test_policy_loss_chains_into_the_logits(device):
    torch.manual_seed(3)
    b, t, v = 4, 9, 300
    base = torch.randn(b, t + 1, v, device=device).mul(2).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), device=device)
    mask = torch.arange(t, device=device)[None, :] < torch.tensor([9, 7, 5, 1], device=device)[:, None]
    adv = torch.randn(b, t, device=device)
    with torch.no_grad():
        old = token_logprobs(base[:, :-1], targets)[0] + 0.3 * torch.randn(b, t, device=device)
    eps, c_h = 0.2, 0.01
    logp, entropy = token_logprobs(base[:, :-1], targets, mask)
    loss, stats = policy_loss(logp, old, adv, mask, entropy=entropy, clip_low=eps, clip_high=eps, entropy_coef=c_h)
    loss.backward()
    check_status()

    exact = base.detach().double().requires_grad_(True)
    ref_logp, ref_entropy = reference_tokens(exact[:, :-1], targets)
    expected = reference_clip_loss(ref_logp, old, adv, mask, ref_entropy, eps, c_h)
    expected.backward()
    assert loss.shape == ()
    close(loss, expected, scale=4)
    close(base.grad, exact.grad, scale=4)

    s = policy_stats(stats)
    ratio = (ref_logp.detach() - old.double()).exp()
    high = (mask & (adv > 0) & (ratio > 1 + eps)).sum().item()
    low = (mask & (adv < 0) & (ratio < 1 - eps)).sum().item()
    valid = mask.sum().item()
    assert high + low > 0
    assert abs(s["clip_fraction_high"] - high / valid) < 1e-9
    assert abs(s["clip_fraction_low"] - low / valid) < 1e-9
    assert s["valid_tokens"] == valid

    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp.detach(), old[:, :-1], adv)
    with pytest.raises(ValueError, match="objective"):
        policy_loss(logp.detach(), old, adv, objective="ppo2")


def test_policy_loss_gradcheck():
    torch.manual_seed(4)
    old = torch.randn(3, 5)
    adv = torch.randn(3, 5)
    x = (old.double() + 0.3 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_(True)
    f = lambda x: policy_loss(x.float(), old, adv)[0].double()  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_gae_matches_the_python_loop(device):
    torch.manual_seed(5)
    b, t, gamma, lam = 5, 33, 0.99, 0.95
    rewards, values = torch.randn(b, t, device=device), torch.randn(b, t, device=device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    check_status()
    # verl's loop: masked steps pass the recursion through.
    r, vv, m = rewards.double().cpu(), values.double().cpu(), mask.double().cpu()
    last, nextv, expected = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64), []
    for i in reversed(range(t)):
        delta = r[:, i] + gamma * nextv - vv[:, i]
        new = delta + gamma * lam * last
        nextv = vv[:, i] * m[:, i] + (1 - m[:, i]) * nextv
        last = new * m[:, i] + (1 - m[:, i]) * last
        expected.append(last)
    expected = torch.stack(expected[::-1], 1)
    close(advantages * mask, expected * m, scale=30)
    close(returns * mask, (expected + vv) * m, scale=30)
    with pytest.raises(ValueError, match="shape"):
        gae(rewards, values[:, :-1])


@pytest.mark.parametrize("device", DEVICES)
def test_group_advantages_match_the_grpo_formula(device):
    torch.manual_seed(6)
    groups, size, t = 6, 4, 7
    scores = torch.randn(groups * size, device=device)
    ids = [i // size for i in range(groups * size)]
    mask = torch.rand(groups * size, t, device=device) > 0.3
    per_sequence, per_token = group_advantages(scores, ids, mask=mask)
    check_status()
    s = scores.double().view(groups, size)
    expected = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).flatten()
    close(per_sequence, expected)
    close(per_token, expected[:, None] * mask.double())
    rloo = group_advantages(scores, ids, estimator="rloo")
    expected = (s - (s.sum(1, keepdim=True) - s) / (size - 1)).flatten()
    close(rloo, expected)
    as_tensor = group_advantages(scores, torch.tensor(ids), estimator="rloo")
    assert torch.equal(as_tensor, rloo)
    with pytest.raises(ValueError, match="out of range"):
        group_advantages(scores, torch.full((groups * size,), -1))
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(scores, ids, estimator="ppo")
    with pytest.raises(ValueError):
        group_advantages(scores[:5], ids)


def test_any_dlpack_framework_numpy():
    """The native layer is framework-agnostic: NumPy arrays in, NumPy arrays written in place."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 9)).astype(np.float32)
    targets = rng.integers(0, 9, 4)
    logp, entropy = np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)
    _native.token_logprobs(logits, targets, logp=logp, entropy=entropy)
    ref_logp, ref_entropy = reference_tokens(torch.from_numpy(logits), torch.from_numpy(targets))
    close(torch.from_numpy(logp), ref_logp)
    close(torch.from_numpy(entropy), ref_entropy)
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises((ValueError, TypeError, BufferError)):
        _native.token_logprobs(logits, targets, logp=frozen)
