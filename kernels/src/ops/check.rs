//! What the kernel checks share: comparing a GPU run with its f64 CPU reference, and the random,
//! bf16-rounded inputs they feed both. Used by every family's `check_*` (the tests and `wgtrain
//! selftest`) and by the kernel tests.
use rand::{rngs::StdRng, Rng, SeedableRng};

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
