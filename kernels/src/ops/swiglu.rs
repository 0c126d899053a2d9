//! SwiGLU, the activation of Qwen2's MLP: `h = silu(g) ⊙ u` over [T, I] f32 (`shaders/swiglu.wgsl`).
use anyhow::{bail, Result};

use super::check::{max_error, random, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult};
use crate::gpu::Gpu;
use crate::shader::{params, Kernel, SWIGLU};
use crate::tensor::{DType, Tensor};

params!(
    SWIGLU,
    struct Params {
        n: u32,
        g_off: u32,
        u_off: u32,
        dh_off: u32,
        out_off: u32,
        du_off: u32,
    }
);

pub fn variants() -> Vec<Kernel> {
    vec![
        Kernel::new(&SWIGLU, "swiglu_forward"),
        Kernel::new(&SWIGLU, "swiglu_backward"),
    ]
}

fn check_shapes(g: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    if g.dtype() != DType::F32 {
        bail!("swiglu g: expected F32, got {:?}", g.dtype());
    }
    for (role, t) in others {
        t.expect(role, g.shape(), Some(DType::F32))?;
    }
    Ok(())
}

/// `h = silu(g) ⊙ u` (g, u, h: the same shape, f32).
pub fn swiglu_forward(batch: &mut Batch, g: &Tensor, u: &Tensor, h: &Tensor) -> Result<()> {
    check_shapes(g, &[("swiglu u", u), ("swiglu h", h)])?;
    let kernel = Kernel::new(&SWIGLU, "swiglu_forward");
    batch.launch_rows(&kernel, [g, u, h], &[], g.row_len(), |seg| {
        let [g_off, u_off, out_off] = seg.offsets;
        Params {
            n: (seg.count * g.row_len()) as u32,
            g_off,
            u_off,
            dh_off: 0,
            out_off,
            du_off: 0,
        }
    })
}

/// `dg` and `du` from `dh` and the forward's inputs (all the same shape, f32; dg and du are
/// overwritten).
pub fn swiglu_backward(
    batch: &mut Batch,
    dh: &Tensor,
    g: &Tensor,
    u: &Tensor,
    dg: &Tensor,
    du: &Tensor,
) -> Result<()> {
    check_shapes(
        g,
        &[
            ("swiglu dh", dh),
            ("swiglu u", u),
            ("swiglu dg", dg),
            ("swiglu du", du),
        ],
    )?;
    let kernel = Kernel::new(&SWIGLU, "swiglu_backward");
    batch.launch_rows(&kernel, [g, u, dh, dg, du], &[], g.row_len(), |seg| {
        let [g_off, u_off, dh_off, out_off, du_off] = seg.offsets;
        Params {
            n: (seg.count * g.row_len()) as u32,
            g_off,
            u_off,
            dh_off,
            out_off,
            du_off,
        }
    })
}

pub mod cpu {
    fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    pub fn forward(g: &[f64], u: &[f64]) -> Vec<f64> {
        g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect()
    }

    /// `(dg, du)` of the loss `Σ dh ⊙ h`.
    pub fn backward(dh: &[f64], g: &[f64], u: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut dg = Vec::with_capacity(g.len());
        let mut du = Vec::with_capacity(g.len());
        for ((&dh, &g), &u) in dh.iter().zip(g).zip(u) {
            let s = sigmoid(g);
            dg.push(dh * u * s * (1.0 + g * (1.0 - s)));
            du.push(dh * g * s);
        }
        (dg, du)
    }
}

/// Forward and backward on random [rows, cols] inputs (gates up to ±8, plus ±100 where there is
/// room, where exp overflows in f32) against [`cpu`].
pub fn check(gpu: &Gpu, rows: usize, cols: usize, seed: u64) -> Result<Vec<Check>> {
    let shape = [rows, cols];
    let n = rows * cols;
    let mut gv = random(seed, n, 8.0);
    if n >= 4 {
        gv[1] = -100.0;
        gv[2] = 100.0;
    }
    let (uv, dhv) = (random(seed + 1, n, 2.0), random(seed + 2, n, 1.0));
    let g = Tensor::from_f32(gpu, &shape, &gv)?;
    let u = Tensor::from_f32(gpu, &shape, &uv)?;
    let dh = Tensor::from_f32(gpu, &shape, &dhv)?;
    let zeros = || Tensor::zeros(gpu, &shape, DType::F32);
    let (h, dg, du) = (zeros()?, zeros()?, zeros()?);
    let mut batch = gpu.batch();
    swiglu_forward(&mut batch, &g, &u, &h)?;
    swiglu_backward(&mut batch, &dh, &g, &u, &dg, &du)?;
    batch.submit();
    let (g64, u64, dh64) = (to_f64(&gv), to_f64(&uv), to_f64(&dhv));
    let (dg_ref, du_ref) = cpu::backward(&dh64, &g64, &u64);
    let label = format!("{rows}x{cols}");
    let check = |kernel: &str, out: &Tensor, reference: &[f64]| -> Result<Check> {
        Ok(Check {
            kernel: kernel.into(),
            shape: label.clone(),
            max_err: max_error(&out.to_f32(gpu)?, reference),
            tolerance: 1e-5,
        })
    };
    Ok(vec![
        check("swiglu_forward", &h, &cpu::forward(&g64, &u64))?,
        check("swiglu_backward dg", &dg, &dg_ref)?,
        check("swiglu_backward du", &du, &du_ref)?,
    ])
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    check(gpu, 37, 4867, 1)
}

/// Forward and backward at [T, intermediate].
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let t = config.seq_len;
    for &model in &config.shapes {
        let shape = [t, model.intermediate];
        let zeros = || Tensor::zeros(gpu, &shape, DType::F32);
        let (g, u, h, dg, du) = (zeros()?, zeros()?, zeros()?, zeros()?, zeros()?);
        let bytes = (t * model.intermediate * 4) as f64;
        let label = format!("{} [{t}, {}]", model.name, model.intermediate);
        let fwd = time(gpu, config.reps, |b| swiglu_forward(b, &g, &u, &h))?;
        results.push(BenchResult {
            kernel: "swiglu_forward".into(),
            shape: label.clone(),
            time: fwd,
            flops: 0.0,
            bytes: 3.0 * bytes,
        });
        // h stands in for dh.
        let bwd = time(gpu, config.reps, |b| {
            swiglu_backward(b, &h, &g, &u, &dg, &du)
        })?;
        results.push(BenchResult {
            kernel: "swiglu_backward".into(),
            shape: label,
            time: bwd,
            flops: 0.0,
            bytes: 5.0 * bytes,
        });
    }
    Ok(results)
}
