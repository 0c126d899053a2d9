//! What the model and training benchmarks share: random weights at real shapes (the shapes are
//! `Qwen2Config::qwen25`'s), a random LoRA, the trainer's optimizer step, the rows they run and
//! the environment's lists.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use wgtrain::model::{
    Adapter, AdapterConfig, Grads, LoraPair, Proj, Qwen2, Qwen2Config, TargetModules,
};
use wgtrain::train::config::{OptimizerKind, OptimizerSettings};
use wgtrain::train::step::{gradients, new_moments, update, MemoryReport, MicroBatch, Moments};
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

pub const RANK: usize = 64;

/// One row of `t` tokens and its next-token targets, every one supervised:
/// `ids[i] = 7919·i mod vocab` (scripts/bench/cpu_compare.py feeds PyTorch the same ids).
pub fn bench_row(vocab: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let token = |i: usize| ((i * 7919) % vocab) as u32;
    ((0..t).map(token).collect(), (1..=t).map(token).collect())
}

/// A LoRA of rank `rank` (alpha 2·rank) on every projection: A small and random, B small and
/// non-zero (so the step's arithmetic is that of a trained adapter; the time does not depend on
/// the values).
pub fn random_adapter(model: &Qwen2Config, rank: usize) -> Result<Adapter> {
    let config = AdapterConfig {
        r: rank,
        lora_alpha: 2.0 * rank as f64,
        lora_dropout: 0.0,
        target_modules: TargetModules::List(
            Proj::ALL.iter().map(|p| p.module().to_string()).collect(),
        ),
        use_rslora: false,
        base_model: None,
    };
    let mut modules = BTreeMap::new();
    for (l, proj) in Adapter::targets(&config, model)? {
        let (out_f, in_f) = proj.shape(model);
        let a = (0..rank * in_f)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-4)
            .collect();
        let b = (0..out_f * rank)
            .map(|i| ((i * 104729 % 197) as f32 - 98.0) * 1e-5)
            .collect();
        modules.insert((l, proj), LoraPair { a, b });
    }
    Ok(Adapter { config, modules })
}

const ADAMW: OptimizerSettings = OptimizerSettings {
    kind: OptimizerKind::Adamw,
    lr: 1e-5,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
};

/// The trainable parameters' gradients and AdamW moments.
pub struct Trainer<'a> {
    model: &'a Qwen2,
    grads: Grads,
    moments: Vec<Option<Moments>>,
    norm_sq: Tensor,
}

impl<'a> Trainer<'a> {
    pub fn new(gpu: &Gpu, model: &'a Qwen2) -> Result<Trainer<'a>> {
        let grads = Grads::new(gpu, model)?;
        let moments = new_moments(gpu, &grads.params(model), OptimizerKind::Adamw)?;
        Ok(Trainer {
            model,
            grads,
            moments,
            norm_sq: Tensor::zeros(gpu, &[1], DType::F32)?,
        })
    }

    /// One optimizer step on one row of `t` tokens, as the trainer runs it: its wall-clock time
    /// and memory.
    pub fn step(&self, gpu: &Gpu, t: usize, index: usize) -> Result<(Duration, MemoryReport)> {
        let (ids, targets) = bench_row(self.model.config.vocab_size, t);
        let params = self.grads.params(self.model);
        gpu.wait()?;
        let start = Instant::now();
        gpu.reset_peak();
        let micro = MicroBatch {
            rows: vec![(&ids, &targets)],
            dropout: None,
        };
        let g = gradients(gpu, self.model, &self.grads, &[micro], &self.norm_sq)?;
        anyhow::ensure!(
            g.loss.is_finite() && g.grad_norm.is_finite(),
            "loss {} or gradient norm {} is not finite",
            g.loss,
            g.grad_norm
        );
        let clip = Some((&self.norm_sq, 1.0));
        update(gpu, &params, &self.moments, &ADAMW, ADAMW.lr, index, clip)?;
        let time = start.elapsed();
        let memory = MemoryReport::new(
            gpu,
            self.model,
            &params,
            &self.moments,
            (1, t),
            gpu.memory().peak,
        )?;
        Ok((time, memory))
    }
}

/// The names given on the bench's command line (`cargo bench --bench NAME -- a b`), flags left
/// out: the cases to run, all when empty.
pub fn name_filter() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}
