//! `cargo bench --bench stream`: models larger than the device (`--device-memory`).
//!
//! Default: the memory plan of a LoRA step (r 64 on all 7 projections, AdamW, one row of T tokens)
//! at Qwen2.5 3B, 7B, 14B and 32B shapes, T 4096 and 16384 (`WGTRAIN_BENCH_T`), without a budget
//! and under each of `WGTRAIN_BENCH_BUDGETS` (default 24GiB,16GiB,8GiB), on a dry-run device with
//! zero weights (the config alone; nothing downloaded or executed): the resident and streamed
//! layers, whether the embedding and the LM head are paged, whether the layer inputs wait in
//! host memory, the token chunk of each layer's token-local part (o_proj + MLP; "-": whole
//! layers), the planned and the counted peak, the
//! host memory the plan reads from, the bytes moved host <-> device per step and what they take
//! over PCIe 4.0 x16 at 25 GB/s (computed, not measured), next to the step's model FLOPs.
//! `cargo bench --bench stream -- 7B` plans one model.
//!
//! `WGTRAIN_BENCH_STREAM=1`: timed on the device. A 0.5B-shape checkpoint of random bf16 weights
//! is written to a temporary directory and memory-mapped; the same LoRA step then runs with every
//! weight resident, with everything paged (every layer streamed through two slots, the
//! embedding's rows gathered on the host and the LM head's chunks streamed; layer inputs on the
//! device), and resident in token chunks of `WGTRAIN_BENCH_CHUNK` rows (default T / 4),
//! alternating, `WGTRAIN_BENCH_REPS` steps each (default 3) after a warm-up, at T from
//! `WGTRAIN_BENCH_T` (default 16 on a CPU adapter, 1024 on a GPU): the medians, their ratios to
//! the resident step and the bytes streamed per step.
use std::time::Duration;

use anyhow::Result;
use wgtrain::model::residency::{size, weight_bytes, Paging, Working};
use wgtrain::model::{parse_size, MemoryPlan, PerProj, Proj, Qwen2, Qwen2Config, Weights};
use wgtrain::train::demo::write_random_weights;
use wgtrain::train::flops::{row_flops, Trainable};
use wgtrain::train::step::lora_step_working;
use wgtrain_kernels::{Gpu, GpuOptions};

mod common;
use common::{env_list, random_adapter, Trainer, RANK};

/// PCIe 4.0 x16's practical host -> device rate.
const PCIE_BYTES_PER_S: f64 = 25e9;
const GIB: f64 = (1u64 << 30) as f64;

fn all_projections() -> PerProj<Option<usize>> {
    PerProj::from_fn(|_: Proj| Some(RANK))
}

fn working(config: &Qwen2Config, t: usize) -> Working {
    lora_step_working(config, &all_projections(), true, false, t)
}

fn budgets() -> Result<Vec<Option<u64>>> {
    let list = std::env::var("WGTRAIN_BENCH_BUDGETS").unwrap_or("24GiB,16GiB,8GiB".into());
    let mut out = vec![None];
    for b in list.split(',').filter(|b| !b.trim().is_empty()) {
        out.push(Some(parse_size(b)?));
    }
    Ok(out)
}

/// The plan table on a dry-run device.
fn plans(models: &[String]) -> Result<()> {
    let gpu = Gpu::new(&GpuOptions {
        dry_run: true,
        ..GpuOptions::from_env()?
    })?;
    let lengths = env_list("WGTRAIN_BENCH_T", &[4096, 16384]);
    println!(
        "LoRA r {RANK} on all 7 projections, AdamW, one row of T tokens; dry run (counted, not \
         executed); PCIe at 25 GB/s computed\n"
    );
    println!(
        "| model | T | budget | resident layers | streamed (slots) | paged | layer inputs | \
         token chunk | planned GiB | peak GiB | host GiB | host<->device GiB/step | PCIe s/step | \
         step TFLOP |"
    );
    println!("|---|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for name in ["3B", "7B", "14B", "32B"] {
        if !models.is_empty() && !models.iter().any(|m| m == name) {
            continue;
        }
        let config = Qwen2Config::qwen25(name)?;
        let adapter = random_adapter(&config, RANK)?;
        for &t in &lengths {
            let flops = row_flops(&config, &Trainable::Lora(all_projections()), t) / 1e12;
            for budget in budgets()? {
                let label = budget.map_or("none".into(), |b| format!("{:.0} GiB", b as f64 / GIB));
                let plan = match MemoryPlan::fit(&config, budget, working(&config, t)) {
                    Ok(plan) => plan,
                    Err(e) => {
                        let why = format!("{e:#}");
                        let least = why.split(": ").nth(1).unwrap_or(&why);
                        println!("| {name} | {t} | {label} | refused: {least} |||||||||||");
                        continue;
                    }
                };
                let mut model = Qwen2::zeroed_planned(&gpu, config.clone(), plan.clone())?;
                model.apply_adapter(&gpu, &adapter)?;
                let (_, report) = Trainer::new(&gpu, &model)?.step(&gpu, t, 0)?;
                let traffic = plan.training_traffic();
                let paged = match (plan.paging.embedding, plan.paging.head) {
                    (true, true) => "embedding, head",
                    (true, false) => "embedding",
                    (false, true) => "head",
                    (false, false) => "-",
                };
                println!(
                    "| {name} | {t} | {label} | {} | {} ({}) | {paged} | {} | {} | {:.1} | {:.1} | \
                     {:.1} | \
                     {:.1} | {:.2} | {flops:.0} |",
                    plan.resident_layers,
                    plan.streamed_layers(),
                    plan.slots,
                    if plan.offloaded > 0 { "host" } else { "device" },
                    plan.chunk.map_or("-".into(), |c| c.to_string()),
                    plan.device_bytes() as f64 / GIB,
                    report.peak as f64 / GIB,
                    plan.host_bytes() as f64 / GIB,
                    traffic as f64 / GIB,
                    traffic as f64 / PCIE_BYTES_PER_S,
                );
            }
        }
    }
    Ok(())
}

