//! Rotary position embedding (`shaders/rope.wgsl`), Qwen2 / transformers rotate-half convention.
//!
//! Applied in place to the [rows, heads * head_dim] f32 query and key activations together
//! ([`QueryKey`], one launch: their heads share each angle): the model keeps only the rotated
//! tensors, and the backward rotates the gradients back in place (rotation by -angle, the
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
        q_off: u32,
        k_off: u32,
        q_heads: u32,
        k_heads: u32,
        head_dim: u32,
        period: u32,
        sign: f32,
    }
);

/// The query and key activations ([rows, heads * head_dim] f32, the same rows) with their head
/// counts: RoPE rotates both in one launch.
#[derive(Clone, Copy)]
pub struct QueryKey<'a> {
    pub q: &'a Tensor,
    pub q_heads: usize,
    pub k: &'a Tensor,
    pub k_heads: usize,
}

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
    qk: QueryKey,
    positions: &Positions,
    sign: f32,
) -> Result<()> {
    let d = rope.head_dim;
    let rows = qk.q.rows();
    for (role, x, heads) in [("q", qk.q, qk.q_heads), ("k", qk.k, qk.k_heads)] {
        if x.dtype() != DType::F32 || x.shape() != [rows, heads * d] {
            bail!(
                "rope: {role} must be f32 [{rows}, {heads} * {d}], got {:?} {:?}",
                x.shape(),
                x.dtype()
            );
        }
    }
    let (table, period) = positions.table(rows)?;
    let kernel = Kernel::new(&ROPE, "rope");
    let extra = [&table.chunks()[0], &rope.inv_freq.chunks()[0]];
    // One thread per (row, i < D/2): the heads of q and k share the angle.
    batch.launch_rows(&kernel, [qk.q, qk.k], &extra, d / 2, |seg| Params {
        n: (seg.count * d / 2) as u32,
        row0: seg.first as u32,
        q_off: seg.offsets[0],
        k_off: seg.offsets[1],
        q_heads: qk.q_heads as u32,
        k_heads: qk.k_heads as u32,
        head_dim: d as u32,
        period: period as u32,
        sign,
    })
}

/// Rotates the heads of q and k in place by their positions' angles.
pub fn rope_forward(
    batch: &mut Batch,
    rope: &Rope,
    qk: QueryKey,
    positions: &Positions,
) -> Result<()> {
    rotate(batch, rope, qk, positions, 1.0)
}

/// The backward of [`rope_forward`]: rotates the gradients `dq`, `dk` in place by minus the
/// angles (the rotation's transpose), turning dL/d(rotated) into dL/d(input).
pub fn rope_backward(
    batch: &mut Batch,
    rope: &Rope,
    dqk: QueryKey,
    positions: &Positions,
) -> Result<()> {
    rotate(batch, rope, dqk, positions, -1.0)
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

/// Rotates random [rows, heads * head_dim] query and [rows, kv_heads * head_dim] key activations
/// forward and back on the GPU and compares all four with the CPU reference. `starts` of
/// `Some(starts)` uses per-sequence offsets (sequences of rows / starts.len() rows); `None` uses a
/// per-row table of scattered large positions.
pub fn check_rope(
    gpu: &Gpu,
    rows: usize,
    (heads, kv_heads): (usize, usize),
    head_dim: usize,
    starts: Option<&[u32]>,
    seed: u64,
) -> Result<Vec<Check>> {
    let theta = 1e6;
    let rope = Rope::new(gpu, head_dim, theta)?;
    let (table, host_positions, label) = match starts {
        Some(starts) => {
            let seq_len = rows / starts.len();
            let table = Tensor::from_u32(gpu, &[starts.len()], starts)?;
            let label = format!("{rows}x({heads}, {kv_heads})x{head_dim} starts {starts:?}");
            (table, cpu::sequential_positions(seq_len, starts), label)
        }
        None => {
            // Long-context positions exercise the range reduction.
            let positions: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7919 + 13) % 131_072)
                .collect();
            let table = Tensor::from_u32(gpu, &[rows], &positions)?;
            let label = format!("{rows}x({heads}, {kv_heads})x{head_dim} per-row");
            (table, positions, label)
        }
    };
    let positions = match starts {
        Some(s) => Positions::Sequential {
            seq_len: rows / s.len(),
            starts: &table,
        },
        None => Positions::PerRow(&table),
    };
    let (qv, kv) = (
        random(seed, rows * heads * head_dim, 1.0),
        random(seed + 1, rows * kv_heads * head_dim, 1.0),
    );
    let upload = |v: &[f32], h: usize| Tensor::from_f32(gpu, &[rows, h * head_dim], v);
    let (q, k) = (upload(&qv, heads)?, upload(&kv, kv_heads)?);
    let (dq, dk) = (upload(&qv, heads)?, upload(&kv, kv_heads)?);
    let pair = |q, k| QueryKey {
        q,
        q_heads: heads,
        k,
        k_heads: kv_heads,
    };
    let mut batch = gpu.batch();
    rope_forward(&mut batch, &rope, pair(&q, &k), &positions)?;
    rope_backward(&mut batch, &rope, pair(&dq, &dk), &positions)?;
    batch.submit();
    let mut checks = Vec::new();
    for (kernel, sign, [q, k]) in [
        ("rope_forward", 1.0, [&q, &k]),
        ("rope_backward", -1.0, [&dq, &dk]),
    ] {
        for (role, t, v, h) in [("q", q, &qv, heads), ("k", k, &kv, kv_heads)] {
            let want = cpu::rope(&to_f64(v), h, head_dim, theta, &host_positions, sign);
            checks.push(Check {
                kernel: format!("{kernel} {role}"),
                shape: label.clone(),
                max_err: max_error(&t.to_f32(gpu)?, &want),
                tolerance: 1e-6,
            });
        }
    }
    Ok(checks)
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = check_rope(gpu, 37, (3, 1), 64, Some(&[5]), 1)?;
    checks.extend(check_rope(gpu, 22, (2, 2), 128, None, 2)?);
    Ok(checks)
}

/// In-place rotation of the query and key heads at each model shape, forward and backward.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let t = config.seq_len;
    let mut results = Vec::new();
    for &shape in &config.shapes {
        let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let x = |h: usize| Tensor::from_f32(gpu, &[t, h * d], &random(1, t * h * d, 1.0));
        let (q, k) = (x(heads)?, x(kv_heads)?);
        let qk = QueryKey {
            q: &q,
            q_heads: heads,
            k: &k,
            k_heads: kv_heads,
        };
        let starts = Tensor::from_u32(gpu, &[1], &[0])?;
        let positions = Positions::Sequential {
            seq_len: t,
            starts: &starts,
        };
        let rope = Rope::new(gpu, d, 1e6)?;
        let bytes = 2.0 * (t * (heads + kv_heads) * d * 4) as f64;
        let label = format!("{} T={t} heads={heads}+{kv_heads} D={d}", shape.name);
        for (kernel, sign) in [("rope_forward", 1.0), ("rope_backward", -1.0)] {
            let time =
                crate::bench::time(gpu, config.reps, |b| rotate(b, &rope, qk, &positions, sign))?;
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
