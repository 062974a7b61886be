"""GRPO on a toy task with a tiny PyTorch policy, every RL op from rlhf_kernels.torch.

The task (the same as examples/candle_grpo.rs): given a target S, write L tokens whose digits
(tokens 0-9; every other token of the V = 1000 vocabulary counts 0) add up to S; reward
1 − |Σ digits − S| / 9L. Each step samples G answers to each of P prompts, computes GRPO
advantages (group_advantages), then runs two epochs of the clipped surrogate (policy_loss) on
token log-probabilities and entropies (token_logprobs) plus β·KL[π ‖ π_ref] to the frozen
initial policy, exact over the vocabulary (exact_kl); loss.backward() runs this crate's
backward kernels into the model.

    python python/examples/grpo_toy.py [--steps 40] [--device cpu|cuda]

Exits with status 1 if the reward did not rise.
"""

import argparse
import copy
import sys
import time

import torch

from rlhf_kernels.torch import check_status, exact_kl, group_advantages, policy_loss, policy_stats, token_logprobs

VOCAB, WIDTH, LEN, PROMPTS, GROUP, TARGET_BASE = 1000, 64, 6, 16, 8, 900


class Policy(torch.nn.Module):
    """Token + prompt + position embeddings, two residual tanh layers, an LM head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.position = torch.nn.Parameter(torch.randn(LEN, WIDTH) * 0.5)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(2))
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, inputs, targets):
        h = self.embed(inputs) + self.embed(targets)[:, None] + self.position[: inputs.shape[1]]
        for layer in self.hidden:
            h = torch.tanh(layer(h)) + h
        return self.head(h)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    policy = Policy().to(device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    b = PROMPTS * GROUP
    group_ids = torch.arange(b) // GROUP
    mask = torch.ones(b, LEN, dtype=torch.bool, device=device)
    print(f"GRPO on {device}: {PROMPTS} prompts x {GROUP} answers of {LEN} tokens, V = {VOCAB}")
    print(f"{'step':>4} {'reward':>8} {'KL[pi|ref]':>10} {'clip frac':>9} {'entropy':>8} {'ms':>7}")
    rewards = []
    for step in range(args.steps):
        start = time.perf_counter()
        sums = 3 + torch.randint(0, 9 * LEN // 2, (PROMPTS,))
        targets = (TARGET_BASE + sums.repeat_interleave(GROUP)).to(device)
        with torch.no_grad():  # sample LEN tokens, each conditioned on the previous one
            inputs = targets[:, None]
            for t in range(LEN):
                logits = policy(inputs, targets)[:, -1]
                token = torch.multinomial(torch.softmax(logits, -1), 1)
                inputs = torch.cat([inputs, token], 1)
        answers, inputs = inputs[:, 1:], inputs[:, :-1]
        digits = torch.where(answers < 10, answers, 0).sum(1)
        scores = 1 - (digits - (targets - TARGET_BASE)).abs().float() / (9 * LEN)
        rewards.append(scores.mean().item())
        _, advantages = group_advantages(scores, group_ids, PROMPTS, mask)
        ref_logits = reference(inputs, targets)

        old_logp = None
        for _epoch in range(2):
            logits = policy(inputs, targets)
            logp, entropy = token_logprobs(logits, answers)
            if old_logp is None:
                old_logp = logp.detach()
            loss, stats = policy_loss(logp, old_logp, advantages, mask, entropy=entropy, entropy_coef=1e-3)
            kl = exact_kl(logits, ref_logits).mean()
            optimizer.zero_grad()
            (loss + 0.02 * kl).backward()
            optimizer.step()
        check_status()
        s = policy_stats(stats)
        clip = s["clip_fraction_low"] + s["clip_fraction_high"]
        ms = (time.perf_counter() - start) * 1e3
        print(f"{step:>4} {rewards[-1]:>8.4f} {kl.item():>10.5f} {clip:>9.4f} {s['entropy_loss']:>8.4f} {ms:>7.1f}")
    window = max(args.steps // 4, 1)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    print(f"mean reward: first {window} steps {first:.4f}, last {window} steps {last:.4f}")
    if last <= first + 0.05:
        sys.exit("the reward did not rise")


if __name__ == "__main__":
    main()
