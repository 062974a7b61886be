#!/usr/bin/env python3
"""PyTorch baseline for the crate's benchmarks: the same shapes (benches/shapes.txt), the
same work, timed the way each device is best timed.

Each case is timed in up to three variants:
  alloc         what a PyTorch user (and autograd) writes; PyTorch allocates the outputs each call
  out           the same kernels writing into preallocated outputs, as the crate's ops do
  rlhf_kernels  this crate's kernels through its Python module (python/, rlhf_kernels.torch or
                rlhf_kernels._native) on the same tensors, in the same process: present when the
                module is installed (pip install ./python), for every case it covers (all but
                log_softmax and sampled_kl)
Ratios of the Rust benches are taken against the faster of alloc and out.

  log_softmax_fwd             alloc: torch.log_softmax(x, -1, dtype=torch.float32)
                              out:   aten.log_softmax.int_out(x, -1, torch.float32, out=y)
  log_softmax_bwd             alloc: aten._log_softmax_backward_data(g, y, -1, x.dtype)
                              out:   aten._log_softmax_backward_data.out(..., out=...) (PyTorch
                                     insists on an f32 output there: bf16/f16 add a copy)
  token_logprobs_fwd          alloc: log_softmax(x, -1, dtype=f32).gather(-1, y[:, None])
                              out:   log_softmax into a preallocated buffer, then gather
  token_logprobs_entropy_fwd  alloc: lp = log_softmax(x, -1, dtype=f32); lp.gather(...);
                                     -(lp.exp() * lp).sum(-1)
  token_logprobs_bwd          alloc: torch.autograd.grad of sum(g·logp + g_H·H) w.r.t. x
                                     (backward only: the graph is built once and retained)
  sampled_kl                  alloc: verl's low_var_kl (k3, clamps 20/10), a masked token-mean
                                     and its gradient w.r.t. logp (forward + backward)
  sampled_kl_bias_corrected   alloc: the same k3 times exp(logp − old_logp) (TRL's
                                     use_bias_correction_kl), forward + backward
  exact_kl_fwd_bwd            alloc: F.kl_div(log_softmax(q), log_softmax(p), log_target=True)
                                     summed per row = KL[p‖q], forward + backward into p
  gae                         alloc: verl's compute_gae_advantage_return loop over the T
                                     positions (masked steps carry nextvalues and lastgaelam),
                                     then returns = advantages + values (no whitening)
  ppo_loss                    alloc: verl's compute_policy_loss_vanilla (clamp 20, ε = 0.2, dual
                                     clip 3, clip fractions, ppo_kl), token-mean aggregation, the
                                     entropy bonus, autograd.grad w.r.t. logp and the entropy
  ppo_loss_sapo               alloc: verl's compute_policy_loss_sapo (clamp 20, τ₊ = 1, τ₋ = 1.05,
                                     ppo_kl), seq-mean-token-mean, the entropy bonus, autograd.grad
  ppo_loss_gmpo               alloc: verl's compute_policy_loss_geo_mean (log-space clip 0.4, clip
                                     fractions, ppo_kl), the entropy bonus, autograd.grad
  ppo_fused                   alloc: log_softmax(x.float()).gather (the log-probs), the entropy,
                                     verl's clipped loss with the entropy bonus (token-mean) and
                                     autograd.grad w.r.t. the logits x
  grpo                        alloc: group mean and unbiased std by scatter_add over the group
                                     ids (verl loops over a Python dict; this is the vectorised
                                     form), then (s − mean)/(std + 1e-6)

One line per case and variant on stdout:
  op=log_softmax_fwd variant=alloc device=cpu dtype=bf16 shape=256x32000 median_ms=... gbps=...
With --json, one JSON object per line instead. Bytes counted as in the Rust benches: each
input read once, each output written once.
"""
import argparse
import json
import os
import statistics
import sys
import time

SIZE = {"f32": 4, "f16": 2, "bf16": 2}


