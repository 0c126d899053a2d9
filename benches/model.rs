//! `cargo bench --bench model`: the whole Qwen2 forward at Qwen2.5-0.5B and 1.5B shapes (all
//! layers, real vocabulary, tied embeddings as those checkpoints have) with random bf16 weights, so
//! nothing is downloaded. For each sequence length T and batch size B it times
//! - prefill: B prompts of T tokens, each through every layer into its own KV-cache slot, plus its
//!   last row's logits;
//! - decode: then N steps that each run one token of every sequence (B rows) through the model
//!   against the B slots and read back [B, vocab] logits, as batched generation does; decode
//!   tokens/s counts B tokens per step, and the last column compares it with B = 1,
//!
//! as wall-clock time around submit-and-readback (end to end, host recording included), after a
//! warm-up that compiles the pipelines. Memory is the sum of the device tensors the run allocates:
//! weights + KV cache + one set of layer activations for the larger of T and B rows + residual
//! streams and logits; the attention's transient split-key scratch (at most 64 MiB) is not counted.
//!
//! GPUs default to T = 512 and 4096, N = 64; CPU adapters to T = 32 and N = 4; B = 1, 8 and 32 on
//! both. Override with `WGTRAIN_BENCH_T`, `WGTRAIN_BENCH_DECODE` and `WGTRAIN_BENCH_BATCH`
//! (comma-separated lists); `cargo bench --bench model -- 0.5B` runs one model.
use std::time::{Duration, Instant};

use anyhow::Result;
use wgtrain::model::{KvCache, LayerActs, Qwen2, Qwen2Config};
use wgtrain_kernels::Gpu;

mod common;
use common::{env_list, name_filter, random_model};

/// The sizes measured.
const MODELS: [&str; 2] = ["0.5B", "1.5B"];

/// Prefill `b` prompts of `t` tokens into their slots, then decode `n` steps of all `b`; the two
/// durations.
fn run(gpu: &Gpu, model: &Qwen2, b: usize, t: usize, n: usize) -> Result<(Duration, Duration)> {
    let vocab = model.config.vocab_size;
    let token = |i: usize| ((i * 7919) % vocab) as u32;
    let mut cache = KvCache::with_slots(gpu, model, b, t + n)?;
    let start = Instant::now();
    for s in 0..b {
        let prompt: Vec<u32> = (0..t).map(|i| token(i + 31 * s)).collect();
        model.prefill_slot(gpu, &mut cache, s, &prompt)?;
    }
    let prefill = start.elapsed();
    let start = Instant::now();
    for i in 0..n {
        let ids: Vec<u32> = (0..b).map(|s| token(i * 31 + s)).collect();
        model.decode_slots(gpu, &mut cache, &ids)?;
    }
    Ok((prefill, start.elapsed()))
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1 << 20) as f64)
}

fn main() -> Result<()> {
    let filter = name_filter();
    let gpu = Gpu::from_env()?;
    let cpu = gpu.is_cpu();
    let lengths = env_list("WGTRAIN_BENCH_T", if cpu { &[32] } else { &[512, 4096] });
    let decode = env_list("WGTRAIN_BENCH_DECODE", if cpu { &[4] } else { &[64] })[0];
    let batches = env_list("WGTRAIN_BENCH_BATCH", &[1, 8, 32]);
    println!("device: {}", gpu.describe());
    println!(
        "random bf16 weights, all layers, real vocabulary; decode: {decode} steps after the prompts\n"
    );
    println!("| model | T | B | prefill (ms) | prefill tok/s | decode step (ms) | decode tok/s | vs B = 1 | weights MiB | KV cache MiB | activations MiB | total MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in MODELS
        .into_iter()
        .filter(|m| filter.is_empty() || filter.iter().any(|f| f == m))
    {
        let model = random_model(&gpu, Qwen2Config::qwen25(name)?, false)?;
        // Compiles every pipeline: prefill, and decode with the matrix-vector and tiled products.
        run(&gpu, &model, 9, 8, 1)?;
        for &t in &lengths {
            let mut single = None;
            for &b in &batches {
                let (prefill, dec) = run(&gpu, &model, b, t, decode)?;
                let c = &model.config;
                let weights = model.device_bytes();
                let cache = KvCache::bytes(c, b, t + decode);
                // Layer activations, two residual streams + the final norm, logits: the larger of
                // a prefill (t rows, one logits row) and a decoding step (b rows, b logits rows).
                let acts = |rows: usize, logits: usize| {
                    LayerActs::bytes(&model, rows)
                        + (3 * rows * c.hidden_size * 4 + logits * c.vocab_size * 4) as u64
                };
                let acts = acts(t, 1).max(acts(b, b));
                let rate = (b * decode) as f64 / dec.as_secs_f64();
                let speedup = single.map_or("".into(), |s: f64| format!("{:.2}x", rate / s));
                if b == 1 {
                    single = Some(rate);
                }
                println!(
                    "| {} | {t} | {b} | {:.1} | {:.1} | {:.1} | {:.2} | {speedup} | {} | {} | {} | {} |",
                    name,
                    prefill.as_secs_f64() * 1e3,
                    (b * t) as f64 / prefill.as_secs_f64(),
                    dec.as_secs_f64() * 1e3 / decode as f64,
                    rate,
                    mib(weights),
                    mib(cache),
                    mib(acts),
                    mib(weights + cache + acts),
                );
            }
        }
    }
    Ok(())
}
