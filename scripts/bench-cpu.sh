#!/usr/bin/env bash
# CPU benchmarks side by side: the crate's criterion benches and the PyTorch baseline on the
# same shapes (benches/shapes.txt), in one run, with the ratio PyTorch time / our time.
# The two alternate for $ROUNDS rounds (default 3) so that a machine whose speed drifts
# affects both; the table shows the median over rounds of each time and of the ratio.
#
#   scripts/bench-cpu.sh [filter]        e.g. scripts/bench-cpu.sh log_softmax_fwd
#
# PyTorch comes from $TORCH_PYTHON, else a python3 that imports torch, else a virtual
# environment under ~/.cache/rlhf-kernels/torch-venv that this script creates (pip install
# torch: about 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
filter="${1:-}"

find_torch() {
  for py in "${TORCH_PYTHON:-}" python3 "$HOME/.cache/rlhf-kernels/torch-venv/bin/python"; do
    [ -n "$py" ] && "$py" -c "import torch" 2>/dev/null && { echo "$py"; return; }
  done
  local venv="$HOME/.cache/rlhf-kernels/torch-venv"
  echo "installing PyTorch into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch numpy >&2
  echo "$venv/bin/python"
}
py=$(find_torch)

rounds="${ROUNDS:-3}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo bench --benches --no-run 2>/dev/null
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds: criterion (this crate), CPU ==" >&2
  cargo bench --benches -- --output-format bencher "${filter}.*/cpu/" 2>/dev/null | grep '^test ' | tee "$dir/ours.$r" >&2
  echo "== round $r/$rounds: PyTorch, CPU ==" >&2
  "$py" benches/torch_baseline.py --device cpu --json --filter "$filter" | tee "$dir/torch.$r" >&2
done

"$py" - "$dir" "$rounds" "$filter" <<'PY'
import json, re, statistics, sys
d, rounds, filt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ours, theirs = {}, {}
for r in range(1, rounds + 1):
    for line in open(f"{d}/ours.{r}"):
        m = re.match(r"test (\S+)/cpu/(\S+)/(\S+) \.\.\. bench:\s+([\d,]+) ns/iter", line)
        if m:
            op, dtype, shape, ns = m.groups()
            ours.setdefault((op, dtype, shape), []).append(int(ns.replace(",", "")) / 1e6)
    for line in open(f"{d}/torch.{r}"):
        j = json.loads(line)
        theirs.setdefault((j["op"], j["dtype"], j["shape"]), {}).setdefault(j["variant"], []).append(j["median_ms"])
print("torch alloc: PyTorch allocates its output (what autograd does); torch out: preallocated output")
print("ratio: the faster PyTorch variant / ours, median over rounds (the baseline's rlhf_kernels")
print("       variant, this crate's Python module, is shown as 'py module' and left out of it)")
print(f"{'op':<26} {'dtype':<5} {'shape':<11} {'ours ms':>8} {'torch alloc':>11} {'torch out':>9} "
      f"{'py module':>9} {'ratio':>7}")
for key, t in theirs.items():
    if key in ours and filt in key[0]:
        o = ours[key]
        # PyTorch's variants only: the baseline also times this crate's Python module when it
        # is installed ("rlhf_kernels"), which is not a PyTorch time.
        torch_only = [v for name, v in t.items() if name != "rlhf_kernels"]
        best = [min(v) for v in zip(*torch_only)]
        ratio = statistics.median(a / b for a, b in zip(best, o))
        col = lambda v: f"{statistics.median(t[v]):>9.3f}" if v in t else f"{'-':>9}"  # noqa: E731
        print(f"{key[0]:<26} {key[1]:<5} {key[2]:<11} {statistics.median(o):>8.3f} "
              f"{statistics.median(t['alloc']):>11.3f} {col('out')} {col('rlhf_kernels')} {ratio:>6.2f}x")
PY
