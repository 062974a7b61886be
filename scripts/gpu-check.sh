#!/usr/bin/env bash
# The whole GPU check of ../shared/GPU.md in two steps.
#
#   scripts/gpu-check.sh build         on the build machine (Rust + pinned nvcc): builds the
#                                      test, bench and example binaries with the kernels for
#                                      sm_90 (the lent H100/H200; RLHF_KERNELS_CUDA_ARCHS
#                                      overrides), strips them and stages them xz-packed in
#                                      gpu-stage/bin.tar.xz (git-ignored, under 64 MiB; each
#                                      binary embeds the same fatbins, which xz shares).
#   scripts/gpu-check.sh run [--dry-run] [--steps tests,sanitizers,example,bench]
#                                      on the GPU machine (no Rust needed), from the repository
#                                      root: every test binary with RLHF_KERNELS_REQUIRE_GPU=1,
#                                      the CUDA tests under compute-sanitizer memcheck, racecheck
#                                      and initcheck (reduced shapes), the example at a realistic
#                                      size, the criterion benches (copy bandwidth first) and
#                                      benches/torch_baseline.py on the same shapes; ends with a
#                                      short table. Logs go to $RLHF_KERNELS_GPU_OUT (default
#                                      gpu-out/). --dry-run exercises the same steps on a machine
#                                      without a GPU (skips allowed, no sanitizer, no torch).
#                                      --steps runs a subset (each call of the device tool has a
#                                      ten-minute limit: split the check over calls if needed).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=gpu-stage

build() {
  set -e
  local nvcc
  nvcc=$(scripts/install-nvcc.sh)
  export RLHF_KERNELS_NVCC="$nvcc" RLHF_KERNELS_REQUIRE_NVCC=1 RLHF_KERNELS_DENY_SPILLS=1
  export RLHF_KERNELS_CUDA_ARCHS="${RLHF_KERNELS_CUDA_ARCHS:-90}"
  rm -rf "$stage"
  mkdir -p "$stage/bin"
  local list="$stage/artifacts.txt"
  {
    cargo test --release --no-run --message-format=json
    cargo bench --no-run --message-format=json
    cargo build --release --example ppo_step --message-format=json
  } | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"][0]
        kind = "test" if m["profile"]["test"] and kind != "bench" else kind
        print(kind, m["target"]["name"], m["executable"])
' >"$list"
  while read -r kind name exe; do
    strip -o "$stage/bin/$kind-$name" "$exe"
  done <"$list"
  cp "$(ls -t target/release/build/rlhf-kernels-*/out/ptxas-report.txt | head -n 1)" "$stage/"
  ls -l "$stage/bin"
  tar -C "$stage" -cf - bin | xz -T2 -6 >"$stage/bin.tar.xz"
  rm -rf "$stage/bin"
  du -sh "$stage"
  local size
  size=$(du -sm "$stage" | cut -f1)
  [ "$size" -lt 64 ] || { echo "gpu-stage is ${size} MiB, over the 64 MiB that may travel" >&2; exit 1; }
  echo "staged: run 'scripts/gpu-check.sh run' on the GPU machine with gpu-stage carried"
}

