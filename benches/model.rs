//! `cargo bench --bench model`: the whole Qwen2 forward at Qwen2.5-0.5B and 1.5B shapes (all
//! layers, real vocabulary, tied embeddings as those checkpoints have) with random bf16 weights, so
//! nothing is downloaded. For each sequence length T it times
//! - prefill: T prompt tokens through every layer into the KV cache, plus the last row's logits;
//! - decode: then N single tokens against that cache (each step reads back [vocab] logits, as a
//!   generation loop does),
//!
//! as wall-clock time around submit-and-readback (end to end, host recording included), after a
//! warm-up that compiles the pipelines. Memory is the sum of the device tensors the run allocates:
//! weights + KV cache + one set of layer activations for T rows + residual streams and logits; the
//! attention's transient split-key scratch (at most 64 MiB) is not counted.
//!
//! GPUs default to T = 512 and 4096 and N = 64; CPU adapters to T = 32 and N = 4. Override with
//! `WGTRAIN_BENCH_T` (comma-separated) and `WGTRAIN_BENCH_DECODE`; `cargo bench --bench model --
//! 0.5B` runs one model.
use std::time::{Duration, Instant};

use anyhow::Result;
use wgtrain::model::{KvCache, LayerActs, Qwen2, Qwen2Config};
use wgtrain_kernels::Gpu;

mod common;
use common::{env_list, random_model};

/// The sizes measured.
const MODELS: [&str; 2] = ["0.5B", "1.5B"];

/// Prefill `t` tokens, then decode `n`; the two durations.
fn run(gpu: &Gpu, model: &Qwen2, t: usize, n: usize) -> Result<(Duration, Duration)> {
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % vocab).collect();
    let mut cache = KvCache::new(gpu, model, t + n)?;
    let start = Instant::now();
    model.forward_cached(gpu, &mut cache, &prompt)?;
    let prefill = start.elapsed();
    let start = Instant::now();
    for i in 0..n {
        model.forward_cached(gpu, &mut cache, &[(i * 31) as u32])?;
    }
    Ok((prefill, start.elapsed()))
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1 << 20) as f64)
}

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let gpu = Gpu::from_env()?;
    let cpu = gpu.is_cpu();
    let lengths = env_list("WGTRAIN_BENCH_T", if cpu { &[32] } else { &[512, 4096] });
    let decode = env_list("WGTRAIN_BENCH_DECODE", if cpu { &[4] } else { &[64] })[0];
    println!("device: {}", gpu.describe());
    println!("random bf16 weights, all layers, real vocabulary; decode: {decode} tokens after the prompt\n");
    println!("| model | T | prefill (ms) | prefill tok/s | decode tok/s | weights MiB | KV cache MiB | activations MiB | total MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in MODELS
        .into_iter()
        .filter(|m| filter.is_empty() || filter.iter().any(|f| f == m))
    {
        let model = random_model(&gpu, Qwen2Config::qwen25(name)?, false)?;
        run(&gpu, &model, 8, 1)?; // compiles every pipeline
        for &t in &lengths {
            let (prefill, dec) = run(&gpu, &model, t, decode)?;
            let c = &model.config;
            let weights = model.device_bytes();
            let cache = 2 * (c.num_hidden_layers * (t + decode) * c.kv_dim() * 4) as u64;
            // Layer activations, two residual streams + the final norm, last-row logits.
            let acts =
                LayerActs::bytes(&model, t) + (3 * t * c.hidden_size * 4 + c.vocab_size * 4) as u64;
            println!(
                "| {name} | {t} | {:.1} | {:.1} | {:.2} | {} | {} | {} | {} |",
                prefill.as_secs_f64() * 1e3,
                t as f64 / prefill.as_secs_f64(),
                decode as f64 / dec.as_secs_f64(),
                mib(weights),
                mib(cache),
                mib(acts),
                mib(weights + cache + acts),
            );
        }
    }
    Ok(())
}
