//! What the model and training benchmarks share: random weights at real shapes (the shapes are
//! `Qwen2Config::qwen25`'s) and the environment's lists.
#![allow(dead_code)]
use anyhow::Result;
use wgtrain::model::{Qwen2, Qwen2Config};
use wgtrain_kernels::{DType, Gpu, Tensor};

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