/// The 0.5B-shape LoRA step resident, streamed and in token chunks on the device, alternating.
fn timed() -> Result<()> {
    let gpu = Gpu::from_env()?;
    let t = env_list(
        "WGTRAIN_BENCH_T",
        if gpu.is_cpu() { &[16] } else { &[1024] },
    )[0];
    let chunk = env_list("WGTRAIN_BENCH_CHUNK", &[t.div_ceil(4)])[0];
    let reps = env_list("WGTRAIN_BENCH_REPS", &[3])[0].max(1);
    let config = Qwen2Config::qwen25("0.5B")?;
    let dir = tempfile::tempdir()?;
    write_random_weights(dir.path(), &config, 1)?;
    let adapter = random_adapter(&config, RANK)?;
    let work = working(&config, t);
    let (layer, _) = weight_bytes(&config, false);
    // Room for the paged embedding's rows and head's ring, two layer slots and the working set.
    let paged = MemoryPlan {
        paging: Paging {
            embedding: true,
            head: true,
            inputs: false,
        },
        ..MemoryPlan::fit(&config, None, work)?
    };
    let all_paged = Some(paged.other_device_bytes() + 2 * layer + work.bytes);
    let mut models = Vec::new();
    for (budget, token_chunk) in [(None, None), (all_paged, None), (None, Some(chunk))] {
        let plan = MemoryPlan::fit(&config, budget, work)?;
        let weights = Weights::open(dir.path())?;
        let mut model = Qwen2::from_weights(&gpu, config.clone(), weights, plan)?;
        model.apply_adapter(&gpu, &adapter)?;
        model.set_token_chunk(token_chunk)?;
        models.push(model);
    }
    let plan = models[1].memory_plan().expect("streamed");
    anyhow::ensure!(
        plan.paging.embedding && plan.paging.head && plan.slots == 2,
        "not everything is paged: {plan:?}"
    );
    println!("device: {}", gpu.describe());
    println!(
        "0.5B shape, random bf16 weights memory-mapped from {}; LoRA r {RANK} all projections, \
         AdamW, one row of {t} tokens; paged: {} layers through {} slots, the embedding's rows, \
         the LM head in {} chunks through {} slots, {} per step planned; token chunks of {chunk} \
         rows; median of {reps} alternating steps after a warm-up",
        dir.path().display(),
        plan.streamed_layers(),
        plan.slots,
        plan.head_ring.chunks,
        plan.head_ring.slots,
        size(plan.training_traffic()).trim()
    );
    let trainers = models
        .iter()
        .map(|m| Trainer::new(&gpu, m))
        .collect::<Result<Vec<_>>>()?;
    let mut times: [Vec<Duration>; 3] = Default::default();
    for rep in 0..=reps {
        for (k, trainer) in trainers.iter().enumerate() {
            let before = models[k].streamed_bytes();
            let (time, _) = trainer.step(&gpu, t, rep)?;
            if rep > 0 {
                times[k].push(time);
                let moved = models[k].streamed_bytes() - before;
                if k == 1 && rep == 1 {
                    println!(
                        "bytes streamed host -> device per step: {}",
                        size(moved).trim()
                    );
                }
            }
        }
    }
    let [resident, paged, chunked] = times.map(|mut v| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    });
    println!(
        "| T | resident step (s) | paged step (s) | paged / resident | chunked step (s) | \
         chunked / resident |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {t} | {resident:.3} | {paged:.3} | {:.3} | {chunked:.3} | {:.3} |",
        paged / resident,
        chunked / resident
    );
    Ok(())
}

fn main() -> Result<()> {
    let models: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.ends_with('B') && !a.starts_with('-'))
        .collect();
    match std::env::var("WGTRAIN_BENCH_STREAM").is_ok_and(|v| v == "1") {
        true => timed(),
        false => plans(&models),
    }
}