def op_bytes(op, rows, cols, dtype):
    """Bytes each op must move: inputs read once, outputs written once (as the Rust benches)."""
    n, t = rows * cols, SIZE[dtype]
    return {
        "log_softmax_fwd": n * (t + 4),
        "log_softmax_bwd": n * (4 + 4 + t),
        "token_logprobs_fwd": n * t + rows * (8 + 4),
        "token_logprobs_entropy_fwd": n * t + rows * (8 + 8),
        "token_logprobs_bwd": 2 * n * t + rows * (8 + 16),
        "token_logprobs_bwd_inplace": 2 * n * t + rows * (8 + 16),
        "sampled_kl": n * (4 + 4 + 1 + 4 + 4),
        "sampled_kl_bias_corrected": n * (4 + 4 + 4 + 1 + 4 + 4),
        "exact_kl_fwd_bwd": 5 * n * t,
        "gae": n * (4 + 4 + 1 + 4 + 4),
        "grpo": rows * (4 + 4 + 4),
        "ppo_loss": n * (4 * 4 + 1 + 8),
        "ppo_loss_sapo": n * (4 * 4 + 1 + 8),
        "ppo_loss_gmpo": n * (4 * 4 + 1 + 8),
        "ppo_fused": 3 * n * t + rows * (8 + 1 + 4 + 4),
    }[op]


def shapes(path, device):
    for line in open(path):
        line = line.split("#")[0].split()
        if len(line) == 5 and line[1] == device:
            op, _, rows, cols, dtype = line
            yield op, int(rows), int(cols), dtype


def time_cpu(fn, min_time=1.0, min_runs=10):
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > 1.0:  # slow cases (GAE's loop over 131072 positions): 3 runs
        min_runs, min_time = 3, 0.0
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_cuda(fn, reps=20, rounds=5):
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t > 0.1:  # slow cases (GAE's Python loop): one call per round
        reps, rounds = 1, 3
    else:
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        results.append(start.elapsed_time(end) / reps)
    return statistics.median(results)


