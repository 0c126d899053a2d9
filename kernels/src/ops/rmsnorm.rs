//! RMSNorm as Qwen2 computes it, `y = w ⊙ (x · rstd)` with `rstd = 1 / sqrt(mean(x²) + eps)` per
//! row, in f32 (`shaders/rmsnorm.wgsl`). The forward saves `rstd` for the backward.
//! [`add_rmsnorm_forward`] fuses the residual add that precedes the norm into the same launch.
//! The forward and dX take a workgroup per row or a thread per row as [`Gpu::plan`]'s `rowwise`
//! says ([`RowwiseVariant`]).
//!
//! Per-row vectors such as `rstd` are 1-D tensors `[T]`, hence a single chunk (a [T] tensor larger
//! than one binding cannot be created); the kernels index them by row.
use anyhow::{bail, Result};

use super::check::{max_error, random, round_bf16, to_f64, Check};
use super::elementwise;
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult};
use crate::gpu::{rowwise_groups, Gpu};
use crate::plan::RowwiseVariant;
use crate::shader::{params, Const, Kernel, RMSNORM};
use crate::tensor::{row_segments, DType, Out, Tensor};

params!(
    RMSNORM,
    struct Params {
        rows: u32,
        cols: u32,
        eps: f32,
        beta: f32,
        x_off: u32,
        dy_off: u32,
        out_off: u32,
        rstd_off: u32,
        block_rows: u32,
        sum_off: u32,
    }
);

/// Columns per workgroup of `rmsnorm_dw_partial`.
const DW_COLUMNS: u32 = 256;
/// The dW partial sums aim at this many row blocks: enough workgroups to fill a GPU, few enough
/// that the final sum over blocks stays short.
const DW_BLOCKS: usize = 256;
/// Fewest rows per dW block, so a short sequence does not make one-row blocks.
const DW_MIN_BLOCK_ROWS: usize = 8;

fn kernel(entry: &'static str, w_bf16: bool, variant: RowwiseVariant) -> Kernel {
    Kernel::new(&RMSNORM, entry)
        .with("W_BF16", Const::Bool(w_bf16))
        .with("ROWS_PER_GROUP", Const::U32(variant.rows_per_group()))
}

pub fn variants() -> Vec<Kernel> {
    let mut all = Vec::new();
    for &variant in RowwiseVariant::ALL {
        for w_bf16 in [false, true] {
            all.push(kernel("rmsnorm_forward", w_bf16, variant));
            all.push(kernel("add_rmsnorm_forward", w_bf16, variant));
            all.push(kernel("rmsnorm_backward", w_bf16, variant));
        }
    }
    // The partial sums never read the weight or take a row per thread; one variant.
    all.push(kernel(
        "rmsnorm_dw_partial",
        false,
        RowwiseVariant::Workgroup,
    ));
    all
}

