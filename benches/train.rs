//! `cargo bench --bench train`: one optimizer step of training at Qwen2.5-0.5B and 1.5B shapes
//! (all layers, real vocabulary, tied embeddings) with random weights, so nothing is downloaded:
//! - LoRA r 64 (alpha 128) on all 7 projections of every layer, over the frozen bf16 model
//!   (0.5B and 1.5B);
//! - full fine-tuning with f32 master weights (0.5B).
//!
//! A step is what the trainer does for one micro-batch of one row of T tokens (every target
//! supervised): zero the gradients, forward + backward ([`Qwen2::forward_backward`]), the global
//! gradient norm (read back), then AdamW on every parameter, timed wall-clock from an idle device
//! (`gpu.wait()`) to the optimizer step's completion (`gpu.wait()`). One warm-up step compiles the
//! pipelines; the median of the following steps is reported.
//!
//! Memory is the sum of the device tensors the step allocates: weights (+ adapter), gradients,
//! AdamW moments, and the activations of `forward_backward` (every layer's input, one set of layer
//! activations and backward scratch for T rows, final norm and its gradients); the cross-entropy's
//! chunked logits and the attention's split-key scratch (transient, bounded) are not counted.
//!
//! GPUs default to T = 1024, 4096, 16384 and 3 timed steps; CPU adapters (lavapipe) to T = 16 and
//! 1 step (a 0.5B step at T = 1024 is ~3 TFLOP). Override with `WGTRAIN_BENCH_T`
//! (comma-separated) and `WGTRAIN_BENCH_REPS`; `cargo bench --bench train -- 0.5B` runs one model,
//! `-- lora` or `-- full` one method (arguments combine).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use wgtrain::model::{
    Adapter, AdapterConfig, Grads, LayerActs, LoraPair, Proj, Qwen2, TargetModules,
};
use wgtrain_kernels::ops::optim::{adamw_step, grad_norm_sq, AdamW};
use wgtrain_kernels::{DType, Gpu, Tensor};

mod common;
use common::{config, env_list, random_model, MODELS, VOCAB};

const RANK: usize = 64;

/// (model, method) pairs benchmarked: `true` is full fine-tuning.
const CASES: [(&str, bool); 3] = [("0.5B", false), ("1.5B", false), ("0.5B", true)];

/// A LoRA of rank [`RANK`] on every projection: A small and random, B small and non-zero (so the
/// step's arithmetic is that of a trained adapter; the time does not depend on the values).
fn random_adapter(model: &Qwen2) -> Result<Adapter> {
    let config = AdapterConfig {
        r: RANK,
        lora_alpha: 2.0 * RANK as f64,
        lora_dropout: 0.0,
        target_modules: TargetModules::List(
            Proj::ALL.iter().map(|p| p.module().to_string()).collect(),
        ),
        use_rslora: false,
        base_model: None,
    };
    let mut modules = BTreeMap::new();
    for (l, proj) in Adapter::targets(&config, &model.config)? {
        let (out_f, in_f) = proj.shape(&model.config);
        let a = (0..RANK * in_f)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-4)
            .collect();
        let b = (0..out_f * RANK)
            .map(|i| ((i * 104729 % 197) as f32 - 98.0) * 1e-5)
            .collect();
        modules.insert((l, proj), LoraPair { a, b });
    }
    Ok(Adapter { config, modules })
}

/// The trainable parameters with their gradients and AdamW moments.
struct Trainer<'a> {
    model: &'a Qwen2,
    grads: Grads,
    moments: Vec<(Tensor, Tensor)>,
    norm_sq: Tensor,
}

