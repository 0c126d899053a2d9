//! Rotary position embedding (`shaders/rope.wgsl`), Qwen2 / transformers rotate-half convention.
//!
//! Applied in place to a [rows, heads * head_dim] f32 activation (q or k): the model keeps only the
//! rotated tensor, and the backward rotates the gradient back in place (rotation by -angle, the
//! transpose). Angles match transformers: `inv_freq` is computed on the host in f32 exactly as
//! `1 / theta ** (arange(0, D, 2).float() / D)`, the angle is the f32 product position * inv_freq,
//! and the shader evaluates sin/cos of that f32 angle to about one ulp (its own range reduction,
//! not the loosely specified built-ins).
use anyhow::{bail, Result};

use super::check::{max_error, random, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{BenchConfig, BenchResult};
use crate::gpu::Gpu;
use crate::shader::{params, Kernel, ROPE};
use crate::tensor::{DType, Tensor};

params!(
    ROPE,
    struct Params {
        n: u32,
        row0: u32,
        x_off: u32,
        heads: u32,
        head_dim: u32,
        period: u32,
        sign: f32,
        _pad: u32,
    }
);

/// The inverse frequencies of one head size and theta, resident on the device.
pub struct Rope {
    head_dim: usize,
    inv_freq: Tensor,
}

impl Rope {
    /// `theta` is the model's `rope_theta` (1e6 for Qwen2.5); like transformers it is used in f32.
    pub fn new(gpu: &Gpu, head_dim: usize, theta: f64) -> Result<Rope> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rope: head_dim must be even and positive, got {head_dim}");
        }
        let inv_freq = Tensor::from_f32(gpu, &[head_dim / 2], &cpu::inv_freq(head_dim, theta))?;
        Ok(Rope { head_dim, inv_freq })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Where each row of the activation sits in its sequence.
#[derive(Clone, Copy)]
pub enum Positions<'a> {
    /// Sequences of `seq_len` consecutive rows; row t of sequence b is at position `starts[b] + t`
    /// (`starts`: u32 [B]). Zeros for training and prefill, the cache lengths for KV-cache decode.
    Sequential { seq_len: usize, starts: &'a Tensor },
    /// One u32 position per row ([rows]), e.g. packed sequences whose positions restart.
    PerRow(&'a Tensor),
}

impl Positions<'_> {
    /// The position table and its period (see `Params::period` in the shader), checked against
    /// `rows`. Position tables are one binding (4 bytes per token), so they are never split.
    fn table(&self, rows: usize) -> Result<(&Tensor, usize)> {
        let (table, period, len) = match *self {
            Positions::Sequential { seq_len, starts } => {
                if seq_len == 0 || !rows.is_multiple_of(seq_len) {
                    bail!("rope: {rows} rows are not whole sequences of length {seq_len}");
                }
                (starts, seq_len, rows / seq_len)
            }
            Positions::PerRow(positions) => (positions, 1, rows),
        };
        table.expect("rope positions", &[len], Some(DType::U32))?;
        Ok((table, period))
    }
}

pub fn variants() -> Vec<Kernel> {
    vec![Kernel::new(&ROPE, "rope")]
}

fn rotate(
    batch: &mut Batch,
    rope: &Rope,
    x: &Tensor,
    heads: usize,
    positions: &Positions,
    sign: f32,
) -> Result<()> {
    let d = rope.head_dim;
    if x.dtype() != DType::F32 || x.shape().len() != 2 || x.row_len() != heads * d {
        bail!(
            "rope: x must be f32 [rows, {heads} * {d}], got {:?} {:?}",
            x.shape(),
            x.dtype()
        );
    }
    let (table, period) = positions.table(x.rows())?;
    let kernel = Kernel::new(&ROPE, "rope");
    let extra = [&table.chunks()[0], &rope.inv_freq.chunks()[0]];
    // One thread per (row, i < D/2): the heads share the angle.
    batch.launch_rows(&kernel, [x], &extra, d / 2, |seg| Params {
        n: (seg.count * d / 2) as u32,
        row0: seg.first as u32,
        x_off: seg.offsets[0],
        heads: heads as u32,
        head_dim: d as u32,
        period: period as u32,
        sign,
        _pad: 0,
    })
}

/// Rotates the heads of `x` [rows, heads * head_dim] in place by their positions' angles.
pub fn rope_forward(
    batch: &mut Batch,
    rope: &Rope,
    x: &Tensor,
    heads: usize,
    positions: &Positions,
) -> Result<()> {
    rotate(batch, rope, x, heads, positions, 1.0)
}

/// The backward of [`rope_forward`]: rotates the gradient `dx` in place by minus the angles (the
/// rotation's transpose), turning dL/d(rotated) into dL/d(input).
pub fn rope_backward(
    batch: &mut Batch,
    rope: &Rope,
    dx: &Tensor,
    heads: usize,
    positions: &Positions,
) -> Result<()> {
    rotate(batch, rope, dx, heads, positions, -1.0)
}

pub mod cpu {
    /// transformers' `1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))`, all in f32.
    pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
        let base = theta as f32;
        (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect()
    }

    /// Per-row positions of `rows` rows made of sequences of `seq_len` starting at `starts`.
    pub fn sequential_positions(seq_len: usize, starts: &[u32]) -> Vec<u32> {
        starts
            .iter()
            .flat_map(|&s| (0..seq_len as u32).map(move |t| s + t))
            .collect()
    }

    /// Rotates `x` [rows, heads * head_dim] by sign * angle; the angle is the f32 product (as
    /// transformers computes it), its cos/sin exact in f64.
    pub fn rope(
        x: &[f64],
        heads: usize,
        head_dim: usize,
        theta: f64,
        positions: &[u32],
        sign: f64,
    ) -> Vec<f64> {
        let inv = inv_freq(head_dim, theta);
        let half = head_dim / 2;
        let mut out = x.to_vec();
        for (row, &pos) in out.chunks_mut(heads * head_dim).zip(positions) {
            for (i, &f) in inv.iter().enumerate() {
                let angle = (pos as f32 * f) as f64;
                let (s, c) = (sign * angle.sin(), angle.cos());
                for head in row.chunks_mut(head_dim) {
                    let (lo, hi) = (head[i], head[i + half]);
                    head[i] = lo * c - hi * s;
                    head[i + half] = hi * c + lo * s;
                }
            }
        }
        out
    }
}

/// Rotates random [rows, heads * head_dim] activations forward and back on the GPU and compares
/// both with the CPU reference. `starts` of `Some(starts)` uses per-sequence offsets (sequences of
/// rows / starts.len() rows); `None` uses a per-row table of scattered large positions.
pub fn check_rope(
    gpu: &Gpu,
    rows: usize,
    heads: usize,
    head_dim: usize,
    starts: Option<&[u32]>,
    seed: u64,
) -> Result<Vec<Check>> {
    let theta = 1e6;
    let n = rows * heads * head_dim;
    let xv = random(seed, n, 1.0);
    let shape = [rows, heads * head_dim];
    let rope = Rope::new(gpu, head_dim, theta)?;
    let (table, host_positions, label) = match starts {
        Some(starts) => {
            let seq_len = rows / starts.len();
            let table = Tensor::from_u32(gpu, &[starts.len()], starts)?;
            let label = format!("{rows}x{heads}x{head_dim} starts {starts:?}");
            (table, cpu::sequential_positions(seq_len, starts), label)
        }
        None => {
            // Long-context positions exercise the range reduction.
            let positions: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7919 + 13) % 131_072)
                .collect();
            let table = Tensor::from_u32(gpu, &[rows], &positions)?;
            (
                table,
                positions,
                format!("{rows}x{heads}x{head_dim} per-row"),
            )
        }
    };
    let positions = match starts {
        Some(s) => Positions::Sequential {
            seq_len: rows / s.len(),
            starts: &table,
        },
        None => Positions::PerRow(&table),
    };
    let fwd = Tensor::from_f32(gpu, &shape, &xv)?;
    let bwd = Tensor::from_f32(gpu, &shape, &xv)?;
    let mut batch = gpu.batch();
    rope_forward(&mut batch, &rope, &fwd, heads, &positions)?;
    rope_backward(&mut batch, &rope, &bwd, heads, &positions)?;
    batch.submit();
    let x64 = to_f64(&xv);
    let want_fwd = cpu::rope(&x64, heads, head_dim, theta, &host_positions, 1.0);
    let want_bwd = cpu::rope(&x64, heads, head_dim, theta, &host_positions, -1.0);
    Ok(vec![
        Check {
            kernel: "rope_forward".into(),
            shape: label.clone(),
            max_err: max_error(&fwd.to_f32(gpu)?, &want_fwd),
            tolerance: 1e-6,
        },
        Check {
            kernel: "rope_backward".into(),
            shape: label,
            max_err: max_error(&bwd.to_f32(gpu)?, &want_bwd),
            tolerance: 1e-6,
        },
    ])
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = check_rope(gpu, 37, 3, 64, Some(&[5]), 1)?;
    checks.extend(check_rope(gpu, 22, 2, 128, None, 2)?);
    Ok(checks)
}

/// In-place rotation of the query heads at each model shape, forward and backward.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let t = config.seq_len;
    let mut results = Vec::new();
    for &shape in &config.shapes {
        let (heads, d) = (shape.heads, shape.head_dim);
        let x = Tensor::from_f32(gpu, &[t, heads * d], &random(1, t * heads * d, 1.0))?;
        let starts = Tensor::from_u32(gpu, &[1], &[0])?;
        let positions = Positions::Sequential {
            seq_len: t,
            starts: &starts,
        };
        let rope = Rope::new(gpu, d, 1e6)?;
        let bytes = 2.0 * (t * heads * d * 4) as f64;
        let label = format!("{} T={t} heads={heads} D={d}", shape.name);
        for (kernel, sign) in [("rope_forward", 1.0), ("rope_backward", -1.0)] {
            let time = crate::bench::time(gpu, config.reps, |b| {
                rotate(b, &rope, &x, heads, &positions, sign)
            })?;
            results.push(BenchResult {
                kernel: kernel.into(),
                shape: label.clone(),
                time,
                flops: 0.0,
                bytes,
            });
        }
    }
    Ok(results)
}
