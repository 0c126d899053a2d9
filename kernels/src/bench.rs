//! Shapes and timing for kernel benchmarks (`cargo bench`), shared by every family's `bench`.
use std::time::Duration;

use anyhow::Result;

use crate::gpu::{Batch, Gpu};

/// The dimensions of a Qwen2.5 model that set kernel shapes.
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

pub const QWEN25_0_5B: ModelShape = ModelShape {
    name: "0.5B",
    hidden: 896,
    intermediate: 4864,
    heads: 14,
    kv_heads: 2,
    head_dim: 64,
    vocab: 151936,
};
pub const QWEN25_1_5B: ModelShape = ModelShape {
    name: "1.5B",
    hidden: 1536,
    intermediate: 8960,
    heads: 12,
    kv_heads: 2,
    head_dim: 128,
    vocab: 151936,
};
pub const QWEN25_7B: ModelShape = ModelShape {
    name: "7B",
    hidden: 3584,
    intermediate: 18944,
    heads: 28,
    kv_heads: 4,
    head_dim: 128,
    vocab: 152064,
};
pub const MODEL_SHAPES: [ModelShape; 3] = [QWEN25_0_5B, QWEN25_1_5B, QWEN25_7B];

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

/// Times `record` (which records one run of the kernel into a batch): one warm-up run (pipeline
/// compilation), then the median of `reps` timed runs.
pub fn time(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Batch) -> Result<()>,
) -> Result<Duration> {
    let mut warm = gpu.batch();
    record(&mut warm)?;
    warm.submit_timed()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let mut batch = gpu.batch();
        record(&mut batch)?;
        times.push(batch.submit_timed()?);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Benchmark sizing: sequence length and repetitions. Full model shapes at T = 4096 take minutes
/// per kernel on a CPU adapter, so CPU adapters default to a shorter sequence; `WGTRAIN_BENCH_T`
/// and `WGTRAIN_BENCH_REPS` override.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    pub seq_len: usize,
    pub reps: usize,
}

impl BenchConfig {
    pub fn for_gpu(gpu: &Gpu) -> BenchConfig {
        let cpu = gpu.is_cpu();
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        BenchConfig {
            seq_len: env("WGTRAIN_BENCH_T", if cpu { 128 } else { 4096 }),
            reps: env("WGTRAIN_BENCH_REPS", if cpu { 2 } else { 10 }),
        }
    }
}
