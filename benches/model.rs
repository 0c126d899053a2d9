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
use wgtrain_kernels::{DType, Gpu, Tensor};

/// (name, hidden, intermediate, layers, heads, kv heads) of the Qwen2.5 checkpoints.
const MODELS: [(&str, usize, usize, usize, usize, usize); 2] = [
    ("0.5B", 896, 4864, 24, 14, 2),
    ("1.5B", 1536, 8960, 28, 12, 2),
];
const VOCAB: usize = 151936;

fn config(m: &(&str, usize, usize, usize, usize, usize)) -> Result<Qwen2Config> {
    let &(_, hidden, inter, layers, heads, kv) = m;
    Qwen2Config::parse(
        &serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": VOCAB,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "max_position_embeddings": 32768,
        })
        .to_string(),
    )
}

/// Random weights: bf16 matrices of magnitude 2^-10..2^-5 with random signs (cheap to make by
/// their bits), norm weights 1, biases 0.01.
fn random_model(gpu: &Gpu, config: Qwen2Config) -> Result<Qwen2> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    Qwen2::build(gpu, config, |spec, dtype| match dtype {
        DType::BF16 => {
            let n: usize = spec.shape.iter().product();
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let bits = ((state >> 48) as u16 & 0x807f) | ((117 + (state % 6) as u16) << 7);
                    bits.to_le_bytes()
                })
                .collect();
            Tensor::from_bytes(gpu, &spec.shape, DType::BF16, &bytes)
        }
        _ => {
            let value = if spec.name.ends_with("norm.weight") {
                1.0
            } else {
                0.01
            };
            Tensor::from_f32(gpu, &spec.shape, &vec![value; spec.shape[0]])
        }
    })
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// Prefill `t` tokens, then decode `n`; the two durations.
fn run(gpu: &Gpu, model: &Qwen2, t: usize, n: usize) -> Result<(Duration, Duration)> {
    let prompt: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
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
    // wgpu is not a dependency of this crate; its DeviceType prints as "Cpu" for lavapipe.
    let cpu = format!("{:?}", gpu.info.device_type) == "Cpu";
    let lengths = env_list("WGTRAIN_BENCH_T", if cpu { &[32] } else { &[512, 4096] });
    let decode = env_list("WGTRAIN_BENCH_DECODE", if cpu { &[4] } else { &[64] })[0];
    println!("device: {}", gpu.describe());
    println!("random bf16 weights, all layers, vocab {VOCAB}; decode: {decode} tokens after the prompt\n");
    println!("| model | T | prefill (ms) | prefill tok/s | decode tok/s | weights MiB | KV cache MiB | activations MiB | total MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in MODELS
        .iter()
        .filter(|m| filter.is_empty() || filter.iter().any(|f| f == m.0))
    {
        let model = random_model(&gpu, config(m)?)?;
        run(&gpu, &model, 8, 1)?; // compiles every pipeline
        for &t in &lengths {
            let (prefill, dec) = run(&gpu, &model, t, decode)?;
            let c = &model.config;
            let weights = model.device_bytes();
            let cache = 2 * (c.num_hidden_layers * (t + decode) * c.kv_dim() * 4) as u64;
            // Layer activations, two residual streams + the final norm, last-row logits.
            let acts = LayerActs::bytes(&model, t) + (3 * t * c.hidden_size * 4 + VOCAB * 4) as u64;
            println!(
                "| {} | {t} | {:.1} | {:.1} | {:.2} | {} | {} | {} | {} |",
                m.0,
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