run() {
  local dry=0 steps="tests,sanitizers,example,bench"
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry=1 ;;
      --steps) steps="$2"; shift ;;
      *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
  done
  want() { [[ ",$steps," == *",$1,"* ]]; }
  local out="${RLHF_KERNELS_GPU_OUT:-gpu-out}"
  mkdir -p "$out"
  local summary="$out/summary.txt"
  : >"$summary"
  if [ ! -d "$stage/bin" ] && [ -f "$stage/bin.tar.xz" ]; then
    # python3's lzma: no xz binary needed on the GPU machine.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$stage/bin.tar.xz" "$stage"
  fi
  [ -d "$stage/bin" ] || { echo "no $stage/bin: run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
  record() { printf '%-44s %s\n' "$1" "$2" | tee -a "$summary"; }

  { date -u; uname -a; nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } >"$out/machine.txt"
  if [ "$dry" = 1 ]; then
    unset RLHF_KERNELS_REQUIRE_GPU
  else
    export RLHF_KERNELS_REQUIRE_GPU=1
  fi

  # 1. Every test binary; the CUDA ones cannot skip unless this is a dry run.
  want tests && for t in "$stage"/bin/test-*; do
    local name=${t##*/}
    if "$t" --test-threads=1 >"$out/$name.log" 2>&1; then
      record "$name" "PASS, $(grep -o 'skipped: ' "$out/$name.log" | wc -l) skipped"
    else
      record "$name" "FAIL (see $out/$name.log)"
    fi
  done

  # 2. Sanitizers on the CUDA tests with reduced shapes.
  want sanitizers && for tool in memcheck racecheck initcheck; do
    if ! command -v compute-sanitizer >/dev/null; then
      record "compute-sanitizer --tool $tool" "ABSENT (not installed)"
      continue
    fi
    for t in "$stage"/bin/test-*_cuda; do
      local name=${t##*/}
      local log="$out/sanitizer-$tool-$name.log"
      RLHF_KERNELS_TEST_SHAPES=small compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$t" --test-threads=1 >"$log" 2>&1
      local rc=$?
      if grep -qE "Device not supported|error 999|CUDA_ERROR_UNKNOWN" "$log"; then
        record "sanitizer $tool $name" "REFUSED by this GPU/driver (not clean: unverified)"
      elif [ "$rc" = 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        record "sanitizer $tool $name" "CLEAN"
      else
        record "sanitizer $tool $name" "FAIL rc=$rc (see $log)"
      fi
    done
  done

  # 3. The main job at a realistic size.
  local rows=8192 vocab=151936
  [ "$dry" = 1 ] && rows=256 vocab=32000
  if ! want example; then
    :
  elif "$stage/bin/example-ppo_step" --rows "$rows" --seq-len 256 --vocab "$vocab" --dtype bf16 >"$out/ppo_step.log" 2>&1 &&
    "$stage/bin/example-ppo_step" --rows "$rows" --seq-len 256 --vocab "$vocab" --dtype bf16 --kl reward >>"$out/ppo_step.log" 2>&1 &&
    "$stage/bin/example-ppo_step" --rows "$rows" --seq-len 256 --vocab "$vocab" --dtype bf16 --estimator grpo >>"$out/ppo_step.log" 2>&1; then
    record "ppo_step ${rows}x${vocab} bf16" "PASS"
  else
    record "ppo_step ${rows}x${vocab} bf16" "FAIL (see $out/ppo_step.log)"
  fi
  if ! want bench; then
    echo
    cat "$summary"
    ! grep -q "FAIL" "$summary"
    return
  fi

  # 4. Benchmarks: ours (copy bandwidth first, same process), then PyTorch on the same shapes.
  local filter=cuda
  [ "$dry" = 1 ] && filter=cpu
  : >"$out/bench.log"
  for b in "$stage"/bin/bench-*; do
    "$b" --bench --output-format bencher "copy|/$filter/" >>"$out/bench.log" 2>&1 \
      || record "${b##*/}" "FAIL (see $out/bench.log)"
  done
  if [ "$dry" = 1 ]; then
    record "torch baseline" "SKIPPED (dry run)"
    : >"$out/torch.jsonl"
  elif python3 benches/torch_baseline.py --device cuda --json >"$out/torch.jsonl" 2>"$out/torch.log"; then
    record "torch baseline" "PASS"
  else
    record "torch baseline" "FAIL (see $out/torch.log)"
  fi

  echo
  python3 - "$out/bench.log" "$out/torch.jsonl" "$filter" <<'PY' | tee "$out/table.txt"
import json, re, sys
sys.path.insert(0, "benches")
from torch_baseline import op_bytes
bench, torch_file, device = sys.argv[1:4]
rows, copy = [], None
pat = re.compile(r"test (\S+) \.\.\. bench:\s+([\d,]+) ns/iter")
for line in open(bench):
    m = pat.match(line)
    if not m:
        continue
    name, ns = m.group(1), int(m.group(2).replace(",", ""))
    if name.startswith("copy/"):
        copy = 2 * 4 * (1 << 28) / ns  # bytes per ns = GB/s
        continue
    op, dev, dtype, shape = name.split("/")
    r, c = map(int, shape.split("x"))
    rows.append((op, dev, dtype, shape, ns / 1e6, op_bytes(op, r, c, dtype) / ns))
torch = {}  # the faster of PyTorch's two variants (allocating / preallocated output)
for line in open(torch_file):
    j = json.loads(line)
    key = (j["op"], j["dtype"], j["shape"])
    torch[key] = min(torch.get(key, float("inf")), j["median_ms"])
print(f"copy bandwidth (device-to-device, same process): {copy:.0f} GB/s" if copy else "copy bandwidth: not measured")
print(f"{'op':<27} {'dtype':<5} {'shape':<12} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'torch ms':>9} {'torch/ours':>10}")
for op, dev, dtype, shape, ms, gbps in rows:
    pct = f"{100 * gbps / copy:.0f}%" if copy else "-"
    t = torch.get((op, dtype, shape))
    ts, ratio = (f"{t:.3f}", f"{t / ms:.2f}x") if t else ("-", "-")
    print(f"{op:<27} {dtype:<5} {shape:<12} {ms:>8.3f} {gbps:>7.0f} {pct:>6} {ts:>9} {ratio:>10}")
PY
  echo
  cat "$summary"
  ! grep -q "FAIL" "$summary"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: scripts/gpu-check.sh build | run [--dry-run]" >&2; exit 2 ;;
esac
