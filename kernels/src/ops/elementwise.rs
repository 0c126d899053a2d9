//! Residual add, axpby, bf16 <-> f32 conversion, bias-gradient sums, seeded dropout, row copies and
//! scatters (`shaders/elementwise.wgsl`).
use std::ops::Range;

use anyhow::{bail, Result};

use super::check::{max_error, random, round_bf16, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{self, BenchConfig, BenchResult};
use crate::gpu::{linear_groups, Gpu};
use crate::shader::{params, Kernel, ELEMENTWISE};
use crate::tensor::{row_segments, DType, Out, Tensor};

params!(
    ELEMENTWISE,
    #[derive(Default)]
    struct Params {
        n: u32,
        a_off: u32,
        b_off: u32,
        out_off: u32,
        alpha: f32,
        beta: f32,
        cols: u32,
        rows: u32,
        seed: u32,
        threshold: u32,
        first: u32,
        pad: u32,
    }
);

const WG: u32 = 256;

pub fn variants() -> Vec<Kernel> {
    [
        "add",
        "axpby",
        "bf16_to_f32",
        "f32_to_bf16",
        "sum_rows",
        "dropout",
        "copy_within",
        "scatter_rows",
    ]
    .into_iter()
    .map(|entry| Kernel::new(&ELEMENTWISE, entry))
    .collect()
}

fn same_shape(role: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{role}: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    }
    Ok(())
}

/// `out = alpha * a + beta * b` (all f32, same shape).
pub fn add(
    batch: &mut Batch,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    same_shape("add a/b", a, b)?;
    same_shape("add a/out", a, out)?;
    let kernel = Kernel::new(&ELEMENTWISE, "add");
    batch.launch_rows(&kernel, [a, b, out], &[], a.row_len(), |seg| {
        let [a_off, b_off, out_off] = seg.offsets;
        Params {
            n: (seg.count * a.row_len()) as u32,
            a_off,
            b_off,
            out_off,
            alpha,
            beta,
            ..Default::default()
        }
    })
}

/// `out = alpha * a + beta * out` in place (f32, same shape).
pub fn axpby(batch: &mut Batch, alpha: f32, a: &Tensor, beta: f32, out: &Tensor) -> Result<()> {
    same_shape("axpby", a, out)?;
    launch_unary(batch, "axpby", a, out, |_| Params {
        alpha,
        beta,
        ..Default::default()
    })
}

/// Runs the flat kernel `entry`, which reads `a` and writes `out` (same shape, f32) one element per
/// thread, over the chunk segments the two share; `params(first)` fills in what the entry needs
/// besides the segment's size and offsets, given the tensor-wide index of its first element.
fn launch_unary(
    batch: &mut Batch,
    entry: &'static str,
    a: &Tensor,
    out: &Tensor,
    params: impl Fn(u32) -> Params,
) -> Result<()> {
    let (kernel, cols) = (Kernel::new(&ELEMENTWISE, entry), a.row_len());
    batch.launch_rows(&kernel, [a, out], &[], cols, |seg| {
        let [a_off, out_off] = seg.offsets;
        Params {
            n: (seg.count * cols) as u32,
            a_off,
            out_off,
            ..params((seg.first * cols) as u32)
        }
    })
}

