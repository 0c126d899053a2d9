//! `cargo bench --bench compare`: wgtrain's side of scripts/bench/cpu_compare.py, which times the
//! same work in PyTorch (+PEFT) in the same run and prints the ratios. For each case, one row of T
//! tokens (`common::bench_row`, the ids PyTorch is fed too):
//! - the masked loss: the summed cross-entropy of the row's second half (its first half is a
//!   prompt, unsupervised), forward only, read back;
//! - a LoRA step: LoRA on all 7 projections, forward + backward over every target, the global
//!   gradient norm (read back), clipped AdamW (the trainer's step).
//!
//! Cases: the tiny test checkpoints (tests/fixtures/tiny-qwen2-untied and -tied, LoRA r 8) and
//! the Qwen2.5-0.5B shape with random bf16 weights (LoRA r 64, as `--bench train`). Each is timed
//! wall-clock after a warm-up at the same length (pipeline compilation), median of
//! `WGTRAIN_BENCH_REPS` (default 1) runs; `WGTRAIN_BENCH_T` sets T (default 128). The process's CPU
//! time per run (mean, every thread: lavapipe's workers run the kernels) follows: on a machine
//! shared with other work it measures the work done, where wall time also measures the waits for
//! a core.
//! `cargo bench --bench compare -- tiny` or `-- 0.5B` runs those cases only; with
//! `WGTRAIN_PROFILE=1` each case's loss and step also print their per-kernel profile.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use wgtrain::model::{Qwen2, Qwen2Config, IGNORE};
use wgtrain_kernels::Gpu;

mod common;
use common::{bench_row, env_list, name_filter, random_adapter, random_model, Trainer};

/// (case, fixture directory or None for random weights at the 0.5B shape, LoRA rank).
const CASES: [(&str, Option<&str>, usize); 3] = [
    (
        "tiny-qwen2-untied",
        Some("tests/fixtures/tiny-qwen2-untied"),
        8,
    ),
    ("tiny-qwen2-tied", Some("tests/fixtures/tiny-qwen2-tied"), 8),
    ("0.5B", None, 64),
];

/// CPU time of this process so far, all threads.
#[cfg(unix)]
fn cpu_time() -> Option<Duration> {
    // SAFETY: getrusage only writes the struct it is given; all-zero is a valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)
    }?;
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

#[cfg(not(unix))]
fn cpu_time() -> Option<Duration> {
    None
}

/// The median wall time of `reps` runs of `run` after one warm-up run, and their mean CPU time
/// (None where the platform does not report it).
fn median(
    reps: usize,
    mut run: impl FnMut() -> Result<Duration>,
) -> Result<(Duration, Option<Duration>)> {
    run()?;
    let start = cpu_time();
    let mut times = (0..reps).map(|_| run()).collect::<Result<Vec<_>>>()?;
    let cpu = start.zip(cpu_time()).map(|(a, b)| (b - a) / reps as u32);
    times.sort();
    Ok((times[reps / 2], cpu))
}

/// Milliseconds with one decimal, or `-` for a time not measured.
fn ms(time: Option<Duration>) -> String {
    time.map_or("-".into(), |t| format!("{:.1}", t.as_secs_f64() * 1e3))
}

fn main() -> Result<()> {
    let filter = name_filter();
    let gpu = Gpu::from_env()?;
    let t = env_list("WGTRAIN_BENCH_T", &[128])[0];
    let reps = env_list("WGTRAIN_BENCH_REPS", &[1])[0].max(1);
    println!("device: {}", gpu.describe());
    println!("one row of {t} tokens; median of {reps} run(s) after a warm-up\n");
    println!("| case | T | masked loss (ms) | LoRA step (ms) | loss CPU (ms) | step CPU (ms) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (case, fixture, rank) in CASES {
        if !filter.is_empty() && !filter.iter().any(|f| case.contains(f.as_str())) {
            continue;
        }
        let mut model = match fixture {
            Some(dir) => Qwen2::load(&gpu, root.join(dir))?,
            None => random_model(&gpu, Qwen2Config::qwen25(case)?, false)?,
        };
        let (ids, mut targets) = bench_row(model.config.vocab_size, t);
        targets[..t / 2].fill(IGNORE);
        let loss = median(reps, || {
            let start = Instant::now();
            let sum = model.loss_sum(&gpu, &[(&ids, &targets)])?;
            ensure!(sum.sum.is_finite(), "{case}: the loss is not finite");
            Ok(start.elapsed())
        })?;
        if let Some(profile) = &gpu.profile {
            eprintln!(
                "{case} masked loss, warm-up and timed runs: {}",
                profile.report()
            );
        }
        model.apply_adapter(&gpu, &random_adapter(&model.config, rank)?)?;
        let trainer = Trainer::new(&gpu, &model)?;
        let mut index = 0;
        let step = median(reps, || {
            index += 1;
            Ok(trainer.step(&gpu, t, index)?.0)
        })?;
        if let Some(profile) = &gpu.profile {
            eprintln!(
                "{case} LoRA step, warm-up and timed runs: {}",
                profile.report()
            );
        }
        println!(
            "| {case} | {t} | {} | {} | {} | {} |",
            ms(Some(loss.0)),
            ms(Some(step.0)),
            ms(loss.1),
            ms(step.1)
        );
    }
    Ok(())
}
