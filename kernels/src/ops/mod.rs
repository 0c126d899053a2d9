//! One module per kernel family: typed launchers (`*_forward` / `*_backward`) that check shapes and
//! walk tensor chunks, plus `cpu`, the f64 reference the tests and `wgtrain selftest` compare with.
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod optim;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::bench::{BenchConfig, BenchResult};
use crate::gpu::Gpu;
use crate::shader::Kernel;

/// The result of comparing one kernel run with its CPU reference.
#[derive(Clone, Debug)]
pub struct Check {
    pub kernel: String,
    pub shape: String,
    /// max |gpu - cpu| / max(1, max |cpu|) over every output of the run.
    pub max_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.max_err.is_finite() && self.max_err <= self.tolerance
    }
}

/// Error of `gpu` against `cpu`, scaled by the reference's magnitude (at least 1), so large sums and
/// values near zero are judged alike. A length mismatch or a non-finite value is an infinite error.
pub fn max_error(gpu: &[f32], cpu: &[f64]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    let scale = cpu.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (&g, &c) in gpu.iter().zip(cpu) {
        let e = (g as f64 - c).abs();
        if !e.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(e);
    }
    worst / scale
}

/// Uniform random values in [-scale, scale) from a seed, as f32 (what the GPU sees).
pub fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Values rounded to bf16 and back, so the CPU reference sees exactly what a bf16 tensor holds.
pub fn round_bf16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

pub fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&x| x as f64).collect()
}

/// Every family's selftest cases, run in order on `gpu`.
pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    checks.extend(elementwise::selftest(gpu)?);
    checks.extend(matmul::selftest(gpu)?);
    checks.extend(lora::selftest(gpu)?);
    checks.extend(cross_entropy::selftest(gpu)?);
    checks.extend(attention::selftest(gpu)?);
    checks.extend(rope::selftest(gpu)?);
    checks.extend(rmsnorm::selftest(gpu)?);
    checks.extend(swiglu::selftest(gpu)?);
    checks.extend(embedding::selftest(gpu)?);
    checks.extend(optim::selftest(gpu)?);
    Ok(checks)
}

/// Every kernel variant the launchers can build (for the naga translation test).
pub fn variants() -> Vec<Kernel> {
    let mut all = elementwise::variants();
    all.extend(matmul::variants());
    all.extend(lora::variants());
    all.extend(cross_entropy::variants());
    all.extend(attention::variants());
    all.extend(rope::variants());
    all.extend(rmsnorm::variants());
    all.extend(swiglu::variants());
    all.extend(embedding::variants());
    all.extend(optim::variants());
    all
}

/// A family's benchmarks at Qwen2.5 model shapes.
pub type BenchFn = fn(&Gpu, BenchConfig) -> Result<Vec<BenchResult>>;

/// Every family's benchmarks, by family name (so `cargo bench -- NAME` runs only that family).
pub fn benches() -> Vec<(&'static str, BenchFn)> {
    vec![
        ("elementwise", elementwise::bench),
        ("matmul", matmul::bench),
        ("matmul_decode", matmul::bench_decode),
        ("lora", lora::bench),
        ("cross_entropy", cross_entropy::bench),
        ("attention", attention::bench),
        ("rope", rope::bench),
        ("rmsnorm", rmsnorm::bench),
        ("swiglu", swiglu::bench),
        ("embedding", embedding::bench),
        ("optim", optim::bench),
    ]
}
