"""wgtrain against PyTorch (+PEFT) on the CPU, timed in one run: the masked loss and a LoRA training
step, on the tiny test checkpoints and at the Qwen2.5-0.5B shape with random weights.

The wgtrain side is `cargo bench --bench compare` (lavapipe, or whatever Vulkan device it finds),
whose doc comment says what each case runs; this script runs it, then the same work in PyTorch
with --threads CPU threads (default 2) on the same token ids, and prints both with the ratio
wgtrain throughput / PyTorch throughput (the issue's target: >= 0.25x).

PyTorch runs in f32 (the fastest it has on a CPU without bf16 units) with its default attention
(SDPA); the LoRA step is PEFT's LoRA on all 7 projections, forward + backward, clip_grad_norm_(1.0)
and AdamW, like `wgtrain::train::step`. Each measurement is the median of --reps runs after a
warm-up.

    pip install -r scripts/bench/requirements.txt
    python scripts/bench/cpu_compare.py                 # T = 128, every case
    python scripts/bench/cpu_compare.py --t 64 tiny     # the tiny checkpoints only
"""

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# case -> (fixture directory or None for random weights at the 0.5B shape, LoRA rank): the
# table in benches/compare.rs.
CASES = {
    "tiny-qwen2-untied": ("tests/fixtures/tiny-qwen2-untied", 8),
    "tiny-qwen2-tied": ("tests/fixtures/tiny-qwen2-tied", 8),
    "0.5B": (None, 64),
}


def run_wgtrain(t: int, reps: int, cases: list[str]) -> dict[str, tuple[float, float]]:
    """case -> (masked loss ms, LoRA step ms) from `cargo bench --bench compare`."""
    env = dict(os.environ, WGTRAIN_BENCH_T=str(t), WGTRAIN_BENCH_REPS=str(reps))
    cmd = ["cargo", "bench", "--bench", "compare", "--", *cases]
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    rows = {}
    for line in out.stdout.splitlines():
        if line.startswith("device:"):
            print(f"wgtrain {line}")
        cells = [c.strip() for c in line.strip("|").split("|")]
        # case, T, loss ms, step ms, then the CPU time columns (not compared here).
        if len(cells) >= 4 and cells[0] in CASES:
            rows[cells[0]] = (float(cells[2]), float(cells[3]))
    missing = [c for c in cases if c not in rows]
    if missing:
        raise SystemExit(f"`{' '.join(cmd)}` printed no row for {missing}:\n{out.stdout}")
    return rows


def bench_row(vocab: int, t: int):
    """The ids of benches/common/mod.rs's bench_row: ids[i] = 7919 i mod vocab."""
    import torch

    return torch.tensor([[(i * 7919) % vocab for i in range(t)]])


def load(case: str):
    import torch
    from transformers import Qwen2ForCausalLM

    from peft_train_step import qwen25_config  # this folder: the shared model shapes

    fixture, _ = CASES[case]
    if fixture is not None:
        return Qwen2ForCausalLM.from_pretrained(ROOT / fixture, torch_dtype=torch.float32)
    config = qwen25_config("0.5B")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float()


def median_ms(reps: int, run) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_torch(case: str, t: int, reps: int) -> tuple[float, float]:
    """(masked loss ms, LoRA step ms) in PyTorch + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_train_step import TARGETS

    model = load(case).eval()
    ids = bench_row(model.config.vocab_size, t)
    # wgtrain leaves the targets of positions < T/2 unsupervised; transformers shifts labels by
    # one, so labels up to T/2 inclusive are masked.
    masked = ids.clone()
    masked[:, : t // 2 + 1] = -100

    def loss():
        with torch.no_grad():
            model(input_ids=ids, labels=masked).loss.item()

    loss_ms = median_ms(reps, loss)
    rank = CASES[case][1]
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    peft_model = get_peft_model(model, lora).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)

    def step():
        peft_model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return loss_ms, median_ms(reps, step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", help="case names or parts of them (default: all)")
    ap.add_argument("--t", type=int, default=128, help="tokens in the row")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.cases or any(f in c for f in args.cases)]
    if not cases:
        raise SystemExit(f"no case matches {args.cases} (cases: {', '.join(CASES)})")

    ours = run_wgtrain(args.t, args.reps, cases)
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    print(
        f"PyTorch: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )
    print(f"T = {args.t}, median of {args.reps} run(s) after a warm-up; ratio = wgtrain "
          "throughput / PyTorch throughput\n")
    print("| case | masked loss wgtrain (ms) | PyTorch (ms) | ratio "
          "| LoRA step wgtrain (ms) | PyTorch+PEFT (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        (w_loss, w_step), (p_loss, p_step) = ours[case], run_torch(case, args.t, args.reps)
        print(
            f"| {case} | {w_loss:.1f} | {p_loss:.1f} | {p_loss / w_loss:.2f}x "
            f"| {w_step:.1f} | {p_step:.1f} | {p_step / w_step:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