/// Copies rows `src_rows` of `src` into rows `dst_row..` of `dst` (f32, same row length), e.g.
/// moving a KV-cache slot. `src` and `dst` may be one tensor if the two ranges do not overlap.
/// Walks the row ranges inside one chunk of both: `add` (alpha = 1, beta = 0) copies between two
/// chunks, `copy_within` inside one.
pub fn copy_rows(
    batch: &mut Batch,
    src: &Tensor,
    src_rows: Range<usize>,
    dst: &Tensor,
    dst_row: usize,
) -> Result<()> {
    let (rows, cols) = (src_rows.len(), src.row_len());
    if src.dtype() != DType::F32
        || dst.dtype() != DType::F32
        || dst.row_len() != cols
        || src_rows.end > src.rows()
        || dst_row + rows > dst.rows()
    {
        bail!(
            "copy_rows: cannot copy rows {src_rows:?} of f32 {:?} into rows {dst_row}.. of {:?} {:?}",
            src.shape(),
            dst.shape(),
            dst.dtype()
        );
    }
    if src.chunks()[0] == dst.chunks()[0]
        && src_rows.start < dst_row + rows
        && dst_row < src_rows.end
    {
        bail!(
            "copy_rows: rows {src_rows:?} and {dst_row}..{} of one tensor overlap",
            dst_row + rows
        );
    }
    // Chunk boundaries of either range, relative to its start.
    let mut cuts: Vec<usize> = [(src, src_rows.start), (dst, dst_row)]
        .iter()
        .flat_map(|&(t, first)| t.chunk_starts().filter_map(move |s| s.checked_sub(first)))
        .filter(|&r| r > 0 && r < rows)
        .collect();
    cuts.extend([0, rows]);
    cuts.sort_unstable();
    cuts.dedup();
    for w in cuts.windows(2) {
        let (rs, rd) = (src.row(src_rows.start + w[0]), dst.row(dst_row + w[0]));
        let n = ((w[1] - w[0]) * cols) as u32;
        let params = Params {
            n,
            a_off: rs.offset,
            b_off: rs.offset,
            out_off: rd.offset,
            alpha: 1.0,
            ..Default::default()
        };
        let groups = linear_groups(batch.gpu, n.div_ceil(WG));
        if rs.buffer == rd.buffer {
            let kernel = Kernel::new(&ELEMENTWISE, "copy_within");
            batch.dispatch(&kernel, &params, &[rd.buffer], groups)?;
        } else {
            let kernel = Kernel::new(&ELEMENTWISE, "add");
            batch.dispatch(&kernel, &params, &[rs.buffer, rs.buffer, rd.buffer], groups)?;
        }
    }
    Ok(())
}

/// Writes row i of `src` [n, cols] into row `rows[i]` of `dst` (f32, same row length; `rows` u32
/// [n], distinct rows of `dst`), e.g. appending each sequence's new keys at its own slot of a
/// batched KV cache. The indices stay on the device (out-of-range ones write nothing), so every
/// chunk of `dst` gets one launch per chunk of `src`.
pub fn scatter_rows(batch: &mut Batch, src: &Tensor, dst: &Tensor, rows: &Tensor) -> Result<()> {
    let cols = src.row_len();
    if src.dtype() != DType::F32 || dst.dtype() != DType::F32 || dst.row_len() != cols {
        bail!(
            "scatter_rows: cannot scatter f32 {:?} into {:?} {:?}",
            src.shape(),
            dst.shape(),
            dst.dtype()
        );
    }
    rows.expect("scatter_rows rows", &[src.rows()], Some(DType::U32))?;
    let kernel = Kernel::new(&ELEMENTWISE, "scatter_rows");
    for seg in row_segments(src.rows(), &[src]) {
        let rs = src.row(seg.start);
        let n = (seg.len() * cols) as u32;
        let mut first = 0;
        while first < dst.rows() {
            let chunk = dst.chunk_rows(first);
            let rd = dst.row(chunk.start);
            let params = Params {
                n,
                a_off: rs.offset,
                b_off: seg.start as u32,
                out_off: rd.offset,
                cols: cols as u32,
                rows: chunk.len() as u32,
                first: chunk.start as u32,
                ..Default::default()
            };
            let groups = linear_groups(batch.gpu, n.div_ceil(WG));
            // A 1-D index tensor is one row, so one chunk.
            let buffers = [rs.buffer, rd.buffer, &rows.chunks()[0]];
            batch.dispatch(&kernel, &params, &buffers, groups)?;
            first = chunk.end;
        }
    }
    Ok(())
}