impl<'a> Trainer<'a> {
    fn new(gpu: &Gpu, model: &'a Qwen2) -> Result<Trainer<'a>> {
        let grads = Grads::new(gpu, model)?;
        let moments = grads
            .params(model)
            .iter()
            .map(|p| {
                Ok((
                    Tensor::zeros(gpu, p.value.shape(), DType::F32)?,
                    Tensor::zeros(gpu, p.value.shape(), DType::F32)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Trainer {
            model,
            grads,
            moments,
            norm_sq: Tensor::zeros(gpu, &[1], DType::F32)?,
        })
    }

    /// Device bytes of the gradients and the AdamW moments.
    fn state_bytes(&self) -> (u64, u64) {
        let params = self.grads.params(self.model);
        let grads = params.iter().map(|p| p.grad.device_bytes()).sum();
        let moments = self
            .moments
            .iter()
            .map(|(m, v)| m.device_bytes() + v.device_bytes())
            .sum();
        (grads, moments)
    }

    /// One optimizer step on one row of `t` tokens, as the trainer runs it; its wall-clock time.
    fn step(&self, gpu: &Gpu, t: usize, index: u32) -> Result<Duration> {
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
        let targets: Vec<u32> = (0..t as u32)
            .map(|i| (i * 7919 + 7919) % VOCAB as u32)
            .collect();
        let params = self.grads.params(self.model);
        let grad_list: Vec<&Tensor> = params.iter().map(|p| p.grad).collect();
        gpu.wait()?;
        let start = Instant::now();
        self.grads.zero(gpu, self.model);
        let loss = self.model.forward_backward(
            gpu,
            &self.grads,
            &[(&ids, &targets)],
            1.0 / t as f32,
            None,
        )?;
        let mut batch = gpu.batch();
        grad_norm_sq(&mut batch, &grad_list, &self.norm_sq)?;
        batch.submit();
        let norm = (self.norm_sq.to_f32(gpu)?[0] as f64).sqrt();
        anyhow::ensure!(
            loss.sum.is_finite() && norm.is_finite(),
            "loss {} or gradient norm {norm} is not finite",
            loss.sum
        );
        let mut batch = gpu.batch();
        for (p, (m, v)) in params.iter().zip(&self.moments) {
            let hyper = AdamW {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: if p.decays() { 0.01 } else { 0.0 },
                step: index,
            };
            adamw_step(
                &mut batch,
                p.value,
                p.grad,
                m,
                v,
                &hyper,
                Some((&self.norm_sq, 1.0)),
            )?;
        }
        batch.submit();
        gpu.wait()?;
        Ok(start.elapsed())
    }
}

/// Device bytes of what `forward_backward` allocates for `n` rows (see the module docs).
fn activation_bytes(model: &Qwen2, n: usize) -> u64 {
    let c = &model.config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    // Layer inputs xs[0..=L]; final norm output, its gradient, dres; backward scratch.
    let rows =
        (c.num_hidden_layers + 1) * h + 3 * h + 3 * i + h + 2 * c.q_dim() + 2 * c.kv_dim() + 4; // ids, targets, rstd, lse
    LayerActs::bytes(model, n) + (n * rows * 4) as u64
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1 << 20) as f64)
}

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let model_filter: Vec<&String> = filter.iter().filter(|f| f.ends_with('B')).collect();
    let method_filter: Vec<&String> = filter.iter().filter(|f| !f.ends_with('B')).collect();
    let gpu = Gpu::from_env()?;
    let cpu = gpu.is_cpu();
    let lengths = env_list(
        "WGTRAIN_BENCH_T",
        if cpu { &[16] } else { &[1024, 4096, 16384] },
    );
    let reps = env_list("WGTRAIN_BENCH_REPS", if cpu { &[1] } else { &[3] })[0].max(1);
    println!("device: {}", gpu.describe());
    println!(
        "random weights, all layers, vocab {VOCAB}, batch 1; LoRA r {RANK} on all 7 projections \
         (bf16 base), full = f32 master weights; AdamW; median of {reps} step(s) after a warm-up\n"
    );
    println!("| model | method | T | step (ms) | tokens/s | weights MiB | grads + AdamW MiB | activations MiB | total MiB |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for &(name, full) in &CASES {
        let method = if full { "full" } else { "lora" };
        if !model_filter.is_empty() && !model_filter.iter().any(|f| *f == name)
            || !method_filter.is_empty() && !method_filter.iter().any(|f| *f == method)
        {
            continue;
        }
        let m = MODELS.iter().find(|m| m.0 == name).expect("known model");
        let mut model = random_model(&gpu, config(m)?, full)?;
        if !full {
            let adapter = random_adapter(&model)?;
            model.apply_adapter(&gpu, &adapter)?;
        }
        let trainer = Trainer::new(&gpu, &model)?;
        let (grads, moments) = trainer.state_bytes();
        let weights = model.device_bytes();
        let mut index = 1;
        trainer.step(&gpu, 8, index)?; // compiles every pipeline
        for &t in &lengths {
            trainer.step(&gpu, t, index)?; // warm-up at this length
            let mut times: Vec<Duration> = (0..reps)
                .map(|_| {
                    index += 1;
                    trainer.step(&gpu, t, index)
                })
                .collect::<Result<_>>()?;
            times.sort();
            let median = times[reps / 2].as_secs_f64();
            let acts = activation_bytes(&model, t);
            println!(
                "| {name} | {method} | {t} | {:.1} | {:.1} | {} | {} | {} | {} |",
                median * 1e3,
                t as f64 / median,
                mib(weights),
                mib(grads + moments),
                mib(acts),
                mib(weights + grads + moments + acts),
            );
        }
    }
    Ok(())
}
