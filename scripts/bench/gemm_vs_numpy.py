"""wgtrain's projection GEMM against numpy's f32 matmul on the same CPU, in one run.

For each sequence length T it runs `cargo bench --bench kernels -- matmul` at the 0.5B and 1.5B
Qwen2.5 shapes (y = x·Wᵀ with bf16 W, on the default device: lavapipe on a machine without a GPU,
with the kernel plan the device chose or `WGTRAIN_KERNELS` forces), then times numpy's
`x @ w.T` (f32, OpenBLAS limited to --threads threads) at the same [T, K]·[N, K]ᵀ shapes, and prints
both in GFLOP/s with their ratio. numpy is timed right after wgtrain in the same process run, so
both see the same machine load. Both sides swing by up to ~1.7x from one run to the next on a
shared 2-core machine (docs/benchmarks.md), so --rounds repeats the pair (wgtrain, then numpy)
and reports each side's median over the rounds, the ratio of the medians and the range of the
per-round ratios.

    python scripts/bench/gemm_vs_numpy.py --t 128,512 --threads 2 --rounds 3

Pinned version: numpy 2.1.3 (scripts/bench/requirements.txt).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROW = re.compile(r"^\| matmul_forward \| (\S+) (\S+) (\d+)x(\d+)x(\d+) \| [\d.]+ \| ([\d.]+) \|")


def wgtrain_rows(t: int, sizes: str, reps: int):
    """(model, projection, M, N, K, GFLOP/s) of each matmul_forward row of the kernel bench."""
    env = dict(os.environ, WGTRAIN_BENCH_T=str(t), WGTRAIN_BENCH_SIZES=sizes,
               WGTRAIN_BENCH_REPS=str(reps))
    out = subprocess.run(
        ["cargo", "bench", "--bench", "kernels", "--", "matmul"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    device = next((line for line in out.splitlines() if line.startswith("device:")), "device: ?")
    # wgtrain's whole table (backward products too), for the record.
    print("\n".join(line for line in out.splitlines() if line.startswith("|")), file=sys.stderr)
    rows = []
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            model, proj, mm, n, k, gflops = m.groups()
            rows.append((model, proj, int(mm), int(n), int(k), float(gflops)))
    if not rows:
        sys.exit(f"no matmul_forward rows in the bench output:\n{out}")
    return device, rows


def numpy_gflops(np, m: int, n: int, k: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    x @ w.T  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - start)
    return 2.0 * m * n * k / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", default="128,512", help="sequence lengths (rows of x)")
    parser.add_argument("--sizes", default="0.5B,1.5B", help="Qwen2.5 sizes")
    parser.add_argument("--threads", type=int, default=2, help="numpy (OpenBLAS) threads")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repetitions of the (wgtrain, numpy) pair (median of each side)")
    args = parser.parse_args()
    # Before numpy loads OpenBLAS.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    print(f"numpy {np.__version__}, {args.threads} threads, {args.rounds} round(s)")
    print("| T | model | projection | M×N×K | wgtrain GFLOP/s | numpy GFLOP/s | ratio | "
          "per-round ratios |")
    print("|---:|---|---|---|---:|---:|---:|---|")
    for t in (int(v) for v in args.t.split(",")):
        # shape -> ([wgtrain GFLOP/s], [numpy GFLOP/s]), one of each per round.
        rates = {}
        for _ in range(args.rounds):
            device, rows = wgtrain_rows(t, args.sizes, args.reps)
            for model, proj, m, n, k, ours in rows:
                theirs = numpy_gflops(np, m, n, k, args.reps)
                ours_all, theirs_all = rates.setdefault((model, proj, m, n, k), ([], []))
                ours_all.append(ours)
                theirs_all.append(theirs)
        for (model, proj, m, n, k), (ours, theirs) in rates.items():
            ratios = sorted(o / t_ for o, t_ in zip(ours, theirs))
            ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
            print(f"| {t} | {model} | {proj} | {m}×{n}×{k} | {ours_med:.1f} | {theirs_med:.1f} | "
                  f"{ours_med / theirs_med:.2f}x | {ratios[0]:.2f}–{ratios[-1]:.2f}x |",
                  flush=True)
    print(device)


if __name__ == "__main__":
    main()
