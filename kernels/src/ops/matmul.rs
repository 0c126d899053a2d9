//! Linear layers: `Y = X·Wᵀ + bias` and its two gradients, all through one tiled GEMM
//! (`shaders/matmul.wgsl`) that LoRA and the LM-head cross-entropy reuse via [`Gemm`].
//!
//! The kernel computes a 32×256 tile of C per workgroup of 64 threads, each owning a 32×4 register
//! block, and stages K-steps of 8 of both operands through 9.3 KiB of workgroup memory (A values are
//! read as workgroup-wide broadcasts). Operand layouts (transposes, bf16 or f32 B, bias, a fused
//! second product) are compile-time constants of the variant. [`Gemm::run`] walks the tensors'
//! chunks: output rows and columns are split where an operand indexed by them changes chunk, and a
//! reduction dimension that spans several chunks becomes several launches that accumulate into C
//! (`beta = 1` after the first). Products of at most 8 rows in the forward layout (decode's
//! `x·Wᵀ`) take a `gemv` entry point instead, which reads each weight row once for all rows.
use std::ops::Range;

use anyhow::{bail, ensure, Result};

use super::check::{max_error, random, round_bf16, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult, ModelShape};
use crate::gpu::Gpu;
use crate::plan::GemmVariant;
use crate::shader::{params, Const, Kernel, MATMUL, MATMUL_SUBGROUP};
use crate::tensor::{DType, Out, RowAt, Tensor};

params!(
    MATMUL,
    struct Params {
        m: u32,
        n: u32,
        k: u32,
        k2: u32,
        a_off: u32,
        lda: u32,
        b_off: u32,
        ldb: u32,
        c_off: u32,
        ldc: u32,
        bias_off: u32,
        a2_off: u32,
        lda2: u32,
        b2_off: u32,
        ldb2: u32,
        alpha: f32,
        alpha2: f32,
        beta: f32,
    }
);

/// Output tile of the tiled kernel (rows, columns), and the workgroup edge of the naive one.
const TILE: (usize, usize) = (32, 256);
const NAIVE_WG: usize = 16;

/// Most output rows the few-row `gemv` kernel takes (its `GV_ROWS`), and its columns per workgroup.
const GEMV_ROWS: usize = 8;
const GEMV_WG: usize = 64;

/// Rows of the subgroup kernel's block (its `SG_ROWS`), the fewest that cover a product's rows:
/// [`GEMV_ROWS`] for few-row products (decode's), then 32, and 64 for all longer ones, where a
/// lane's 24 loads per K-step (what costs on llvmpipe) serve 4096 FMAs, against 16 for 2048 at 32.
const SUBGROUP_ROWS: [u32; 3] = [GEMV_ROWS as u32, 32, 64];
/// Columns of the subgroup kernel's workgroup: 8 lanes (its `SG_LANES`) of 8 columns.
const SUBGROUP_COLS: usize = 64;

/// The shader entry point of a launch.
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    Tiled,
    /// Few rows of `x·Wᵀ`: decode's products, which would waste most of a tiled kernel's tile.
    Gemv,
    /// One thread per output (benchmark baseline).
    Naive,
    /// The subgroup kernel (shaders/matmul_subgroup.wgsl) with blocks of `rows` rows, reading
    /// whole vec4s where the launch's operands are `aligned` ([`vec4_aligned`]).
    Subgroup {
        rows: u32,
        aligned: bool,
    },
}

/// Whether every operand of a launch starts and strides in whole vec4s of its storage (4 f32, 8
/// bf16; C's and the bias offset too): the subgroup kernel's `SG_ALIGNED`, which then reads each
/// run with one load and writes four outputs with one store.
fn vec4_aligned(params: &Params, b_bf16: bool, second: bool) -> bool {
    let whole =
        |offset: u32, ld: u32, unit: u32| offset.is_multiple_of(unit) && ld.is_multiple_of(unit);
    let b_unit = if b_bf16 { 8 } else { 4 };
    whole(params.a_off, params.lda, 4)
        && whole(params.b_off, params.ldb, b_unit)
        && whole(params.c_off, params.ldc, 4)
        && params.bias_off.is_multiple_of(4)
        && (!second || whole(params.a2_off, params.lda2, 4) && whole(params.b2_off, params.ldb2, 4))
}

