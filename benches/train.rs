//! `cargo bench --bench train`: one optimizer step of training at Qwen2.5 shapes
//! (`Qwen2Config::qwen25`: all layers, real vocabulary) with random weights, so nothing is
//! downloaded:
//! - LoRA r 64 (alpha 128) on all 7 projections of every layer, over the frozen bf16 model
//!   (0.5B, 1.5B, 3B, 7B, 14B, 32B);
//! - full fine-tuning with f32 master weights (0.5B, 1.5B).
//!
//! A step is the trainer's ([`wgtrain::train::step`]) for one micro-batch of one row of T tokens
//! (every target supervised): zero the gradients, forward + backward, the global gradient norm
//! (read back), then AdamW on every parameter, timed wall-clock from an idle device (`gpu.wait()`)
//! to the optimizer step's completion. One warm-up step compiles the pipelines; the median of the
//! following steps is reported.
//!
//! Memory is counted by the device (`Gpu::memory`): the weights (+ adapter), the gradients and
//! AdamW moments, and the step's peak — everything allocated at once during it, activations and
//! the kernels' temporaries included; "kept" is what the step held by keeping its activations
//! for the backward instead of recomputing them ("-": it recomputed; `Qwen2::kept_activations`).
//!
//! `WGTRAIN_BENCH_DRY=1` runs the steps on a dry-run device with zero weights: every tensor is
//! allocated and nothing executes, so it reports the memory of any size in seconds, on any device
//! (timing columns "-"). Its numbers are allocation counts; docs/training.md lists what fits where.
//!
//! GPUs default to T = 1024, 4096, 16384 and 3 timed steps; CPU adapters (lavapipe) to T = 16 and
//! 1 step (a 0.5B step at T = 1024 is ~3 TFLOP); dry runs to T = 4096, 16384. Override with
//! `WGTRAIN_BENCH_T` (comma-separated) and `WGTRAIN_BENCH_REPS`. Timed runs default to the
//! 0.5B and 1.5B LoRA and 0.5B full rows, dry runs to every row; `cargo bench --bench train --
//! 0.5B` runs one model, `-- lora` or `-- full` one method (arguments combine).
use std::time::Duration;

use anyhow::Result;
use wgtrain::model::{Qwen2, Qwen2Config};
use wgtrain::train::step::MemoryReport;

use wgtrain_kernels::{Gpu, GpuOptions};

mod common;
use common::{env_list, random_adapter, random_model, Trainer, RANK};

/// (model, method) pairs benchmarked: `true` is full fine-tuning. Timed runs default to the first
/// [`TIMED_CASES`] (the others need more memory than a CPU adapter's host or most GPUs have).
const CASES: [(&str, bool); 8] = [
    ("0.5B", false),
    ("1.5B", false),
    ("0.5B", true),
    ("3B", false),
    ("7B", false),
    ("14B", false),
    ("32B", false),
    ("1.5B", true),
];
const TIMED_CASES: usize = 3;

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
    let dry = std::env::var("WGTRAIN_BENCH_DRY").is_ok_and(|v| v == "1");
    let gpu = Gpu::new(&GpuOptions {
        dry_run: dry,
        ..GpuOptions::from_env()?
    })?;
    let default_t: &[usize] = match (dry, gpu.is_cpu()) {
        (true, _) => &[4096, 16384],
        (false, true) => &[16],
        (false, false) => &[1024, 4096, 16384],
    };
    let lengths = env_list("WGTRAIN_BENCH_T", default_t);
    let reps = env_list("WGTRAIN_BENCH_REPS", if gpu.is_cpu() { &[1] } else { &[3] })[0].max(1);
    println!("device: {}", gpu.describe());
    if dry {
        println!(
            "dry run: zero weights, every tensor allocated, nothing executed (memory only); \
             batch 1; LoRA r {RANK} on all 7 projections (bf16 base), full = f32 master weights; \
             AdamW\n"
        );
    } else {
        println!(
            "random weights, all layers, real vocabulary, batch 1; LoRA r {RANK} on all 7 \
             projections (bf16 base), full = f32 master weights; AdamW; median of {reps} step(s) \
             after a warm-up\n"
        );
    }
    println!(
        "| model | method | T | step (ms) | tokens/s | weights MiB | grads + AdamW MiB | kept MiB \
         | peak MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    // Without a filter the defaults run; a filter picks out of every case.
    let defaults = if dry { CASES.len() } else { TIMED_CASES };
    for (i, &(name, full)) in CASES.iter().enumerate() {
        let method = if full { "full" } else { "lora" };
        let picked = match filter.is_empty() {
            true => i < defaults,
            false => {
                (model_filter.is_empty() || model_filter.iter().any(|f| *f == name))
                    && (method_filter.is_empty() || method_filter.iter().any(|f| *f == method))
            }
        };
        if !picked {
            continue;
        }
        let config = Qwen2Config::qwen25(name)?;
        let mut model = match dry {
            true => Qwen2::zeroed(&gpu, config, full)?,
            false => random_model(&gpu, config, full)?,
        };
        if !full {
            let adapter = random_adapter(&model.config, RANK)?;
            model.apply_adapter(&gpu, &adapter)?;
        }
        let trainer = Trainer::new(&gpu, &model)?;
        let mut index = 0;
        if !dry {
            trainer.step(&gpu, 8, index)?; // compiles every pipeline
        }
        for &t in &lengths {
            let row = |time: &str, rate: &str, m: &MemoryReport| {
                println!(
                    "| {name} | {method} | {t} | {time} | {rate} | {} | {} | {} | {} |",
                    mib(m.frozen + m.trainable),
                    mib(m.gradients + m.optimizer),
                    m.kept.map_or("-".into(), mib),
                    mib(m.peak),
                )
            };
            if dry {
                row("-", "-", &trainer.step(&gpu, t, index)?.1);
                continue;
            }
            trainer.step(&gpu, t, index)?; // warm-up at this length
            let mut steps: Vec<(Duration, MemoryReport)> = (0..reps)
                .map(|_| {
                    index += 1;
                    trainer.step(&gpu, t, index)
                })
                .collect::<Result<_>>()?;
            steps.sort_by_key(|s| s.0);
            let (median, memory) = &steps[reps / 2];
            let median = median.as_secs_f64();
            row(
                &format!("{:.1}", median * 1e3),
                &format!("{:.1}", t as f64 / median),
                memory,
            );
        }
    }
    Ok(())
}