/// Checks x against y / dy (same shape, f32), w ([D], bf16 or f32) and rstd ([rows], f32);
/// returns whether w is bf16.
fn check_shapes(x: &Tensor, other: &[(&str, &Tensor)], w: &Tensor, rstd: &Tensor) -> Result<bool> {
    if x.dtype() != DType::F32 {
        bail!("rmsnorm x: expected F32, got {:?}", x.dtype());
    }
    for (role, t) in other {
        t.expect(role, x.shape(), Some(DType::F32))?;
    }
    w.expect("rmsnorm weight", &[x.row_len()], None)?;
    let w_bf16 = match w.dtype() {
        DType::BF16 => true,
        DType::F32 => false,
        d => bail!("rmsnorm weight: expected BF16 or F32, got {d:?}"),
    };
    rstd.expect("rmsnorm rstd", &[x.rows()], Some(DType::F32))?;
    Ok(w_bf16)
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` over the rows of x ([.., D] f32); saves `rstd` ([rows] f32).
pub fn rmsnorm_forward(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    y: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    launch_forward(batch, x, None, w, eps, y, rstd)
}

/// The residual add that precedes each of Qwen2's norms, fused into it: `sum = a + b`, then
/// `y = rmsnorm(sum)` exactly as `add` followed by [`rmsnorm_forward`] computes them (bit for
/// bit), in one launch. Saves `sum` (the residual stream) and `rstd`.
pub fn add_rmsnorm_forward(
    batch: &mut Batch,
    residual: ResidualAdd,
    w: &Tensor,
    eps: f32,
    y: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let ResidualAdd { a, b, sum } = residual;
    launch_forward(batch, a, Some((b, sum)), w, eps, y, rstd)
}

/// `sum = a + b` (f32, same shape): the input of [`add_rmsnorm_forward`].
#[derive(Clone, Copy)]
pub struct ResidualAdd<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub sum: &'a Tensor,
}

/// The forward over `x`, or over `x + b` written to `sum` when `add = Some((b, sum))`.
fn launch_forward(
    batch: &mut Batch,
    x: &Tensor,
    add: Option<(&Tensor, &Tensor)>,
    w: &Tensor,
    eps: f32,
    y: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let mut tensors = vec![("rmsnorm y", y)];
    if let Some((b, sum)) = add {
        tensors.extend([("rmsnorm addend", b), ("rmsnorm sum", sum)]);
    }
    let w_bf16 = check_shapes(x, &tensors, w, rstd)?;
    let entry = match add {
        None => "rmsnorm_forward",
        Some(_) => "add_rmsnorm_forward",
    };
    let kernel = kernel(entry, w_bf16, batch.gpu.plan.rowwise);
    let cols = x.row_len() as u32;
    let mut chunked: Vec<&Tensor> = tensors.iter().map(|&(_, t)| t).collect();
    chunked.push(x);
    for seg in row_segments(x.rows(), &chunked) {
        let (rx, ry) = (x.row(seg.start), y.row(seg.start));
        let mut params = Params {
            rows: seg.len() as u32,
            cols,
            eps,
            beta: 0.0,
            x_off: rx.offset,
            dy_off: 0,
            out_off: ry.offset,
            rstd_off: seg.start as u32,
            block_rows: 0,
            sum_off: 0,
        };
        let mut buffers = vec![rx.buffer, &w.chunks()[0]];
        let added = add.map(|(b, sum)| (b.row(seg.start), sum.row(seg.start)));
        if let Some((rb, _)) = &added {
            params.dy_off = rb.offset;
            buffers.push(rb.buffer);
        }
        buffers.extend([&rstd.chunks()[0], ry.buffer]);
        if let Some((_, rsum)) = &added {
            params.sum_off = rsum.offset;
            buffers.push(rsum.buffer);
        }
        let groups = rowwise_groups(batch.gpu, seg.len());
        batch.dispatch(&kernel, &params, &buffers, groups)?;
    }
    Ok(())
}

/// Gradients of [`rmsnorm_forward`] from `dy`, with the forward's `x`, `w` and `rstd`:
/// `dx = g (+ beta · dx)` ([`Out::write`] never reads dx, [`Out::add`] adds to the residual
/// stream's gradient), and if given `dw = Σ_t dy ⊙ x · rstd (+ beta · dw)` ([D] f32; summed over
/// rows in a fixed order, so runs are bit-identical; beta = 0 still reads dw as `0 · dw`, so it
/// must hold finite values such as a new tensor's zeros).
pub fn rmsnorm_backward(
    batch: &mut Batch,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dx: Out,
    dw: Option<Out>,
) -> Result<()> {
    let Out {
        tensor: dx,
        beta: dx_beta,
    } = dx;
    let w_bf16 = check_shapes(x, &[("rmsnorm dy", dy), ("rmsnorm dx", dx)], w, rstd)?;
    let (rows, cols) = (x.rows(), x.row_len());
    let rstd_buffer = &rstd.chunks()[0];
    let backward = kernel("rmsnorm_backward", w_bf16, batch.gpu.plan.rowwise);
    for seg in row_segments(rows, &[x, dy, dx]) {
        let (rx, rdy, rdx) = (x.row(seg.start), dy.row(seg.start), dx.row(seg.start));
        let params = Params {
            rows: seg.len() as u32,
            cols: cols as u32,
            eps: 0.0,
            beta: dx_beta,
            x_off: rx.offset,
            dy_off: rdy.offset,
            out_off: rdx.offset,
            rstd_off: seg.start as u32,
            block_rows: 0,
            sum_off: 0,
        };
        let groups = rowwise_groups(batch.gpu, seg.len());
        batch.dispatch(
            &backward,
            &params,
            &[
                rx.buffer,
                &w.chunks()[0],
                rdy.buffer,
                rstd_buffer,
                rdx.buffer,
            ],
            groups,
        )?;
    }
    let Some(Out {
        tensor: dw,
        beta: dw_beta,
    }) = dw
    else {
        return Ok(());
    };
    dw.expect("rmsnorm dw", &[cols], Some(DType::F32))?;
    // Blocks never straddle a chunk of x / dy, and each dispatch's blocks lie in one chunk of
    // the partial sums.
    let block_rows = rows.div_ceil(DW_BLOCKS).max(DW_MIN_BLOCK_ROWS);
    let segments = row_segments(rows, &[x, dy]);
    let blocks: usize = segments.iter().map(|s| s.len().div_ceil(block_rows)).sum();
    let partials = Tensor::zeros(batch.gpu, &[blocks, cols], DType::F32)?;
    let partial_kernel = kernel("rmsnorm_dw_partial", false, RowwiseVariant::Workgroup);
    let mut first_block = 0;
    for seg in segments {
        let seg_blocks = seg.len().div_ceil(block_rows);
        let mut done = 0;
        while done < seg_blocks {
            let block = first_block + done;
            let n = (partials.chunk_rows(block).end - block).min(seg_blocks - done);
            let first_row = seg.start + done * block_rows;
            let (rx, rdy, slot) = (x.row(first_row), dy.row(first_row), partials.row(block));
            let params = Params {
                rows: (n * block_rows).min(seg.end - first_row) as u32,
                cols: cols as u32,
                eps: 0.0,
                beta: 0.0,
                x_off: rx.offset,
                dy_off: rdy.offset,
                out_off: slot.offset,
                rstd_off: first_row as u32,
                block_rows: block_rows as u32,
                sum_off: 0,
            };
            let groups = [(cols as u32).div_ceil(DW_COLUMNS), n as u32, 1];
            batch.dispatch(
                &partial_kernel,
                &params,
                &[rx.buffer, rdy.buffer, rstd_buffer, slot.buffer],
                groups,
            )?;
            done += n;
        }
        first_block += seg_blocks;
    }
    elementwise::sum_rows(batch, &partials, Out::scaled(dw, dw_beta), 1.0)?;
    batch.keep(partials);
    Ok(())
}

/// f64 references on row-major [rows, cols] data.
pub mod cpu {
    /// `(y, rstd)`.
    pub fn forward(x: &[f64], w: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let mut y = Vec::with_capacity(x.len());
        let mut rstd = Vec::with_capacity(x.len() / cols);
        for row in x.chunks(cols) {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + eps).sqrt();
            y.extend(row.iter().zip(w).map(|(v, wi)| wi * (v * r)));
            rstd.push(r);
        }
        (y, rstd)
    }

    /// `(dx, dw)` of the loss `Σ dy ⊙ y`.
    pub fn backward(dy: &[f64], x: &[f64], w: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let (_, rstd) = forward(x, w, eps);
        let mut dx = Vec::with_capacity(x.len());
        let mut dw = vec![0.0; cols];
        for ((xr, dyr), r) in x.chunks(cols).zip(dy.chunks(cols)).zip(rstd) {
            let mean: f64 = xr
                .iter()
                .zip(dyr)
                .zip(w)
                .map(|((xi, gi), wi)| wi * gi * xi)
                .sum::<f64>()
                / cols as f64;
            dx.extend(
                xr.iter()
                    .zip(dyr)
                    .zip(w)
                    .map(|((xi, gi), wi)| r * (wi * gi - xi * r * r * mean)),
            );
            for ((d, xi), gi) in dw.iter_mut().zip(xr).zip(dyr) {
                *d += gi * xi * r;
            }
        }
        (dx, dw)
    }
}

/// Runs forward and backward (with dW) on random [rows, cols] inputs and compares with
/// [`cpu`]. `accumulate` starts dx and dw from random values with beta = 1; otherwise dx starts
/// as NaN with beta = 0, which must not leak into the result.
pub fn check(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    w_bf16: bool,
    accumulate: bool,
    seed: u64,
) -> Result<Vec<Check>> {
    let eps = 1e-6;
    let shape = [rows, cols];
    let n = rows * cols;
    let xv = random(seed, n, 2.0);
    let dyv = random(seed + 1, n, 1.0);
    let wv = random(seed + 2, cols, 1.0);
    let (x, dy) = (
        Tensor::from_f32(gpu, &shape, &xv)?,
        Tensor::from_f32(gpu, &shape, &dyv)?,
    );
    let (w, wv) = if w_bf16 {
        (
            Tensor::from_f32_as_bf16(gpu, &[cols], &wv)?,
            round_bf16(&wv),
        )
    } else {
        (Tensor::from_f32(gpu, &[cols], &wv)?, wv)
    };
    let (dx0, dw0, beta) = if accumulate {
        (random(seed + 3, n, 1.0), random(seed + 4, cols, 1.0), 1.0)
    } else {
        (vec![f32::NAN; n], vec![0.0; cols], 0.0)
    };
    let y = Tensor::zeros(gpu, &shape, DType::F32)?;
    let rstd = Tensor::zeros(gpu, &[rows], DType::F32)?;
    let dx = Tensor::from_f32(gpu, &shape, &dx0)?;
    let dw = Tensor::from_f32(gpu, &[cols], &dw0)?;
    let mut batch = gpu.batch();
    rmsnorm_forward(&mut batch, &x, &w, eps, &y, &rstd)?;
    rmsnorm_backward(
        &mut batch,
        &dy,
        &x,
        &w,
        &rstd,
        Out::scaled(&dx, beta),
        Some(Out::scaled(&dw, beta)),
    )?;
    batch.submit();

    let (x64, dy64, w64) = (to_f64(&xv), to_f64(&dyv), to_f64(&wv));
    let (y_ref, rstd_ref) = cpu::forward(&x64, &w64, eps as f64);
    let (dx_ref, dw_ref) = cpu::backward(&dy64, &x64, &w64, eps as f64);
    let add = |grad: Vec<f64>, init: &[f32]| -> Vec<f64> {
        grad.iter()
            .zip(init)
            .map(|(g, &i)| g + beta as f64 * if accumulate { i as f64 } else { 0.0 })
            .collect()
    };
    let label = format!(
        "{rows}x{cols} w {}{}",
        if w_bf16 { "bf16" } else { "f32" },
        if accumulate { " acc" } else { "" }
    );
    let check = |kernel: &str, gpu_out: Vec<f32>, cpu_out: &[f64], tolerance: f64| Check {
        kernel: kernel.into(),
        shape: label.clone(),
        max_err: max_error(&gpu_out, cpu_out),
        tolerance,
    };
    Ok(vec![
        check("rmsnorm_forward y", y.to_f32(gpu)?, &y_ref, 1e-5),
        check("rmsnorm_forward rstd", rstd.to_f32(gpu)?, &rstd_ref, 1e-5),
        check(
            "rmsnorm_backward dx",
            dx.to_f32(gpu)?,
            &add(dx_ref, &dx0),
            1e-5,
        ),
        check(
            "rmsnorm_backward dw",
            dw.to_f32(gpu)?,
            &add(dw_ref, &dw0),
            1e-5,
        ),
    ])
}

/// [`add_rmsnorm_forward`] on random [rows, cols] inputs against [`cpu::forward`] of the sum,
/// and against `add` then [`rmsnorm_forward`], which it must match bit for bit (tolerance 0):
/// the model's losses do not change when it fuses them.
pub fn check_add_forward(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    w_bf16: bool,
    seed: u64,
) -> Result<Vec<Check>> {
    let eps = 1e-6;
    let shape = [rows, cols];
    let (av, bv) = (
        random(seed, rows * cols, 2.0),
        random(seed + 1, rows * cols, 2.0),
    );
    let wv = random(seed + 2, cols, 1.0);
    let (a, b) = (
        Tensor::from_f32(gpu, &shape, &av)?,
        Tensor::from_f32(gpu, &shape, &bv)?,
    );
    let (w, wv) = if w_bf16 {
        let w = Tensor::from_f32_as_bf16(gpu, &[cols], &wv)?;
        (w, round_bf16(&wv))
    } else {
        (Tensor::from_f32(gpu, &[cols], &wv)?, wv)
    };
    let outputs = || -> Result<[Tensor; 3]> {
        Ok([
            Tensor::zeros(gpu, &shape, DType::F32)?,
            Tensor::zeros(gpu, &shape, DType::F32)?,
            Tensor::zeros(gpu, &[rows], DType::F32)?,
        ])
    };
    let ([sum, y, rstd], [sum2, y2, rstd2]) = (outputs()?, outputs()?);
    let mut batch = gpu.batch();
    let residual = ResidualAdd {
        a: &a,
        b: &b,
        sum: &sum,
    };
    add_rmsnorm_forward(&mut batch, residual, &w, eps, &y, &rstd)?;
    elementwise::add(&mut batch, &a, &b, &sum2, 1.0, 1.0)?;
    rmsnorm_forward(&mut batch, &sum2, &w, eps, &y2, &rstd2)?;
    batch.submit();

    let sum_ref = elementwise::cpu::add(&to_f64(&av), &to_f64(&bv), 1.0, 1.0);
    let (y_ref, rstd_ref) = cpu::forward(&sum_ref, &to_f64(&wv), eps as f64);
    let label = format!("{rows}x{cols} w {}", if w_bf16 { "bf16" } else { "f32" });
    let mut checks = Vec::new();
    for (name, fused, unfused, reference) in [
        ("sum", &sum, &sum2, &sum_ref),
        ("y", &y, &y2, &y_ref),
        ("rstd", &rstd, &rstd2, &rstd_ref),
    ] {
        let fused = fused.to_f32(gpu)?;
        checks.push(Check {
            kernel: format!("add_rmsnorm_forward {name}"),
            shape: label.clone(),
            max_err: max_error(&fused, reference),
            tolerance: 1e-5,
        });
        checks.push(Check {
            kernel: format!("add_rmsnorm_forward {name} = unfused"),
            shape: label.clone(),
            max_err: max_error(&fused, &to_f64(&unfused.to_f32(gpu)?)),
            tolerance: 0.0,
        });
    }
    Ok(checks)
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = check(gpu, 37, 896, true, true, 1)?;
    checks.extend(check(gpu, 5, 1001, false, false, 2)?);
    checks.extend(check_add_forward(gpu, 37, 896, true, 3)?);
    Ok(checks)
}

/// Forward, backward (dx only, accumulating: LoRA) and backward with dW (full fine-tuning) at
/// [T, hidden] with a bf16 weight.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let t = config.seq_len;
    for &model in &config.shapes {
        let d = model.hidden;
        let shape = [t, d];
        let x = Tensor::zeros(gpu, &shape, DType::F32)?;
        let y = Tensor::zeros(gpu, &shape, DType::F32)?;
        let w = Tensor::zeros(gpu, &[d], DType::BF16)?;
        let rstd = Tensor::zeros(gpu, &[t], DType::F32)?;
        let dw = Tensor::zeros(gpu, &[d], DType::F32)?;
        let label = format!("{} [{t}, {d}]", model.name);
        let act = (t * d * 4) as f64;
        let small = (d * 2 + t * 4) as f64;
        let mut push = |kernel: &str, time, bytes: f64| {
            results.push(BenchResult {
                kernel: kernel.into(),
                shape: label.clone(),
                time,
                flops: 0.0,
                bytes,
            });
        };
        let fwd = time(gpu, config.reps, |b| {
            rmsnorm_forward(b, &x, &w, 1e-6, &y, &rstd)
        })?;
        push("rmsnorm_forward", fwd, 2.0 * act + small);
        // The forward's output stands in for dy.
        let dx = Tensor::zeros(gpu, &shape, DType::F32)?;
        let bwd = time(gpu, config.reps, |b| {
            rmsnorm_backward(b, &y, &x, &w, &rstd, Out::add(&dx), None)
        })?;
        push("rmsnorm_backward", bwd, 4.0 * act + small);
        let bwd_dw = time(gpu, config.reps, |b| {
            rmsnorm_backward(b, &y, &x, &w, &rstd, Out::add(&dx), Some(Out::add(&dw)))
        })?;
        push(
            "rmsnorm_backward+dw",
            bwd_dw,
            4.0 * act + small + (d * 8) as f64,
        );
    }
    Ok(results)
}