/// Longest reduction one launch runs; longer ones accumulate over several launches. llvmpipe
/// (lavapipe) silently ends a shader's loops after 65535 iterations in all per invocation, about
/// 1500 K-steps of this kernel; short launches also stay clear of OS GPU watchdogs.
const MAX_K_PER_LAUNCH: usize = 4096;

/// A block of a tensor seen as a matrix of `rows()` rows of `row_len()` elements: the operand of a
/// [`Gemm`]. Defaults to the whole tensor; `rows` and `cols` narrow it.
#[derive(Clone)]
pub struct Mat<'a> {
    pub tensor: &'a Tensor,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

impl<'a> Mat<'a> {
    pub fn new(tensor: &'a Tensor) -> Self {
        Mat {
            tensor,
            rows: 0..tensor.rows(),
            cols: 0..tensor.row_len(),
        }
    }

    /// Rows `range` of the tensor.
    pub fn rows(mut self, range: Range<usize>) -> Self {
        self.rows = range;
        self
    }

    /// Columns `range` of the tensor.
    pub fn cols(mut self, range: Range<usize>) -> Self {
        self.cols = range;
        self
    }

    fn check(&self, role: &str) -> Result<()> {
        let (rows, cols) = (self.tensor.rows(), self.tensor.row_len());
        ensure!(
            !self.rows.is_empty() && !self.cols.is_empty() && self.rows.end <= rows && self.cols.end <= cols,
            "gemm {role}: block rows {:?} cols {:?} is empty or outside the [{rows}, {cols}] tensor",
            self.rows,
            self.cols
        );
        Ok(())
    }

    /// Chunk and element offset of block element (row, col).
    fn at(&self, row: usize, col: usize) -> RowAt<'a> {
        let at = self.tensor.row(self.rows.start + row);
        RowAt {
            buffer: at.buffer,
            offset: at.offset + (self.cols.start + col) as u32,
        }
    }

    /// Block-relative rows where the tensor changes chunk, strictly inside the block.
    fn cuts(&self) -> impl Iterator<Item = usize> + '_ {
        self.tensor
            .chunk_starts()
            .filter(|&s| s > self.rows.start && s < self.rows.end)
            .map(|s| s - self.rows.start)
    }
}

impl<'a> From<&'a Tensor> for Mat<'a> {
    fn from(t: &'a Tensor) -> Self {
        Mat::new(t)
    }
}

/// A second product accumulated in the same launch: `alpha · A2·op(B2)`, with A2 [M, K2] row-major
/// and B2 (f32) transposed like the first product's B.
#[derive(Clone)]
pub struct Second<'a> {
    pub a: Mat<'a>,
    pub b: Mat<'a>,
    pub alpha: f32,
}

/// `C = alpha·op(A)·op(B) [+ second product] (+ bias) + beta·C`, where op(A) is [M, K] (A stored
/// [K, M] when `trans_a`), op(B) is [K, N] (B stored [N, K] when `trans_b`, the layout of a weight),
/// C is an f32 [M, N] block and bias an f32 [N] vector. A is f32; B is f32 or bf16.
#[derive(Clone)]
pub struct Gemm<'a> {
    pub a: Mat<'a>,
    pub trans_a: bool,
    pub b: Mat<'a>,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<&'a Tensor>,
    pub second: Option<Second<'a>>,
}

