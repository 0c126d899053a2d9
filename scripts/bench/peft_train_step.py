"""PyTorch + PEFT baseline for `cargo bench --bench train`: one optimizer step at Qwen2.5 shapes with
random weights, so the two can be compared on the same device.

Same work as the Rust bench: one row of T tokens, every target supervised, batch 1; LoRA r 64 /
alpha 128 on all 7 projections of a frozen bf16 model, or full fine-tuning (f32 master weights
under bf16 autocast, the analogue of wgtrain's f32 master weights over bf16-rounded activations);
AdamW; eager attention (the issue's "PyTorch+PEFT eager bf16"). A step is forward, backward,
clip_grad_norm_ (1.0) and AdamW, timed from a synchronised device to a synchronised device; one
warm-up step per length, then the median of --reps steps. Peak memory: torch.cuda's
max_memory_allocated on CUDA; on CPU the process's peak RSS (an upper bound that includes
Python and the weights' initialisation).

    python scripts/bench/peft_train_step.py --model 0.5B --method lora --t 1024,4096,16384

Pinned versions: scripts/fixtures/requirements.txt. `--grad-ckpt` turns on transformers' gradient
checkpointing (LLaMA-Factory's default), the closest match to wgtrain's per-layer recomputation.
"""

import argparse
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

# (hidden, intermediate, layers, heads, kv heads): the table in benches/common/mod.rs.
MODELS = {
    "0.5B": (896, 4864, 24, 14, 2),
    "1.5B": (1536, 8960, 28, 12, 2),
}
VOCAB = 151936
RANK = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen25_config(name: str, **extra) -> Qwen2Config:
    """Qwen2.5's architecture at the shape `name` (MODELS), random-weight benchmarks' config."""
    hidden, inter, layers, heads, kv = MODELS[name]
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_cache=False,
        **extra,
    )


def build(name: str, method: str, device: torch.device, grad_ckpt: bool):
    config = qwen25_config(
        name, max_position_embeddings=32768, attn_implementation="eager"
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if method == "lora" else torch.float32
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        model.enable_input_require_grads()
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, lora)
        # PEFT keeps the adapter in the base model's dtype; wgtrain trains f32 factors.
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, optim, ids, device, method):
    sync(device)
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=method == "full")
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="0.5B", choices=sorted(MODELS))
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--t", default="1024,4096,16384", help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grad-ckpt", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    model, optim = build(args.model, args.method, device, args.grad_ckpt)
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {what}; torch {torch.__version__}; grad checkpointing {args.grad_ckpt}")
    print("| model | method | T | step (ms) | tokens/s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for t in [int(x) for x in args.t.split(",")]:
        ids = torch.randint(0, VOCAB, (1, t), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(model, optim, ids, device, args.method)  # warm-up
        times = sorted(step(model, optim, ids, device, args.method) for _ in range(args.reps))
        median = statistics.median(times)
        print(
            f"| {args.model} | {args.method} | {t} | {median * 1e3:.1f} | {t / median:.1f} "
            f"| {peak_mib(device):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
