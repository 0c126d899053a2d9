//! LoRA on a frozen projection: `y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ` with A [r, K], B [N, r] (PEFT's
//! `lora_A` / `lora_B`) and s = alpha / r, and its gradients, on the GEMM of [`super::matmul`].
//!
//! Fusion: the forward is two launches. The first computes the small down-projection u = x·Aᵀ
//! [M, r], which backward needs anyway. The second is the frozen projection's GEMM with the
//! up-projection appended to its reduction, `[x | s·u]·[W | B]ᵀ` ([`Gemm::second`]): the same
//! workgroup tile accumulates both products in the same registers and writes y once. The dense
//! ΔW = s·B·A is never formed, and y is neither re-read nor written twice.
//!
//! Backward (v = dy·B [M, r] is a small temporary):
//! - dA = s·vᵀ·x, dB = s·dyᵀ·u (each `+ beta·grad` to accumulate micro-batches);
//! - dx = dy·W + s·v·A in one launch, the same fusion as forward; or only s·v·A when the caller
//!   handles the frozen path itself. Either may be added into dx (beta = 1), so the three
//!   projections that read the same normed input (q/k/v, gate/up) sum their dx in place.
//!
//! LoRA dropout (PEFT's `lora_dropout`) applies to the adapter's input only: u = d(x)·Aᵀ with d an
//! inverted dropout whose mask is regenerated from its seed ([`Dropout`]). Forward and backward
//! then materialise d(x) in one [M, K] temporary; backward reads dA = s·vᵀ·d(x) and
//! dx = dy·W + d(s·v·A), the mask applied to the adapter's part only (so no longer one launch).
use anyhow::{ensure, Result};

use super::check::{max_error, random, to_f64, Check};
use super::elementwise::dropout;
pub use super::elementwise::Dropout;
use super::matmul::{self, bench_tensor, expect_f32_matrix, matrix, plus_scaled, weight, Gemm};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult};
use crate::gpu::Gpu;
use crate::shader::Kernel;
use crate::tensor::{DType, Out, Tensor};

/// A LoRA adapter: A [r, K] and B [N, r] (f32), the scale s = alpha / r, and the dropout of its
/// input while training.
#[derive(Clone, Copy)]
pub struct Lora<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

impl Lora<'_> {
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// Checks the adapter against a projection from K to N features.
    fn check(&self, role: &str, n: usize, k: usize) -> Result<()> {
        let r = self.rank();
        expect_f32_matrix(self.a, &format!("{role}: lora A"), r, k)?;
        expect_f32_matrix(self.b, &format!("{role}: lora B"), n, r)
    }
}

/// Gradients of A and B.
#[derive(Clone, Copy)]
pub struct LoraGrads<'a> {
    pub a: Out<'a>,
    pub b: Out<'a>,
}

/// The gradient of the layer input: `dx = [dy·W] + s·(dy·B)·A (+ beta·dx)`, where the frozen path
/// dy·W is included when `frozen` holds W [N, K].
#[derive(Clone, Copy)]
pub struct InputGrad<'a> {
    pub dx: Out<'a>,
    pub frozen: Option<&'a Tensor>,
}

/// `y = x·wᵀ + bias + s·u·Bᵀ` with `u = x·Aᵀ` saved into `u` [M, r]: x [M, K] f32, w [N, K] bf16
/// or f32, bias [N], y [M, N].
pub fn lora_forward(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &Lora,
    u: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let ((m, k), (n, wk)) = (matrix(x), matrix(w));
    ensure!(
        wk == k,
        "lora_forward: x {:?} and w {:?} differ in K",
        x.shape(),
        w.shape()
    );
    lora.check("lora_forward", n, k)?;
    expect_f32_matrix(y, "lora_forward y", m, n)?;
    expect_f32_matrix(u, "lora_forward u", m, lora.rank())?;
    match lora.dropout {
        Some(mask) => {
            let dropped = Tensor::zeros(batch.gpu, &[m, k], DType::F32)?;
            dropout(batch, x, Out::write(&dropped), &mask)?;
            Gemm::new(&dropped, false, lora.a, true).run(batch, u)?;
            batch.keep(dropped);
        }
        None => Gemm::new(x, false, lora.a, true).run(batch, u)?,
    }
    Gemm::new(x, false, w, true)
        .bias(bias)
        .second(u, lora.b, lora.scale)
        .run(batch, y)
}

