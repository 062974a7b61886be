#!/usr/bin/env python3
"""Summarises the emulated device's traffic log (RK_EMU_TRAFFIC) of a bench run.

usage: emulator-traffic.py TRAFFIC_LOG [--markdown]

The log holds, per bench case, a `case GROUP RxC DTYPE MIN_BYTES` line, one `launch KERNEL ...`
line per kernel launch and an `end` line (benches/common/mod.rs writes the case lines, the
emulator the launch lines). For every case, and every kernel in it, it prints:
  L1 / min          per warp instruction, the distinct bytes its lanes access (a broadcast
                    of one value to the warp counts once), summed, over the bytes the op must
                    move (BENCHMARKS.md: every input read once, every output written once):
                    above 1 when a kernel reads the same data twice;
  DRAM / min        distinct 32-byte sectors read plus distinct sectors written per launch, in
                    bytes, over the same minimum: the DRAM traffic if every sector a launch
                    touches stays cached for the rest of the launch;
  sector eff.       per warp instruction (the k-th global access of each lane since the last
                    sync point), ceil(distinct bytes / 32) over the 32-byte sectors it touched.
These are counts, not times."""
import sys
from collections import OrderedDict


def parse(path):
    cases, current = [], None
    for line in open(path):
        w = line.split()
        if not w:
            continue
        if w[0] == "case":
            current = {"group": w[1], "shape": w[2], "dtype": w[3], "min": int(w[4]), "launches": []}
            cases.append(current)
        elif w[0] == "end":
            current = None
        elif w[0] == "launch" and current is not None:
            fields = dict(f.split("=", 1) for f in w[2:])
            current["launches"].append((w[1], {k: int(v) for k, v in fields.items() if v.isdigit()}))
    return cases


def totals(launches):
    t = {"requested": 0, "distinct": 0, "sectors": 0, "ideal": 0, "n": 0}
    for _, f in launches:
        t["requested"] += f["instruction"]
        t["distinct"] += f["distinct"]
        t["sectors"] += f["sectors"]
        t["ideal"] += f["ideal"]
        t["n"] += 1
    return t


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    markdown = "--markdown" in sys.argv
    cases, seen = [], set()
    for c in parse(sys.argv[1]):  # two bench shapes can be cut to the same one
        key = (c["group"], c["shape"], c["dtype"])
        if key not in seen:
            seen.add(key)
            cases.append(c)
    header = ["op", "shape", "dtype", "kernel", "launches", "min MB", "L1 / min", "DRAM / min", "sector eff."]
    rows = []
    for c in cases:
        per_kernel = OrderedDict()
        for name, f in c["launches"]:
            per_kernel.setdefault(name, []).append((name, f))
        entries = [("all kernels", c["launches"])] + (list(per_kernel.items()) if len(per_kernel) > 1 else [])
        for label, launches in entries:
            t = totals(launches)
            if label == "all kernels" and len(per_kernel) == 1:
                label = next(iter(per_kernel))
            rows.append([
                c["group"] if label == "all kernels" or len(per_kernel) == 1 else "",
                c["shape"], c["dtype"], label, str(t["n"]), f"{c['min'] / 1e6:.1f}",
                f"{t['requested'] / c['min']:.3f}", f"{t['distinct'] / c['min']:.3f}",
                f"{100.0 * t['ideal'] / t['sectors']:.1f} %" if t["sectors"] else "-",
            ])
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" if i < 4 else "---:" for i in range(len(header))) + " |")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print("  ".join(h.ljust(widths[i]) for i, h in enumerate(header)))
        for r in rows:
            print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)))


if __name__ == "__main__":
    main()