/// Converts between bf16 and f32 tensors of the same shape (either direction).
pub fn convert(batch: &mut Batch, src: &Tensor, dst: &Tensor) -> Result<()> {
    same_shape("convert", src, dst)?;
    let entry = match (src.dtype(), dst.dtype()) {
        (DType::BF16, DType::F32) => "bf16_to_f32",
        (DType::F32, DType::BF16) if src.row_len().is_multiple_of(2) => "f32_to_bf16",
        (DType::F32, DType::BF16) => bail!(
            "convert to bf16 needs an even row length, got {:?}",
            src.shape()
        ),
        (s, d) => bail!("convert: no {s:?} -> {d:?} kernel"),
    };
    let (kernel, cols) = (Kernel::new(&ELEMENTWISE, entry), src.row_len());
    let params = |n: usize, a_off, out_off| Params {
        n: n as u32,
        a_off,
        out_off,
        ..Default::default()
    };
    // Entry points list their buffers in binding order: f32 source (1) before bf16 output (5),
    // f32 output (3) before bf16 source (4). f32_to_bf16 runs one thread per bf16 pair.
    if entry == "f32_to_bf16" {
        batch.launch_rows(&kernel, [src, dst], &[], cols / 2, |seg| {
            let [src_off, dst_off] = seg.offsets;
            params(seg.count * cols, src_off, dst_off)
        })
    } else {
        batch.launch_rows(&kernel, [dst, src], &[], cols, |seg| {
            let [dst_off, src_off] = seg.offsets;
            params(seg.count * cols, src_off, dst_off)
        })
    }
}

/// `out[c] = alpha * sum_r a[r, c] (+ beta * out[c])`: the bias gradient of a [rows, cols] output
/// gradient (accumulated across micro-batches with [`Out::add`]).
pub fn sum_rows(batch: &mut Batch, a: &Tensor, out: Out, alpha: f32) -> Result<()> {
    let Out { tensor: out, beta } = out;
    let cols = a.row_len();
    out.expect("sum_rows out", &[cols], Some(DType::F32))?;
    let ro = out.row(0);
    for (i, seg) in row_segments(a.rows(), &[a]).into_iter().enumerate() {
        let ra = a.row(seg.start);
        let beta = if i == 0 { beta } else { 1.0 };
        let params = Params {
            a_off: ra.offset,
            out_off: ro.offset,
            alpha,
            beta,
            cols: cols as u32,
            rows: seg.len() as u32,
            ..Default::default()
        };
        batch.dispatch(
            &Kernel::new(&ELEMENTWISE, "sum_rows"),
            &params,
            &[ra.buffer, ro.buffer],
            [(cols as u32).div_ceil(WG), 1, 1],
        )?;
    }
    Ok(())
}

/// Inverted dropout with a counter-based mask: element e (row-major over the whole tensor, counted
/// from `first`) is dropped iff `hash(hash(first + e) ^ seed) < p·2³²`, kept elements are scaled by
/// 1 / (1 - p). Nothing is stored: the forward, its per-layer recomputation and the backward
/// regenerate the same mask from the seed, and since dropout is linear and diagonal its backward is
/// the same call on the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability, in [0, 1).
    pub p: f32,
    pub seed: u32,
    /// The mask index of the tensor's element 0: a chunk of rows of a larger tensor gets that
    /// tensor's mask (0 for a whole tensor).
    pub first: u32,
}

impl Dropout {
    /// The mask of a whole tensor.
    pub fn new(p: f32, seed: u32) -> Dropout {
        Dropout { p, seed, first: 0 }
    }

    /// This mask over rows `row..` of a tensor of `cols` columns: what those rows get as part of
    /// the whole tensor.
    pub fn from_row(self, row: usize, cols: usize) -> Dropout {
        Dropout {
            first: self.first + (row * cols) as u32,
            ..self
        }
    }

    fn threshold(&self) -> u32 {
        (self.p as f64 * 4294967296.0).round().min(u32::MAX as f64) as u32
    }