/// Gradients of A and B (and optionally of x) from dy [M, N], the layer input x [M, K] and the
/// saved u = x·Aᵀ [M, r].
pub fn lora_backward(
    batch: &mut Batch,
    dy: &Tensor,
    x: &Tensor,
    u: &Tensor,
    lora: &Lora,
    grads: &LoraGrads,
    dx: Option<InputGrad>,
) -> Result<()> {
    let ((m, n), (xm, k), r) = (matrix(dy), matrix(x), lora.rank());
    ensure!(
        xm == m,
        "lora_backward: dy {:?} and x {:?} differ in rows",
        dy.shape(),
        x.shape()
    );
    lora.check("lora_backward", n, k)?;
    expect_f32_matrix(u, "lora_backward u", m, r)?;
    expect_f32_matrix(grads.a.tensor, "lora_backward dA", r, k)?;
    expect_f32_matrix(grads.b.tensor, "lora_backward dB", n, r)?;
    let v = Tensor::zeros(batch.gpu, &[m, r], DType::F32)?;
    Gemm::new(dy, false, lora.b, false).run(batch, &v)?;
    // The adapter's input d(x), regenerated; it doubles as the scratch of s·v·A below.
    let dropped = match lora.dropout {
        Some(mask) => {
            let t = Tensor::zeros(batch.gpu, &[m, k], DType::F32)?;
            dropout(batch, x, Out::write(&t), &mask)?;
            Some((t, mask))
        }
        None => None,
    };
    let adapter_input = dropped.as_ref().map_or(x, |(t, _)| t);
    Gemm::new(&v, true, adapter_input, false)
        .alpha(lora.scale)
        .beta(grads.a.beta)
        .run(batch, grads.a.tensor)?;
    Gemm::new(dy, true, u, false)
        .alpha(lora.scale)
        .beta(grads.b.beta)
        .run(batch, grads.b.tensor)?;
    let recorded = match dx {
        Some(dx) => input_grad(batch, dy, &v, lora, dropped.as_ref(), dx),
        None => Ok(()),
    };
    batch.keep(v);
    if let Some((t, _)) = dropped {
        batch.keep(t);
    }
    recorded
}

/// lora_backward's dx from dy [M, N], v = dy·B [M, r] and, with dropout, the [M, K] scratch and
/// the mask.
fn input_grad(
    batch: &mut Batch,
    dy: &Tensor,
    v: &Tensor,
    lora: &Lora,
    dropped: Option<&(Tensor, Dropout)>,
    InputGrad {
        dx: Out { tensor: dx, beta },
        frozen,
    }: InputGrad,
) -> Result<()> {
    let ((m, n), k) = (matrix(dy), lora.a.row_len());
    expect_f32_matrix(dx, "lora_backward dx", m, k)?;
    if let Some(w) = frozen {
        ensure!(
            matrix(w) == (n, k),
            "lora_backward: w {:?} is not [{n}, {k}]",
            w.shape()
        );
    }
    match (frozen, dropped) {
        (Some(w), None) => Gemm::new(dy, false, w, false)
            .second(v, lora.a, lora.scale)
            .beta(beta)
            .run(batch, dx),
        (None, None) => Gemm::new(v, false, lora.a, false)
            .alpha(lora.scale)
            .beta(beta)
            .run(batch, dx),
        (frozen, Some((scratch, mask))) => {
            let mut beta = beta;
            if let Some(w) = frozen {
                Gemm::new(dy, false, w, false).beta(beta).run(batch, dx)?;
                beta = 1.0;
            }
            Gemm::new(v, false, lora.a, false)
                .alpha(lora.scale)
                .run(batch, scratch)?;
            dropout(batch, scratch, Out::scaled(dx, beta), mask)
        }
    }
}

/// LoRA adds no kernel of its own: it runs [`matmul`]'s variants.
pub fn variants() -> Vec<Kernel> {
    Vec::new()
}

/// Problem size: M rows, K input and N output features, rank r.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

pub mod cpu {
    use super::Dims;
    use crate::ops::matmul::cpu::{gemm, matmul_forward};

    /// x ⊙ mask, the adapter's input (x itself without dropout).
    fn masked(x: &[f64], mask: Option<&[f64]>) -> Vec<f64> {
        match mask {
            Some(mask) => x.iter().zip(mask).map(|(x, f)| x * f).collect(),
            None => x.to_vec(),
        }
    }