def cases(op, rows, cols, dtype, device):
    """Yields (name, {variant: fn})."""
    import torch

    try:
        import rlhf_kernels.torch as rk
        from rlhf_kernels import _native
    except ImportError:
        rk = None

    def ours(variants, fn):
        """Adds the rlhf_kernels variant when the module is installed."""
        if rk is not None:
            variants["rlhf_kernels"] = fn
        return variants

    def with_grad(fn):
        def run():
            with torch.enable_grad():
                return fn()

        return run

    def stream():
        return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0

    status = torch.full((1,), -1, dtype=torch.int64, device=device) if device == "cuda" else None
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(dtypes[dtype]).to(device)
    aten = torch.ops.aten
    if op == "log_softmax":
        g = torch.randn(rows, cols, generator=gen).to(device)
        y = torch.log_softmax(x, -1, dtype=torch.float32)
        y_out = torch.empty_like(y)
        yield "log_softmax_fwd", {
            "alloc": lambda: torch.log_softmax(x, -1, dtype=torch.float32),
            "out": lambda: aten.log_softmax.int_out(x, -1, torch.float32, out=y_out),
        }
        dx32, dx = torch.empty_like(y), torch.empty_like(x)

        def bwd_out():
            aten._log_softmax_backward_data.out(g, y, -1, x.dtype, out=dx32)
            if dx.dtype != dx32.dtype:
                dx.copy_(dx32)

        yield "log_softmax_bwd", {"alloc": lambda: aten._log_softmax_backward_data(g, y, -1, x.dtype), "out": bwd_out}
    elif op == "token_logprobs":
        y = torch.randint(0, cols, (rows, 1), generator=gen).to(device)
        lp_buf, logp_buf = torch.empty(rows, cols, device=device), torch.empty(rows, 1, device=device)

        def logp_out():
            aten.log_softmax.int_out(x, -1, torch.float32, out=lp_buf)
            torch.gather(lp_buf, -1, y, out=logp_buf)

        y1 = y[:, 0].contiguous()
        logp, ent, lse = (torch.empty(rows, device=device) for _ in range(3))
        yield "token_logprobs_fwd", ours({
            "alloc": lambda: torch.log_softmax(x, -1, dtype=torch.float32).gather(-1, y),
            "out": logp_out,
        }, lambda: _native.token_logprobs(x, y1, logp=logp, status=status, stream=stream()))

        def entropy():
            lp = torch.log_softmax(x, -1, dtype=torch.float32)
            return lp.gather(-1, y), -(lp.exp() * lp).sum(-1)

        yield "token_logprobs_entropy_fwd", ours(
            {"alloc": entropy},
            lambda: _native.token_logprobs(x, y1, logp=logp, entropy=ent, status=status, stream=stream()),
        )
        xg = x.clone().requires_grad_(True)
        gl, gh = torch.randn(rows, 1, generator=gen).to(device), torch.randn(rows, generator=gen).to(device)
        with torch.enable_grad():
            lp = torch.log_softmax(xg, -1, dtype=torch.float32)
            loss = (gl * lp.gather(-1, y)).sum() + (gh * -(lp.exp() * lp).sum(-1)).sum()
        if rk is not None:
            _native.token_logprobs(x, y1, logp=logp, entropy=ent, lse=lse, status=status, stream=stream())
        dx, gl1 = torch.empty_like(x), gl[:, 0].contiguous()
        yield "token_logprobs_bwd", ours(
            {"alloc": lambda: torch.autograd.grad(loss, xg, retain_graph=True)},
            lambda: _native.token_logprobs_backward(
                x, y1, lse, dx, entropy=ent, grad_logp=gl1, grad_entropy=gh, status=status, stream=stream()
            ),
        )
    elif op == "sampled_kl":
        logp = (-torch.rand(rows, cols, generator=gen) * 6).to(device)
        ref = logp + torch.randn(rows, cols, generator=gen).to(device) * 0.3
        mask = (torch.arange(cols, device=device) < cols * 7 // 8).float().expand(rows, cols)

        def k3():
            with torch.enable_grad():
                return k3_graph()

        def k3_graph():
            lp = logp.detach().requires_grad_(True)
            kl = torch.clamp(ref - lp, -20, 20)
            kld = torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
            loss = (kld * mask).sum() / mask.sum()
            (g,) = torch.autograd.grad(loss, lp)
            return kld, g

        yield "sampled_kl", {"alloc": k3}

        old = logp + torch.randn(rows, cols, generator=gen).to(device) * 0.2

        def k3_bias_corrected():  # TRL's use_bias_correction_kl: k3 · exp(logp − old_logp)
            with torch.enable_grad():
                lp = logp.detach().requires_grad_(True)
                kl = torch.clamp(ref - lp, -20, 20)
                kld = torch.clamp(torch.exp(kl) - kl - 1, -10, 10) * torch.exp(torch.clamp(lp - old, -20, 20))
                loss = (kld * mask).sum() / mask.sum()
                (g,) = torch.autograd.grad(loss, lp)
                return kld, g

        yield "sampled_kl_bias_corrected", {"alloc": k3_bias_corrected}
    elif op == "exact_kl":
        import torch.nn.functional as F

        q = (x.float() + torch.randn(rows, cols, generator=gen).to(device) * 0.5).to(x.dtype)

        def kl_fwd_bwd():
            with torch.enable_grad():
                return kl_graph()

        def kl_graph():
            p = x.detach().requires_grad_(True)
            lp = torch.log_softmax(p.float(), -1)
            lq = torch.log_softmax(q.float(), -1)
            kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
            (g,) = torch.autograd.grad(kl.sum(), p)
            return kl, g

        def ours_kl():
            p = x.detach().requires_grad_(True)
            kl = rk.exact_kl(p, q)
            (g,) = torch.autograd.grad(kl.sum(), p)
            return kl, g

        yield "exact_kl_fwd_bwd", ours({"alloc": kl_fwd_bwd}, with_grad(ours_kl))
    elif op == "gae":
        rewards = (torch.randn(rows, cols, generator=gen) * 0.1).to(device)
        values = torch.randn(rows, cols, generator=gen).to(device)
        lengths = cols // 2 + torch.randint(0, cols // 2 + 1, (rows, 1), generator=gen)
        mask = (torch.arange(cols)[None, :] < lengths).float().to(device)
        gamma, lam = 1.0, 0.95

        def verl_gae():
            nextvalues, lastgaelam, reversed_ = 0, 0, []
            for t in reversed(range(cols)):
                delta = rewards[:, t] + gamma * nextvalues - values[:, t]
                lastgaelam_ = delta + gamma * lam * lastgaelam
                nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
                lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
                reversed_.append(lastgaelam)
            advantages = torch.stack(reversed_[::-1], dim=1)
            return advantages, advantages + values

        yield "gae", ours({"alloc": verl_gae}, lambda: rk.gae(rewards, values, mask.bool(), gamma=gamma, lam=lam))
    elif op == "ppo_loss":
        old = (-torch.rand(rows, cols, generator=gen) * 5).to(device)
        logp = old + (torch.rand(rows, cols, generator=gen) - 0.5).to(device) * 0.8
        adv = torch.randn(rows, cols, generator=gen).to(device)
        ent = (torch.rand(rows, cols, generator=gen) * 3).to(device)
        lengths = cols // 2 + torch.randint(0, cols // 2 + 1, (rows, 1), generator=gen)
        mask = (torch.arange(cols)[None, :] < lengths).float().to(device)

        def masked_mean(x):
            return (x * mask).sum() / mask.sum()

        def ppo_graph():
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            negative_approx_kl = torch.clamp(lp - old, -20.0, 20.0)
            ratio = torch.exp(negative_approx_kl)
            ppo_kl = masked_mean(-negative_approx_kl)
            pg_losses1 = -adv * ratio
            pg_losses2 = -adv * torch.clamp(ratio, 0.8, 1.2)
            clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
            pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float())
            pg_losses3 = -adv * 3.0
            clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
            pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (adv < 0).float())
            pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
            loss = masked_mean(pg_losses) - 0.01 * masked_mean(h)
            grads = torch.autograd.grad(loss, (lp, h))
            return loss.detach(), ppo_kl.detach(), pg_clipfrac, pg_clipfrac_lower, grads

        def ppo():
            with torch.enable_grad():
                return ppo_graph()

        bool_mask = mask.bool()

        def ours_ppo():
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            loss, stats = rk.policy_loss(lp, old, adv, bool_mask, entropy=h, dual_clip=3.0, entropy_coef=0.01)
            return loss.detach(), stats, torch.autograd.grad(loss, (lp, h))

        yield "ppo_loss", ours({"alloc": ppo}, with_grad(ours_ppo))

        def seq_mean_token_mean(x):
            n = mask.sum(-1)
            return ((x * mask).sum(-1) / (n + 1e-8)).sum() / (n > 0).float().sum()

        def sapo_graph():  # verl's compute_policy_loss_sapo (clamp 20, τ₊ = 1, τ₋ = 1.05)
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            negative_approx_kl = torch.clamp(lp - old, -20.0, 20.0)
            ratio = torch.exp(negative_approx_kl)
            taus = torch.where(adv > 0, torch.tensor(1.0), torch.tensor(1.05))
            gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
            ppo_kl = masked_mean(-negative_approx_kl)
            loss = seq_mean_token_mean(-gates * adv) - 0.01 * seq_mean_token_mean(h)
            return loss.detach(), ppo_kl.detach(), torch.autograd.grad(loss, (lp, h))

        def ours_sapo():
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            loss, stats = rk.policy_loss(
                lp, old, adv, bool_mask, entropy=h, objective="sapo", entropy_coef=0.01,
                aggregation="seq_mean_token_mean",
            )
            return loss.detach(), stats, torch.autograd.grad(loss, (lp, h))

        yield "ppo_loss_sapo", ours({"alloc": with_grad(sapo_graph)}, with_grad(ours_sapo))

        def gmpo_graph():  # verl's compute_policy_loss_geo_mean (log-space clip 0.4)
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            negative_approx_kl = lp - old
            ppo_kl = masked_mean(-negative_approx_kl)
            sgn = torch.sign(adv)
            clamped = torch.clamp(negative_approx_kl, -0.4, 0.4)
            kl_min = sgn * torch.min(sgn * negative_approx_kl, sgn * clamped)
            n = mask.sum(-1)
            ratio = torch.exp((kl_min * mask).sum(-1) / (n + 1e-8))
            advantage = (adv * mask).sum(-1) / (n + 1e-8)
            clipped = torch.ne(negative_approx_kl, clamped)
            clipfrac = masked_mean((clipped * (adv > 0)).float())
            clipfrac_lower = masked_mean((clipped * (adv < 0)).float())
            loss = torch.mean(-advantage * ratio) - 0.01 * seq_mean_token_mean(h)
            return loss.detach(), ppo_kl.detach(), clipfrac, clipfrac_lower, torch.autograd.grad(loss, (lp, h))

        def ours_gmpo():
            lp, h = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
            loss, stats = rk.policy_loss(
                lp, old, adv, bool_mask, entropy=h, objective="gmpo", clip_low=0.4, clip_high=0.4,
                entropy_coef=0.01, aggregation="seq_mean_token_mean",
            )
            return loss.detach(), stats, torch.autograd.grad(loss, (lp, h))

        yield "ppo_loss_gmpo", ours({"alloc": with_grad(gmpo_graph)}, with_grad(ours_gmpo))
    elif op == "ppo_fused":
        y = torch.randint(0, cols, (rows, 1), generator=gen).to(device)
        adv = torch.randn(rows, generator=gen).to(device)
        mask = torch.ones(rows, device=device)
        with torch.no_grad():
            old = torch.log_softmax(x.float(), -1).gather(-1, y).squeeze(-1)
            old = old + torch.randn(rows, generator=gen).to(device) * 0.15

        def fused_graph():
            xg = x.detach().requires_grad_(True)
            lp_all = torch.log_softmax(xg.float(), -1)
            logp = lp_all.gather(-1, y).squeeze(-1)
            entropy = -(lp_all.exp() * lp_all).sum(-1)
            ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
            pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
            pg = torch.where(adv < 0, torch.min(-adv * 3.0, pg), pg)
            loss = (pg * mask).sum() / mask.sum() - 0.01 * (entropy * mask).sum() / mask.sum()
            (g,) = torch.autograd.grad(loss, xg)
            return loss.detach(), g

        def fused():
            with torch.enable_grad():
                return fused_graph()

        y1 = y[:, 0].contiguous()

        def ours_fused():
            xg = x.detach().requires_grad_(True)
            logp, entropy = rk.token_logprobs(xg, y1)
            loss, _ = rk.policy_loss(
                logp[None], old[None], adv[None], entropy=entropy[None], dual_clip=3.0, entropy_coef=0.01
            )
            (g,) = torch.autograd.grad(loss, xg)
            return loss.detach(), g

        yield "ppo_fused", ours({"alloc": fused}, with_grad(ours_fused))
    elif op == "grpo":
        groups = rows // 16
        scores = torch.randn(rows, generator=gen).to(device)
        index = (torch.arange(rows) % groups).to(device)

        def grpo():
            counts = torch.bincount(index, minlength=groups).float()
            mean = torch.zeros(groups, device=device).scatter_add_(0, index, scores) / counts
            centered = scores - mean[index]
            var = torch.zeros(groups, device=device).scatter_add_(0, index, centered * centered) / (counts - 1)
            return centered / (var.sqrt()[index] + 1e-6)

        ids = index.cpu()
        yield "grpo", ours({"alloc": grpo}, lambda: rk.group_advantages(scores, ids, groups))


def main():
    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=os.path.join(here, "shapes.txt"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--filter", default="", help="only ops whose name contains this")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_baseline.py: --device cuda but torch.cuda.is_available() is False")
    timer = time_cuda if args.device == "cuda" else time_cpu
    print(f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}", file=sys.stderr)
    for op, rows, cols, dtype in shapes(args.shapes, args.device):
        with torch.no_grad():
            for name, variants in cases(op, rows, cols, dtype, args.device):
                if args.filter not in name:
                    continue
                nbytes = op_bytes(name, rows, cols, dtype)
                for variant, fn in variants.items():
                    ms = timer(fn)
                    rec = dict(op=name, variant=variant, device=args.device, dtype=dtype, shape=f"{rows}x{cols}",
                               median_ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1))
                    print(json.dumps(rec) if args.json else " ".join(f"{k}={v}" for k, v in rec.items()), flush=True)


if __name__ == "__main__":
    main()