    /// The multiplier of mask index `index` (element `index - first`): 0 when dropped, else
    /// 1 / (1 - p) (the CPU mirror of the kernel's mask).
    pub fn factor(&self, index: u32) -> f32 {
        if pcg_hash(pcg_hash(index) ^ self.seed) >= self.threshold() {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

/// PCG-RXS-M-XS, the same 32-bit hash as `pcg_hash` in `shaders/elementwise.wgsl`.
fn pcg_hash(x: u32) -> u32 {
    let state = x.wrapping_mul(747796405).wrapping_add(2891336453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
    (word >> 22) ^ word
}

/// `out = dropout(a) (+ beta * out)` (f32, same shape, at most 2³² elements).
pub fn dropout(batch: &mut Batch, a: &Tensor, out: Out, mask: &Dropout) -> Result<()> {
    let Out { tensor: out, beta } = out;
    same_shape("dropout", a, out)?;
    if !(0.0..1.0).contains(&mask.p) {
        bail!("dropout probability must lie in [0, 1), got {}", mask.p);
    }
    if (mask.first as usize + a.numel()) > u32::MAX as usize {
        bail!(
            "dropout: {:?} from mask index {} passes 2^32 elements",
            a.shape(),
            mask.first
        );
    }
    launch_unary(batch, "dropout", a, out, |first| Params {
        alpha: 1.0 / (1.0 - mask.p),
        beta,
        seed: mask.seed,
        threshold: mask.threshold(),
        first: mask.first + first,
        ..Default::default()
    })
}

pub mod cpu {
    pub fn add(a: &[f64], b: &[f64], alpha: f64, beta: f64) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| alpha * x + beta * y).collect()
    }

    /// `dropout(a) + beta * out`.
    pub fn dropout(a: &[f64], out: &[f64], mask: &super::Dropout, beta: f64) -> Vec<f64> {
        a.iter()
            .zip(out)
            .enumerate()
            .map(|(i, (a, o))| mask.factor(mask.first + i as u32) as f64 * a + beta * o)
            .collect()
    }

    /// `dst` with row i of `src` written at row `rows[i]`.
    pub fn scatter_rows(src: &[f64], dst: &[f64], rows: &[u32], cols: usize) -> Vec<f64> {
        let mut out = dst.to_vec();
        for (row, &r) in src.chunks(cols).zip(rows) {
            out[r as usize * cols..][..cols].copy_from_slice(row);
        }
        out
    }

    /// `dst` with rows `src_rows` of `src` copied to rows `dst_row..`.
    pub fn copy_rows(
        src: &[f64],
        src_rows: std::ops::Range<usize>,
        dst: &[f64],
        dst_row: usize,
        cols: usize,
    ) -> Vec<f64> {
        let mut out = dst.to_vec();
        let n = src_rows.len() * cols;
        out[dst_row * cols..][..n].copy_from_slice(&src[src_rows.start * cols..][..n]);
        out
    }

    pub fn sum_rows(a: &[f64], cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; cols];
        for row in a.chunks(cols) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        out
    }
}

/// Runs every elementwise kernel on a [rows, cols] problem and compares with the CPU reference.
pub fn check(gpu: &Gpu, rows: usize, cols: usize, seed: u64) -> Result<Vec<Check>> {
    let shape = [rows, cols];
    let n = rows * cols;
    let (av, bv) = (random(seed, n, 1.0), random(seed + 1, n, 1.0));
    let a = Tensor::from_f32(gpu, &shape, &av)?;
    let b = Tensor::from_f32(gpu, &shape, &bv)?;
    let sum = Tensor::zeros(gpu, &shape, DType::F32)?;
    let acc = Tensor::from_f32(gpu, &shape, &bv)?;
    let bias = Tensor::from_f32(gpu, &[cols], &bv[..cols])?;
    let a_bf16 = Tensor::from_f32_as_bf16(gpu, &shape, &av)?;
    let widened = Tensor::zeros(gpu, &shape, DType::F32)?;
    let dropped = Tensor::from_f32(gpu, &shape, &bv)?;
    // A mask that starts past element 0, as a chunk of a larger tensor's rows gets.
    let mask = Dropout::new(0.3, seed as u32 ^ 0x9e37_79b9).from_row(3, cols);
    // Moves: b's first half past its second half inside one tensor, and a's rows 1.. to the top of
    // a copy of b.
    let half = rows / 2;
    let moved = Tensor::from_f32(gpu, &shape, &bv)?;
    let copied = Tensor::from_f32(gpu, &shape, &bv)?;
    let mut batch = gpu.batch();
    add(&mut batch, &a, &b, &sum, 1.0, 1.0)?;
    axpby(&mut batch, 0.5, &a, -2.0, &acc)?;
    sum_rows(&mut batch, &a, Out::add(&bias), 2.0)?;
    convert(&mut batch, &a_bf16, &widened)?;
    dropout(&mut batch, &a, Out::scaled(&dropped, 0.5), &mask)?;
    copy_rows(&mut batch, &moved, 0..half, &moved, rows - half)?;
    copy_rows(&mut batch, &a, 1..rows, &copied, 0)?;
    batch.submit();
    let (a64, b64) = (to_f64(&av), to_f64(&bv));
    let label = format!("{rows}x{cols}");
    let mut checks = vec![
        Check {
            kernel: "add".into(),
            shape: label.clone(),
            max_err: max_error(&sum.to_f32(gpu)?, &cpu::add(&a64, &b64, 1.0, 1.0)),
            tolerance: 1e-6,
        },
        Check {
            kernel: "axpby".into(),
            shape: label.clone(),
            max_err: max_error(&acc.to_f32(gpu)?, &cpu::add(&a64, &b64, 0.5, -2.0)),
            tolerance: 1e-6,
        },
        Check {
            kernel: "sum_rows".into(),
            shape: label.clone(),
            max_err: max_error(
                &bias.to_f32(gpu)?,
                &cpu::add(&cpu::sum_rows(&a64, cols), &b64[..cols], 2.0, 1.0),
            ),
            tolerance: 1e-5,
        },
        Check {
            kernel: "dropout".into(),
            shape: label.clone(),
            max_err: max_error(&dropped.to_f32(gpu)?, &cpu::dropout(&a64, &b64, &mask, 0.5)),
            tolerance: 1e-6,
        },
        Check {
            kernel: "copy_rows (one tensor)".into(),
            shape: label.clone(),
            max_err: max_error(
                &moved.to_f32(gpu)?,
                &cpu::copy_rows(&b64, 0..half, &b64, rows - half, cols),
            ),
            tolerance: 0.0,
        },
        Check {
            kernel: "copy_rows".into(),
            shape: label.clone(),
            max_err: max_error(
                &copied.to_f32(gpu)?,
                &cpu::copy_rows(&a64, 1..rows, &b64, 0, cols),
            ),
            tolerance: 0.0,
        },
        Check {
            kernel: "bf16_to_f32".into(),
            shape: label.clone(),
            max_err: max_error(&widened.to_f32(gpu)?, &to_f64(&round_bf16(&av))),
            tolerance: 0.0,
        },
    ];
    // a's rows to the odd rows of a [2 rows, cols] tensor, last first (the u32 [rows] index is one
    // binding, so this runs where it fits).
    if rows * 4 <= gpu.max_binding_bytes as usize {
        let index: Vec<u32> = (0..rows).map(|i| (2 * (rows - i) - 1) as u32).collect();
        let before = random(seed + 2, 2 * n, 1.0);
        let scattered = Tensor::from_f32(gpu, &[2 * rows, cols], &before)?;
        let mut batch = gpu.batch();
        scatter_rows(
            &mut batch,
            &a,
            &scattered,
            &Tensor::from_u32(gpu, &[rows], &index)?,
        )?;
        batch.submit();
        checks.push(Check {
            kernel: "scatter_rows".into(),
            shape: label.clone(),
            max_err: max_error(
                &scattered.to_f32(gpu)?,
                &cpu::scatter_rows(&a64, &to_f64(&before), &index, cols),
            ),
            tolerance: 0.0,
        });
    }
    if cols.is_multiple_of(2) {
        let narrowed = Tensor::zeros(gpu, &shape, DType::BF16)?;
        let mut batch = gpu.batch();
        convert(&mut batch, &a, &narrowed)?;
        batch.submit();
        checks.push(Check {
            kernel: "f32_to_bf16".into(),
            shape: label,
            max_err: max_error(&narrowed.to_f32(gpu)?, &to_f64(&round_bf16(&av))),
            tolerance: 0.0,
        });
    }
    Ok(checks)
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    check(gpu, 67, 130, 1)
}

/// Residual add at [T, hidden] for each model shape (bandwidth-bound: 3 f32 per element).
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for &shape in &config.shapes {
        let dims = [config.seq_len, shape.hidden];
        let (a, b, out) = (
            Tensor::zeros(gpu, &dims, DType::F32)?,
            Tensor::zeros(gpu, &dims, DType::F32)?,
            Tensor::zeros(gpu, &dims, DType::F32)?,
        );
        let time = bench::time(gpu, config.reps, |batch| add(batch, &a, &b, &out, 1.0, 1.0))?;
        let bytes = (3 * config.seq_len * shape.hidden * 4) as f64;
        results.push(BenchResult {
            kernel: "add".into(),
            shape: format!("{} {:?}", shape.name, dims),
            time,
            flops: 0.0,
            bytes,
        });
    }
    Ok(results)
}