    /// The adapter as [`super::Lora`] holds it, with `mask` the dropout factors (0 or 1 / (1 - p))
    /// of each element of x.
    #[derive(Clone, Copy)]
    pub struct Lora<'a> {
        pub a: &'a [f64],
        pub b: &'a [f64],
        pub scale: f64,
        pub mask: Option<&'a [f64]>,
    }

    /// (y, u): y = x·wᵀ + bias + scale·u·bᵀ with u = (x ⊙ mask)·aᵀ.
    pub fn lora_forward(
        d: Dims,
        x: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        lora: &Lora,
    ) -> (Vec<f64>, Vec<f64>) {
        let Lora { a, b, scale, mask } = *lora;
        let u = gemm(&masked(x, mask), false, a, true, d.m, d.r, d.k);
        let mut y = matmul_forward(x, w, bias, d.m, d.n, d.k);
        let up = gemm(&u, false, b, true, d.m, d.n, d.r);
        y.iter_mut().zip(up).for_each(|(y, v)| *y += scale * v);
        (y, u)
    }

    /// (dx, dA, dB), dx including the frozen path dy·w when `w` is given.
    pub fn lora_backward(
        d: Dims,
        dy: &[f64],
        x: &[f64],
        w: Option<&[f64]>,
        lora: &Lora,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let Lora { a, b, scale, mask } = *lora;
        let xd = masked(x, mask);
        let u = gemm(&xd, false, a, true, d.m, d.r, d.k);
        let v = gemm(dy, false, b, false, d.m, d.r, d.n);
        let da = gemm(&v, true, &xd, false, d.r, d.k, d.m)
            .iter()
            .map(|g| scale * g)
            .collect();
        let db = gemm(dy, true, &u, false, d.n, d.r, d.m)
            .iter()
            .map(|g| scale * g)
            .collect();
        let adapter_dx: Vec<f64> = gemm(&v, false, a, false, d.m, d.k, d.r)
            .iter()
            .map(|g| scale * g)
            .collect();
        let mut dx = masked(&adapter_dx, mask);
        if let Some(w) = w {
            let frozen = gemm(dy, false, w, false, d.m, d.k, d.n);
            dx.iter_mut().zip(frozen).for_each(|(g, f)| *g += f);
        }
        (dx, da, db)
    }
}

/// Runs forward (bf16 W with bias) and backward on random inputs, with `dropout` on the adapter's
/// input, and compares with the CPU reference: gradients accumulate (beta = 1) onto random values,
/// dx once with and once without the frozen path.
pub fn check_lora(gpu: &Gpu, d: Dims, seed: u64, dropout: Option<Dropout>) -> Result<Vec<Check>> {
    let Dims { m, n, k, r } = d;
    let scale = 2.0;
    let f32_tensor = |shape: &[usize], s: u64, amp: f32| -> Result<(Tensor, Vec<f32>)> {
        let v = random(s, shape.iter().product(), amp);
        Ok((Tensor::from_f32(gpu, shape, &v)?, v))
    };
    let (x, xv) = f32_tensor(&[m, k], seed, 1.0)?;
    let (w, w64) = weight(gpu, &[n, k], true, seed + 1, 1.0)?;
    let (bias, biasv) = f32_tensor(&[n], seed + 2, 1.0)?;
    let (a, av) = f32_tensor(&[r, k], seed + 3, 0.5)?;
    let (b, bv) = f32_tensor(&[n, r], seed + 4, 0.5)?;
    let (dy, dyv) = f32_tensor(&[m, n], seed + 5, 1.0)?;
    let (da, da0) = f32_tensor(&[r, k], seed + 6, 1.0)?;
    let (db, db0) = f32_tensor(&[n, r], seed + 7, 1.0)?;
    let (dx, dx0) = f32_tensor(&[m, k], seed + 8, 1.0)?;
    let u = Tensor::zeros(gpu, &[m, r], DType::F32)?;
    let y = Tensor::zeros(gpu, &[m, n], DType::F32)?;
    let dx_lora = Tensor::zeros(gpu, &[m, k], DType::F32)?;
    let lora = Lora {
        a: &a,
        b: &b,
        scale,
        dropout,
    };
    let mask: Option<Vec<f64>> =
        dropout.map(|mask| (0..m * k).map(|e| mask.factor(e as u32) as f64).collect());
    let mask = mask.as_deref();
    let mut batch = gpu.batch();
    lora_forward(&mut batch, &x, &w, Some(&bias), &lora, &u, &y)?;
    let grads = LoraGrads {
        a: Out::add(&da),
        b: Out::add(&db),
    };
    lora_backward(
        &mut batch,
        &dy,
        &x,
        &u,
        &lora,
        &grads,
        Some(InputGrad {
            dx: Out::add(&dx),
            frozen: Some(&w),
        }),
    )?;
    batch.submit();
    let (x64, a64, b64, dy64) = (to_f64(&xv), to_f64(&av), to_f64(&bv), to_f64(&dyv));
    let lora64 = cpu::Lora {
        a: &a64,
        b: &b64,
        scale: scale as f64,
        mask,
    };
    let (y_ref, u_ref) = cpu::lora_forward(d, &x64, &w64, Some(&to_f64(&biasv)), &lora64);
    let (dx_ref, da_ref, db_ref) = cpu::lora_backward(d, &dy64, &x64, Some(&w64), &lora64);
    let shape = match dropout {
        Some(mask) => format!("{m}x{n}x{k} r{r} dropout {}", mask.p),
        None => format!("{m}x{n}x{k} r{r}"),
    };
    let check = |kernel: &str, gpu_values: Vec<f32>, reference: Vec<f64>| Check {
        kernel: kernel.into(),
        shape: shape.clone(),
        max_err: max_error(&gpu_values, &reference),
        tolerance: 1e-5,
    };
    let mut checks = vec![
        check("lora_forward u", u.to_f32(gpu)?, u_ref),
        check("lora_forward y", y.to_f32(gpu)?, y_ref),
        check(
            "lora_backward dx",
            dx.to_f32(gpu)?,
            plus_scaled(&dx_ref, 1.0, &dx0),
        ),
        check(
            "lora_backward dA",
            da.to_f32(gpu)?,
            plus_scaled(&da_ref, 1.0, &da0),
        ),
        check(
            "lora_backward dB",
            db.to_f32(gpu)?,
            plus_scaled(&db_ref, 1.0, &db0),
        ),
    ];
    // Again without the frozen path, overwriting the adapter gradients (beta = 0).
    let mut batch = gpu.batch();
    let overwrite = LoraGrads {
        a: Out::write(&da),
        b: Out::write(&db),
    };
    let adapter_only = Some(InputGrad {
        dx: Out::write(&dx_lora),
        frozen: None,
    });
    lora_backward(&mut batch, &dy, &x, &u, &lora, &overwrite, adapter_only)?;
    batch.submit();
    let (dx_ref, da_ref, _) = cpu::lora_backward(d, &dy64, &x64, None, &lora64);
    checks.push(check(
        "lora_backward dx adapter",
        dx_lora.to_f32(gpu)?,
        dx_ref,
    ));
    checks.push(check("lora_backward dA beta0", da.to_f32(gpu)?, da_ref));
    Ok(checks)
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let dims = Dims {
        m: 37,
        n: 70,
        k: 45,
        r: 8,
    };
    let mut checks = check_lora(gpu, dims, 1, None)?;
    let dropout = Dropout::new(0.1, 5);
    checks.extend(check_lora(gpu, dims, 2, Some(dropout))?);
    Ok(checks)
}

