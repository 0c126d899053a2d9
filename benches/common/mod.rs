//! What the model and training benchmarks share: Qwen2.5 shapes and random weights at them.
#![allow(dead_code)]
use anyhow::Result;
use wgtrain::model::{Qwen2, Qwen2Config};
use wgtrain_kernels::{DType, Gpu, Tensor};

/// (name, hidden, intermediate, layers, heads, kv heads) of the Qwen2.5 checkpoints.
pub const MODELS: [(&str, usize, usize, usize, usize, usize); 2] = [
    ("0.5B", 896, 4864, 24, 14, 2),
    ("1.5B", 1536, 8960, 28, 12, 2),
];
pub const VOCAB: usize = 151936;
pub fn config(m: &(&str, usize, usize, usize, usize, usize)) -> Result<Qwen2Config> {
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

/// Random weights: matrices of magnitude 2^-10..2^-5 with random
/// signs (cheap to make by their bf16 bits), norm weights 1, biases 0.01. `f32` widens the
/// matrices to f32 (full fine-tuning's master weights).
pub fn random_model(gpu: &Gpu, config: Qwen2Config, f32: bool) -> Result<Qwen2> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    Qwen2::build(gpu, config, |spec, dtype| match dtype {
        DType::BF16 => {
            let n: usize = spec.shape.iter().product();
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 48) as u16 & 0x807f) | ((117 + (state % 6) as u16) << 7)
            };
            if f32 {
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|_| ((next() as u32) << 16).to_le_bytes())
                    .collect();
                Tensor::from_bytes(gpu, &spec.shape, DType::F32, &bytes)
            } else {
                let bytes: Vec<u8> = (0..n).flat_map(|_| next().to_le_bytes()).collect();
                Tensor::from_bytes(gpu, &spec.shape, DType::BF16, &bytes)
            }
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

pub fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}