/// Row ranges of `0..len` inside which no block changes chunk.
fn segments(len: usize, blocks: &[&Mat]) -> Vec<Range<usize>> {
    let mut cuts: Vec<usize> = blocks.iter().flat_map(|b| b.cuts()).collect();
    cuts.extend([0, len]);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// [`segments`] of a reduction, cut further into pieces of at most [`MAX_K_PER_LAUNCH`].
fn reduction_segments(len: usize, blocks: &[&Mat]) -> Vec<Range<usize>> {
    segments(len, blocks)
        .into_iter()
        .flat_map(|seg| {
            seg.clone()
                .step_by(MAX_K_PER_LAUNCH)
                .map(move |s| s..(s + MAX_K_PER_LAUNCH).min(seg.end))
        })
        .collect()
}

impl<'a> Gemm<'a> {
    pub fn new(a: impl Into<Mat<'a>>, trans_a: bool, b: impl Into<Mat<'a>>, trans_b: bool) -> Self {
        Gemm {
            a: a.into(),
            trans_a,
            b: b.into(),
            trans_b,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
            second: None,
        }
    }

    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    pub fn bias(mut self, bias: Option<&'a Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn second(mut self, a: impl Into<Mat<'a>>, b: impl Into<Mat<'a>>, alpha: f32) -> Self {
        self.second = Some(Second {
            a: a.into(),
            b: b.into(),
            alpha,
        });
        self
    }

    /// The variant these operands need.
    fn kernel(&self, entry: Entry, bias: bool) -> Kernel {
        kernel(
            entry,
            self.trans_a,
            self.trans_b,
            self.b.tensor.dtype() == DType::BF16,
            bias,
            self.second.is_some(),
        )
    }

    /// Records the product into `c` with the device plan's GEMM variant: the tiled kernel (or
    /// the few-row one where it applies), or the subgroup kernel.
    pub fn run(&self, batch: &mut Batch, c: impl Into<Mat<'a>>) -> Result<()> {
        let c = c.into();
        let few_rows = c.rows.len() <= GEMV_ROWS;
        let entry = match batch.gpu.plan.gemm {
            GemmVariant::Tiled
                if few_rows && !self.trans_a && self.trans_b && self.second.is_none() =>
            {
                Entry::Gemv
            }
            GemmVariant::Tiled => Entry::Tiled,
            GemmVariant::Subgroup => Entry::Subgroup {
                rows: SUBGROUP_ROWS
                    .into_iter()
                    .find(|&rows| c.rows.len() <= rows as usize)
                    .unwrap_or(SUBGROUP_ROWS[2]),
                // Set per launch, from its offsets.
                aligned: false,
            },
        };
        self.launch(batch, &c, entry)
    }

    /// Records the product with the naive kernel (benchmark baseline only).
    pub fn run_naive(&self, batch: &mut Batch, c: impl Into<Mat<'a>>) -> Result<()> {
        self.launch(batch, &c.into(), Entry::Naive)
    }

    /// Records the product with the tiled kernel even where `run` would pick another (benchmark).
    pub fn run_tiled(&self, batch: &mut Batch, c: impl Into<Mat<'a>>) -> Result<()> {
        self.launch(batch, &c.into(), Entry::Tiled)
    }

    /// Checks operands against C and returns K (and K2 of the second product, 0 without one).
    fn dims(&self, c: &Mat) -> Result<(usize, usize)> {
        for (role, m, dtypes) in [
            ("A", &self.a, &[DType::F32][..]),
            ("B", &self.b, &[DType::F32, DType::BF16][..]),
            ("C", c, &[DType::F32][..]),
        ] {
            m.check(role)?;
            ensure!(
                dtypes.contains(&m.tensor.dtype()),
                "gemm {role}: {:?} is not supported",
                m.tensor.dtype()
            );
        }
        let (m, n) = (c.rows.len(), c.cols.len());
        let (a_m, k) = if self.trans_a {
            (self.a.cols.len(), self.a.rows.len())
        } else {
            (self.a.rows.len(), self.a.cols.len())
        };
        let (b_k, b_n) = if self.trans_b {
            (self.b.cols.len(), self.b.rows.len())
        } else {
            (self.b.rows.len(), self.b.cols.len())
        };
        ensure!(
            a_m == m && b_n == n && b_k == k,
            "gemm: op(A) is [{a_m}, {k}], op(B) [{b_k}, {b_n}], C [{m}, {n}]"
        );
        if let Some(bias) = self.bias {
            bias.expect("gemm bias", &[n], Some(DType::F32))?;
        }
        let mut k2 = 0;
        if let Some(s) = &self.second {
            for (role, mat) in [("A2", &s.a), ("B2", &s.b)] {
                mat.check(role)?;
                ensure!(mat.tensor.dtype() == DType::F32, "gemm {role}: must be f32");
            }
            k2 = s.a.cols.len();
            let (b_k, b_n) = if self.trans_b {
                (s.b.cols.len(), s.b.rows.len())
            } else {
                (s.b.rows.len(), s.b.cols.len())
            };
            ensure!(
                s.a.rows.len() == m && b_n == n && b_k == k2,
                "gemm second product: A2 is [{}, {k2}], op(B2) [{b_k}, {b_n}], C [{m}, {n}]",
                s.a.rows.len()
            );
        }
        Ok((k, k2))
    }

    fn launch(&self, batch: &mut Batch, c: &Mat, entry: Entry) -> Result<()> {
        let (k, k2) = self.dims(c)?;
        let (m, n) = (c.rows.len(), c.cols.len());
        let second = self.second.as_ref();
        // Which operands are indexed by output rows (i), output columns (j) and the reductions.
        let mut by_i = vec![c];
        let mut by_j = vec![];
        let mut by_k = vec![];
        let mut by_k2 = vec![];
        if self.trans_a {
            by_k.push(&self.a)
        } else {
            by_i.push(&self.a)
        }
        if self.trans_b {
            by_j.push(&self.b)
        } else {
            by_k.push(&self.b)
        }
        if let Some(s) = second {
            by_i.push(&s.a);
            if self.trans_b {
                by_j.push(&s.b)
            } else {
                by_k2.push(&s.b)
            }
        }
        let k_segs = reduction_segments(k, &by_k);
        let k2_segs = if second.is_some() {
            reduction_segments(k2, &by_k2)
        } else {
            Vec::new()
        };
        for i in segments(m, &by_i) {
            for j in segments(n, &by_j) {
                for step in 0..k_segs.len().max(k2_segs.len()) {
                    // A reduction that ran out of segments contributes nothing (K = 0) to this step.
                    let ks = k_segs.get(step).cloned().unwrap_or(0..0);
                    let k2s = k2_segs.get(step).cloned().unwrap_or(0..0);
                    let a = if self.trans_a {
                        self.a.at(ks.start, i.start)
                    } else {
                        self.a.at(i.start, ks.start)
                    };
                    let b = if self.trans_b {
                        self.b.at(j.start, ks.start)
                    } else {
                        self.b.at(ks.start, j.start)
                    };
                    let out = c.at(i.start, j.start);
                    let mut params = Params {
                        m: i.len() as u32,
                        n: j.len() as u32,
                        k: ks.len() as u32,
                        k2: k2s.len() as u32,
                        a_off: a.offset,
                        lda: self.a.tensor.row_len() as u32,
                        b_off: b.offset,
                        ldb: self.b.tensor.row_len() as u32,
                        c_off: out.offset,
                        ldc: c.tensor.row_len() as u32,
                        bias_off: j.start as u32,
                        a2_off: 0,
                        lda2: 0,
                        b2_off: 0,
                        ldb2: 0,
                        alpha: self.alpha,
                        alpha2: 0.0,
                        beta: if step == 0 { self.beta } else { 1.0 },
                    };
                    // Naga counts bindings under a const-false branch as used, so absent
                    // operands bind A's chunk (read-only, never read).
                    let bias = self.bias.filter(|_| step == 0);
                    let mut buffers = [
                        a.buffer,
                        b.buffer,
                        out.buffer,
                        bias.map_or(a.buffer, |t| t.row(0).buffer),
                        a.buffer,
                        a.buffer,
                    ];
                    if let Some(s) = second {
                        let k2_at = k2s.start;
                        let a2 = s.a.at(i.start, k2_at);
                        let b2 = if self.trans_b {
                            s.b.at(j.start, k2_at)
                        } else {
                            s.b.at(k2_at, j.start)
                        };
                        params.a2_off = a2.offset;
                        params.lda2 = s.a.tensor.row_len() as u32;
                        params.b2_off = b2.offset;
                        params.ldb2 = s.b.tensor.row_len() as u32;
                        params.alpha2 = s.alpha;
                        buffers[4] = a2.buffer;
                        buffers[5] = b2.buffer;
                    }
                    let (rows, cols) = match entry {
                        Entry::Tiled => TILE,
                        Entry::Gemv => (GEMV_ROWS, GEMV_WG),
                        Entry::Naive => (NAIVE_WG, NAIVE_WG),
                        Entry::Subgroup { rows, .. } => (rows as usize, SUBGROUP_COLS),
                    };
                    let entry = match entry {
                        Entry::Subgroup { rows, .. } => Entry::Subgroup {
                            rows,
                            aligned: vec4_aligned(
                                &params,
                                self.b.tensor.dtype() == DType::BF16,
                                second.is_some(),
                            ),
                        },
                        entry => entry,
                    };
                    let groups = [
                        j.len().div_ceil(cols) as u32,
                        i.len().div_ceil(rows) as u32,
                        1,
                    ];
                    // `gemv` has no second product, so binds only A, B, C and bias.
                    let used = if entry == Entry::Gemv {
                        4
                    } else {
                        buffers.len()
                    };
                    batch.dispatch(
                        &self.kernel(entry, bias.is_some()),
                        &params,
                        &buffers[..used],
                        groups,
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn kernel(
    entry: Entry,
    trans_a: bool,
    trans_b: bool,
    b_bf16: bool,
    bias: bool,
    second: bool,
) -> Kernel {
    let kernel = match entry {
        Entry::Tiled => Kernel::new(&MATMUL, "gemm"),
        Entry::Gemv => Kernel::new(&MATMUL, "gemv"),
        Entry::Naive => Kernel::new(&MATMUL, "gemm_naive"),
        Entry::Subgroup { rows, aligned } => Kernel::new(&MATMUL_SUBGROUP, "gemm_sg")
            .with("SG_ROWS", Const::U32(rows))
            .with("SG_ALIGNED", Const::Bool(aligned)),
    };
    kernel
        .with("TRANS_A", Const::Bool(trans_a))
        .with("TRANS_B", Const::Bool(trans_b))
        .with("B_BF16", Const::Bool(b_bf16))
        .with("BIAS", Const::Bool(bias))
        .with("SECOND", Const::Bool(second))
}

/// Every combination of layout constants for the general entry points (the subgroup one at every
/// block height, aligned or not), and those of the forward form (B transposed, no second product)
/// for `gemv`.
pub fn variants() -> Vec<Kernel> {
    let mut all = Vec::new();
    for bits in 0..32u32 {
        let bit = |i: u32| bits & (1 << i) != 0;
        let mut entries = vec![Entry::Tiled, Entry::Naive];
        for aligned in [false, true] {
            entries.extend(SUBGROUP_ROWS.map(|rows| Entry::Subgroup { rows, aligned }));
        }
        for entry in entries {
            all.push(kernel(entry, bit(0), bit(1), bit(2), bit(3), bit(4)));
        }
        if !bit(0) && bit(1) && !bit(4) {
            all.push(kernel(Entry::Gemv, false, true, bit(2), bit(3), false));
        }
    }
    all
}

/// The [rows, row length] shape of a tensor used as a matrix.
pub(crate) fn matrix(t: &Tensor) -> (usize, usize) {
    (t.rows(), t.row_len())
}

/// Checks that `t` is an f32 matrix of `rows` rows of `cols` (any leading dimensions).
pub(crate) fn expect_f32_matrix(t: &Tensor, role: &str, rows: usize, cols: usize) -> Result<()> {
    ensure!(
        t.dtype() == DType::F32 && matrix(t) == (rows, cols),
        "{role}: expected f32 [{rows}, {cols}], got {:?} {:?}",
        t.dtype(),
        t.shape()
    );
    Ok(())
}

/// `y = x·wᵀ (+ bias)`: x [M, K] f32, w [N, K] bf16 or f32, bias [N] f32, y [M, N] f32.
pub fn matmul_forward(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<()> {
    let ((m, k), (n, wk)) = (matrix(x), matrix(w));
    if wk != k || matrix(y) != (m, n) {
        bail!(
            "matmul_forward: x {:?}, w {:?}, y {:?} do not chain as [M,K]·[N,K]ᵀ = [M,N]",
            x.shape(),
            w.shape(),
            y.shape()
        );
    }
    Gemm::new(x, false, w, true).bias(bias).run(batch, y)
}

/// `dx = dy·w (+ beta·dx)`: dy [M, N], w [N, K] bf16 or f32, dx [M, K] ([`Out::add`] adds to the
/// gradient of another consumer of x).
pub fn matmul_backward_input(batch: &mut Batch, dy: &Tensor, w: &Tensor, dx: Out) -> Result<()> {
    let Out { tensor: dx, beta } = dx;
    let ((m, n), (wn, k)) = (matrix(dy), matrix(w));
    if wn != n || matrix(dx) != (m, k) {
        bail!(
            "matmul_backward_input: dy {:?}, w {:?}, dx {:?} do not chain as [M,N]·[N,K] = [M,K]",
            dy.shape(),
            w.shape(),
            dx.shape()
        );
    }
    Gemm::new(dy, false, w, false).beta(beta).run(batch, dx)
}

/// `dw = dyᵀ·x (+ beta·dw)`: dy [M, N], x [M, K], dw [N, K] f32 ([`Out::add`] accumulates
/// micro-batches).
pub fn matmul_backward_weight(batch: &mut Batch, dy: &Tensor, x: &Tensor, dw: Out) -> Result<()> {
    let Out { tensor: dw, beta } = dw;
    let ((m, n), (xm, k)) = (matrix(dy), matrix(x));
    if xm != m || matrix(dw) != (n, k) {
        bail!(
            "matmul_backward_weight: dy {:?}, x {:?}, dw {:?} do not chain as [M,N]ᵀ·[M,K] = [N,K]",
            dy.shape(),
            x.shape(),
            dw.shape()
        );
    }
    Gemm::new(dy, true, x, false).beta(beta).run(batch, dw)
}

pub mod cpu {
    /// `op(A)·op(B)` with op(A) [m, k] (a stored [k, m] when `trans_a`) and op(B) [k, n] (b stored
    /// [n, k] when `trans_b`).
    pub fn gemm(
        a: &[f64],
        trans_a: bool,
        b: &[f64],
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| {
                        let av = if trans_a { a[l * m + i] } else { a[i * k + l] };
                        let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                        av * bv
                    })
                    .sum();
            }
        }
        c
    }

    /// y [m, n] = x [m, k] · w [n, k]ᵀ + bias.
    pub fn matmul_forward(
        x: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut y = gemm(x, false, w, true, m, n, k);
        if let Some(bias) = bias {
            for row in y.chunks_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        y
    }

    /// dx [m, k] = dy [m, n] · w [n, k].
    pub fn matmul_backward_input(dy: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        gemm(dy, false, w, false, m, k, n)
    }

    /// dw [n, k] = dy [m, n]ᵀ · x [m, k].
    pub fn matmul_backward_weight(dy: &[f64], x: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        gemm(dy, true, x, false, n, k, m)
    }
}

/// `a + beta·b`, elementwise (the reference of a `beta`-accumulating output).
pub(crate) fn plus_scaled(a: &[f64], beta: f64, b: &[f32]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + beta * *y as f64).collect()
}

/// Random weights as the GPU holds them: bf16-rounded values when `bf16`.
pub(crate) fn weight(
    gpu: &Gpu,
    shape: &[usize],
    bf16: bool,
    seed: u64,
    scale: f32,
) -> Result<(Tensor, Vec<f64>)> {
    let values = random(seed, shape.iter().product(), scale);
    Ok(if bf16 {
        (
            Tensor::from_f32_as_bf16(gpu, shape, &values)?,
            to_f64(&round_bf16(&values)),
        )
    } else {
        (Tensor::from_f32(gpu, shape, &values)?, to_f64(&values))
    })
}

/// Runs forward (with bias), backward_input and backward_weight (both accumulating with beta = 1
/// onto random values) at [M, K]·[N, K]ᵀ and compares each with the CPU reference.
pub fn check_matmul(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    w_bf16: bool,
    seed: u64,
) -> Result<Vec<Check>> {
    let xv = random(seed, m * k, 1.0);
    let dyv = random(seed + 1, m * n, 1.0);
    let biasv = random(seed + 2, n, 1.0);
    let dx0 = random(seed + 3, m * k, 1.0);
    let dw0 = random(seed + 4, n * k, 1.0);
    let (w, w64) = weight(gpu, &[n, k], w_bf16, seed + 5, 1.0)?;
    let x = Tensor::from_f32(gpu, &[m, k], &xv)?;
    let dy = Tensor::from_f32(gpu, &[m, n], &dyv)?;
    let bias = Tensor::from_f32(gpu, &[n], &biasv)?;
    let y = Tensor::zeros(gpu, &[m, n], DType::F32)?;
    let dx = Tensor::from_f32(gpu, &[m, k], &dx0)?;
    let dw = Tensor::from_f32(gpu, &[n, k], &dw0)?;
    let mut batch = gpu.batch();
    matmul_forward(&mut batch, &x, &w, Some(&bias), &y)?;
    matmul_backward_input(&mut batch, &dy, &w, Out::add(&dx))?;
    matmul_backward_weight(&mut batch, &dy, &x, Out::add(&dw))?;
    batch.submit();
    let (x64, dy64) = (to_f64(&xv), to_f64(&dyv));
    let shape = format!("{m}x{n}x{k}{}", if w_bf16 { " bf16" } else { "" });
    let tol = 1e-5;
    Ok(vec![
        Check {
            kernel: "matmul_forward".into(),
            shape: shape.clone(),
            max_err: max_error(
                &y.to_f32(gpu)?,
                &cpu::matmul_forward(&x64, &w64, Some(&to_f64(&biasv)), m, n, k),
            ),
            tolerance: tol,
        },
        Check {
            kernel: "matmul_backward_input".into(),
            shape: shape.clone(),
            max_err: max_error(
                &dx.to_f32(gpu)?,
                &plus_scaled(&cpu::matmul_backward_input(&dy64, &w64, m, n, k), 1.0, &dx0),
            ),
            tolerance: tol,
        },
        Check {
            kernel: "matmul_backward_weight".into(),
            shape,
            max_err: max_error(
                &dw.to_f32(gpu)?,
                &plus_scaled(
                    &cpu::matmul_backward_weight(&dy64, &x64, m, n, k),
                    1.0,
                    &dw0,
                ),
            ),
            tolerance: tol,
        },
    ])
}

/// Runs [`Gemm`] with the given transposes, alpha = -0.5 and beta = 2 on random f32 operands, into
/// columns 1.. of a wider C, and compares with the CPU reference.
pub fn check_gemm(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    seed: u64,
) -> Result<Check> {
    let av = random(seed, m * k, 1.0);
    let bv = random(seed + 1, k * n, 1.0);
    let cv = random(seed + 2, m * (n + 1), 1.0);
    let a = Tensor::from_f32(gpu, &if trans_a { [k, m] } else { [m, k] }, &av)?;
    let b = Tensor::from_f32(gpu, &if trans_b { [n, k] } else { [k, n] }, &bv)?;
    let c = Tensor::from_f32(gpu, &[m, n + 1], &cv)?;
    let mut batch = gpu.batch();
    Gemm::new(&a, trans_a, &b, trans_b)
        .alpha(-0.5)
        .beta(2.0)
        .run(&mut batch, Mat::new(&c).cols(1..n + 1))?;
    batch.submit();
    let product = cpu::gemm(&to_f64(&av), trans_a, &to_f64(&bv), trans_b, m, n, k);
    let expected: Vec<f64> = (0..m * (n + 1))
        .map(|e| {
            let (i, j) = (e / (n + 1), e % (n + 1));
            let old = cv[e] as f64;
            if j == 0 {
                old
            } else {
                -0.5 * product[i * n + j - 1] + 2.0 * old
            }
        })
        .collect();
    Ok(Check {
        kernel: format!(
            "gemm {}{}",
            if trans_a { "T" } else { "N" },
            if trans_b { "T" } else { "N" }
        ),
        shape: format!("{m}x{n}x{k}"),
        max_err: max_error(&c.to_f32(gpu)?, &expected),
        tolerance: 1e-5,
    })
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = check_matmul(gpu, 67, 45, 83, true, 1)?;
    checks.extend(check_matmul(gpu, 5, 130, 33, false, 2)?);
    Ok(checks)
}

/// The projections of one decoder layer as (name, N, K) of `y = x·Wᵀ`; k/v and gate/up share
/// shapes and are listed once.
pub fn projections(shape: &ModelShape) -> Vec<(&'static str, usize, usize)> {
    let (hidden, q, kv) = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    vec![
        ("q", q, hidden),
        ("k/v", kv, hidden),
        ("o", hidden, q),
        ("gate/up", shape.intermediate, hidden),
        ("down", hidden, shape.intermediate),
    ]
}

/// A random f32 tensor for benchmarks (values do not matter, only that they are finite).
pub(crate) fn bench_tensor(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let values = random(0, shape.iter().product(), 1.0);
    match dtype {
        DType::BF16 => Tensor::from_f32_as_bf16(gpu, shape, &values),
        _ => Tensor::from_f32(gpu, shape, &values),
    }
}

pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let m = config.seq_len;
    let mut record = |kernel: &str,
                      shape: String,
                      flops: f64,
                      bytes: f64,
                      f: &mut dyn FnMut(&mut Batch) -> Result<()>|
     -> Result<()> {
        let time = time(gpu, config.reps, f)?;
        results.push(BenchResult {
            kernel: kernel.into(),
            shape,
            time,
            flops,
            bytes,
        });
        Ok(())
    };
    for &model in &config.shapes {
        for (name, n, k) in projections(&model) {
            let x = bench_tensor(gpu, &[m, k], DType::F32)?;
            let w = bench_tensor(gpu, &[n, k], DType::BF16)?;
            let y = Tensor::zeros(gpu, &[m, n], DType::F32)?;
            let dw = Tensor::zeros(gpu, &[n, k], DType::F32)?;
            let shape = format!("{} {name} {m}x{n}x{k}", model.name);
            let flops = 2.0 * (m * n * k) as f64;
            let io = |a: usize, b: usize, c: usize| 4.0 * (a + b + c) as f64;
            let bytes = io(m * k, 0, m * n) + 2.0 * (n * k) as f64;
            record("matmul_forward", shape.clone(), flops, bytes, &mut |b| {
                matmul_forward(b, &x, &w, None, &y)
            })?;
            record(
                "matmul_backward_input",
                shape.clone(),
                flops,
                bytes,
                &mut |b| matmul_backward_input(b, &y, &w, Out::write(&x)),
            )?;
            record(
                "matmul_backward_weight",
                shape,
                flops,
                io(m * n, m * k, n * k),
                &mut |b| matmul_backward_weight(b, &y, &x, Out::write(&dw)),
            )?;
        }
    }
    // A square f32 product with the plan's kernel, the tiled one and the naive one; 1024³ on a
    // CPU adapter, where 4096³ takes minutes.
    let s = if gpu.is_cpu() { 1024 } else { 4096 };
    let x = bench_tensor(gpu, &[s, s], DType::F32)?;
    let w = bench_tensor(gpu, &[s, s], DType::F32)?;
    let y = Tensor::zeros(gpu, &[s, s], DType::F32)?;
    let (flops, bytes) = (2.0 * (s * s * s) as f64, 12.0 * (s * s) as f64);
    let gemm = Gemm::new(&x, false, &w, true);
    let plan = gpu.plan.gemm;
    record(
        &format!("gemm {}", plan.name()),
        format!("{s}x{s}x{s}"),
        flops,
        bytes,
        &mut |b| gemm.run(b, &y),
    )?;
    if plan != GemmVariant::Tiled {
        record(
            "gemm tiled",
            format!("{s}x{s}x{s}"),
            flops,
            bytes,
            &mut |b| gemm.run_tiled(b, &y),
        )?;
    }
    record(
        "gemm naive",
        format!("{s}x{s}x{s}"),
        flops,
        bytes,
        &mut |b| gemm.run_naive(b, &y),
    )?;
    Ok(results)
}

/// Decode: `y = x·Wᵀ` for one token (M = 1, bf16 W) at every projection, with the kernel `run`
/// picks (`gemv`) and, for comparison, the tiled one.
pub fn bench_decode(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for &model in &config.shapes {
        for (name, n, k) in projections(&model) {
            let x = bench_tensor(gpu, &[1, k], DType::F32)?;
            let w = bench_tensor(gpu, &[n, k], DType::BF16)?;
            let y = Tensor::zeros(gpu, &[1, n], DType::F32)?;
            let gemm = Gemm::new(&x, false, &w, true);
            for tiled in [false, true] {
                results.push(BenchResult {
                    kernel: format!("matmul_forward decode{}", if tiled { " tiled" } else { "" }),
                    shape: format!("{} {name} 1x{n}x{k}", model.name),
                    time: time(gpu, config.reps, |b| {
                        if tiled {
                            gemm.run_tiled(b, &y)
                        } else {
                            gemm.run(b, &y)
                        }
                    })?,
                    flops: 2.0 * (n * k) as f64,
                    bytes: 4.0 * (k + n) as f64 + 2.0 * (n * k) as f64,
                });
            }
        }
    }
    Ok(results)
}
