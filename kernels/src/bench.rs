//! Shapes and timing for kernel benchmarks (`cargo bench`), shared by every family's `bench`.
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::batch::Batch;
use crate::gpu::Gpu;

/// The dimensions of a decoder model that set kernel shapes. The kernels crate knows no model:
/// the caller names the shapes to measure (`benches/kernels.rs` takes Qwen2.5's from the model side).
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// One measured kernel: median GPU time over the repetitions, and the work it did.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub kernel: String,
    pub shape: String,
    pub time: Duration,
    /// Floating-point operations (multiply-add = 2), 0 where bandwidth is the measure.
    pub flops: f64,
    /// Bytes the kernel must read and write at least.
    pub bytes: f64,
}

impl BenchResult {
    pub fn gflops(&self) -> f64 {
        self.flops / self.time.as_secs_f64() / 1e9
    }

    pub fn gbytes(&self) -> f64 {
        self.bytes / self.time.as_secs_f64() / 1e9
    }
}

/// Warm-up after compilation: on lavapipe the first kernel a bench timed ran 1.7x slower (median of
/// 9) than after 5 more warm-up runs (0.5B q forward, 2026-12-07).
const WARM_UP: Duration = Duration::from_millis(200);
const WARM_UP_RUNS: usize = 5;

/// Times `record` (which records one run of the kernel into a batch): warm-up runs (pipeline
/// compilation, then runs until [`WARM_UP`] has passed, at most [`WARM_UP_RUNS`]), then the median
/// of `reps` timed runs.
pub fn time(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Batch) -> Result<()>,
) -> Result<Duration> {
    let mut warm = gpu.batch();
    record(&mut warm)?;
    warm.submit_timed()?;
    let start = Instant::now();
    for _ in 0..WARM_UP_RUNS {
        if start.elapsed() >= WARM_UP {
            break;
        }
        let mut warm = gpu.batch();
        record(&mut warm)?;
        warm.submit_timed()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let mut batch = gpu.batch();
        record(&mut batch)?;
        times.push(batch.submit_timed()?);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Benchmark sizing: the model shapes, sequence length and repetitions. Full model shapes at
/// T = 4096 take minutes per kernel on a CPU adapter, so CPU adapters default to a shorter
/// sequence; `WGTRAIN_BENCH_T` and `WGTRAIN_BENCH_REPS` override.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Each family measures every shape (the smallest alone where one shape says enough).
    pub shapes: Vec<ModelShape>,
    pub seq_len: usize,
    pub reps: usize,
}

impl BenchConfig {
    pub fn for_gpu(gpu: &Gpu, shapes: Vec<ModelShape>) -> BenchConfig {
        let cpu = gpu.is_cpu();
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        BenchConfig {
            shapes,
            seq_len: env("WGTRAIN_BENCH_T", if cpu { 128 } else { 4096 }),
            reps: env("WGTRAIN_BENCH_REPS", if cpu { 2 } else { 10 }),
        }
    }
}