/// Forward and backward (dx with the frozen path) of every projection at rank 64.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let (m, r) = (config.seq_len, 64);
    let mut results = Vec::new();
    for &model in &config.shapes {
        for (name, n, k) in matmul::projections(&model) {
            let x = bench_tensor(gpu, &[m, k], DType::F32)?;
            let w = bench_tensor(gpu, &[n, k], DType::BF16)?;
            let a = bench_tensor(gpu, &[r, k], DType::F32)?;
            let b = bench_tensor(gpu, &[n, r], DType::F32)?;
            let u = Tensor::zeros(gpu, &[m, r], DType::F32)?;
            let y = Tensor::zeros(gpu, &[m, n], DType::F32)?;
            let (da, db) = (
                Tensor::zeros(gpu, &[r, k], DType::F32)?,
                Tensor::zeros(gpu, &[n, r], DType::F32)?,
            );
            let lora = Lora {
                a: &a,
                b: &b,
                scale: 2.0,
                dropout: None,
            };
            let grads = LoraGrads {
                a: Out::write(&da),
                b: Out::write(&db),
            };
            let shape = format!("{} {name} {m}x{n}x{k} r{r}", model.name);
            let f = |a: usize, b: usize, c: usize| 2.0 * (a * b * c) as f64;
            let forward_flops = f(m, n, k) + f(m, r, k) + f(m, n, r);
            // v = dy·B, dA, dB, and dx = dy·W + s·v·A.
            let backward_flops = f(m, n, r) + f(r, k, m) + f(n, r, m) + f(m, k, n) + f(m, k, r);
            let bytes = 4.0 * (m * k + m * n) as f64 + 2.0 * (n * k) as f64;
            let time_fwd = time(gpu, config.reps, |batch| {
                lora_forward(batch, &x, &w, None, &lora, &u, &y)
            })?;
            results.push(BenchResult {
                kernel: "lora_forward".into(),
                shape: shape.clone(),
                time: time_fwd,
                flops: forward_flops,
                bytes,
            });
            let dx = Tensor::zeros(gpu, &[m, k], DType::F32)?;
            let input_grad = Some(InputGrad {
                dx: Out::write(&dx),
                frozen: Some(&w),
            });
            let time_bwd = time(gpu, config.reps, |batch| {
                lora_backward(batch, &y, &x, &u, &lora, &grads, input_grad)
            })?;
            results.push(BenchResult {
                kernel: "lora_backward".into(),
                shape,
                time: time_bwd,
                flops: backward_flops,
                bytes,
            });
        }
    }
    Ok(results)
}
