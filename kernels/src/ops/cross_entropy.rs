//! The LM head fused with next-token cross-entropy, in vocabulary chunks
//! (`shaders/cross_entropy.wgsl` plus the GEMM of [`super::matmul`]).
//!
//! The [T, V] logits are never materialised. Hidden rows are taken in blocks and the vocabulary in
//! chunks ([`Chunking`]); each (block, chunk) pair computes its logits into one reused temporary
//! of at most `rows × vocab × 4` bytes (64 MiB by default, whatever T and V are). The vocabulary
//! chunk is the outer loop, so that each chunk of the head is read in one stretch per pass: a
//! head paged from host memory ([`HeadRows`]) uploads each chunk once per pass. Every row still
//! meets the chunks in vocabulary order, so the loop order changes no sum.
//! - Forward: per chunk, each row's max and sum of exponentials merge into running values (online
//!   logsumexp) and the target's logit is kept; a final pass turns them into the row logsumexp
//!   (saved for backward) and adds the loss sum and the supervised-token count to two small device
//!   tensors, so a training step can accumulate them over micro-batches and divide once.
//! - Backward recomputes each logits block, turns it in place into
//!   `grad_scale · (softmax - onehot)` and feeds it to two GEMMs: dhidden += dlogits·W_chunk and,
//!   for full fine-tuning, dW_chunk += dlogitsᵀ·hidden_block.
//! - Kept ([`KeptLogits`], where the caller has the memory): the forward writes each block into a
//!   tensor of its own instead of the temporary, and the backward turns those into dlogits without
//!   recomputing them. Each block is shaped as the temporary's block it replaces and meets the same
//!   kernels, so the loss and gradients are the same bits.
//!
//! Besides the temporary, a call keeps 12 bytes per token. Targets >= V (by convention
//! [`IGNORE`]) are not supervised: they add nothing to the loss or count and get zero gradient.
use std::ops::Range;

use anyhow::{ensure, Result};

use super::check::{max_error, random, to_f64, Check};
use super::matmul::{bench_tensor, plus_scaled, weight, Gemm, Mat};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult};
use crate::gpu::{linear_groups, rowwise_groups, Gpu};
use crate::plan::RowwiseVariant;
use crate::shader::{params, Const, Kernel, CROSS_ENTROPY};
use crate::tensor::{row_segments, Chunk, DType, Out, Tensor};

/// The target id of a token that is not supervised (prompt tokens, padding).
pub const IGNORE: u32 = u32::MAX;

params!(
    CROSS_ENTROPY,
    struct Params {
        rows: u32,
        cols: u32,
        ld: u32,
        l_off: u32,
        t0: u32,
        v0: u32,
        vocab: u32,
        first: u32,
        grad_scale: f32,
    }
);

const WG: u32 = 256;

/// Largest vocabulary chunk: `chunk_stats` loops over a chunk row 256 entries per step (one with
/// a thread per row), and llvmpipe ends a shader's loops after 65535 iterations per invocation.
fn max_vocab_chunk(variant: RowwiseVariant) -> usize {
    match variant {
        RowwiseVariant::Workgroup => 1 << 20,
        RowwiseVariant::Thread => 1 << 15,
    }
}

/// A kernel of cross_entropy.wgsl; `chunk_stats` takes a workgroup or a thread per row as
/// `variant` says, the others ignore it.
fn kernel(entry: &'static str, variant: RowwiseVariant) -> Kernel {
    let rows = match entry {
        "chunk_stats" => variant.rows_per_group(),
        _ => 1,
    };
    Kernel::new(&CROSS_ENTROPY, entry).with("ROWS_PER_GROUP", Const::U32(rows))
}

/// How the logits are tiled: blocks of `rows` hidden rows times chunks of `vocab` vocabulary
/// entries, so the temporary holds at most `rows × vocab` f32. The chunk is also capped so that
/// one temporary row fits one storage binding, and at 2^20 entries.
#[derive(Clone, Copy, Debug)]
pub struct Chunking {
    pub rows: usize,
    pub vocab: usize,
}

impl Default for Chunking {
    /// 512 rows × 32768 entries: a 64 MiB temporary, large enough to keep a GPU busy.
    fn default() -> Self {
        Chunking {
            rows: 512,
            vocab: 32768,
        }
    }
}

pub fn variants() -> Vec<Kernel> {
    let mut all: Vec<Kernel> = RowwiseVariant::ALL
        .iter()
        .map(|&variant| kernel("chunk_stats", variant))
        .collect();
    for entry in ["finalize", "softmax_grad"] {
        all.push(kernel(entry, RowwiseVariant::Workgroup));
    }
    all
}

impl Chunking {
    /// The vocabulary chunks of a `vocab`-entry head on `gpu`: of `self.vocab` entries, fewer
    /// where one temporary row would not fit one storage binding, and at most 2^20 (2^15 with a
    /// thread per row).
    pub fn vocab_chunks(&self, gpu: &Gpu, vocab: usize) -> Vec<Range<usize>> {
        let per_binding = (gpu.max_binding_bytes / 4) as usize;
        let cap = max_vocab_chunk(gpu.plan.rowwise);
        let cols = self.vocab.min(vocab).min(per_binding).min(cap);
        ranges(vocab, cols)
    }
}

/// `0..n` in steps of `step`.
fn ranges(n: usize, step: usize) -> Vec<Range<usize>> {
    (0..n)
        .step_by(step)
        .map(move |s| s..(s + step).min(n))
        .collect()
}

/// The LM head's [V, D] matrix (bf16 or f32) as the loss reads it: one vocabulary chunk at a
/// time, each chunk of a pass asked for once and in order. A resident [`Tensor`] is one; a head
/// paged from host memory uploads each chunk into a device slot when asked.
pub trait HeadRows {
    /// (V, D).
    fn vocab_dim(&self) -> (usize, usize);
    fn dtype(&self) -> DType;
    /// The matrix that holds vocabulary rows `rows` (one chunk) for the work recorded next;
    /// `next` is the chunk the caller asks for after it (None at the end of a pass), whose upload a pager may
    /// queue now. A pager may submit the work recorded so far.
    fn chunk(
        &self,
        batch: &mut Batch,
        rows: Range<usize>,
        next: Option<Range<usize>>,
    ) -> Result<Mat<'_>>;
}

impl HeadRows for Tensor {
    fn vocab_dim(&self) -> (usize, usize) {
        (self.rows(), self.row_len())
    }

    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn chunk(&self, _: &mut Batch, rows: Range<usize>, _: Option<Range<usize>>) -> Result<Mat<'_>> {
        Ok(Mat::new(self).rows(rows))
    }
}

/// The row blocks and vocabulary chunks of `tokens` rows under a `vocab`-entry head.
fn tiling(
    gpu: &Gpu,
    tokens: usize,
    vocab: usize,
    chunking: Chunking,
) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    (
        ranges(tokens, chunking.rows.min(tokens)),
        chunking.vocab_chunks(gpu, vocab),
    )
}

/// The shape of a logits block of `rows` rows and `entries` vocabulary entries: rows padded to
/// whole vec4s (4 f32), so that the GEMMs writing and reading the block take the subgroup kernel's
/// aligned variant whatever the chunk's size (the tiny fixtures' vocabulary of 421 ran element by
/// element, a third of their masked loss).
fn block_shape(rows: usize, entries: usize) -> [usize; 2] {
    [rows, entries.next_multiple_of(4)]
}

/// Device bytes of one logits block of `rows` rows and `entries` vocabulary entries (less the
/// tensor's rounding up).
pub fn block_bytes(rows: usize, entries: usize) -> u64 {
    (block_shape(rows, entries).iter().product::<usize>() * 4) as u64
}

/// The loss's logits of every row, kept from the forward for the backward: one f32 tensor per
/// (vocabulary chunk, row block) of the tiling, each shaped as that block. The backward turns
/// them into dlogits in place: one backward per forward.
pub struct KeptLogits {
    /// Chunk `c`'s block `b` at `c * row blocks + b`.
    blocks: Vec<Tensor>,
}

impl KeptLogits {
    /// Zero logits for the rows of `head.hidden` under its head and chunking.
    pub fn new(gpu: &Gpu, head: LmHead) -> Result<KeptLogits> {
        let (vocab, _) = head.w_lm.vocab_dim();
        let (row_blocks, vocab_chunks) = tiling(gpu, head.hidden.rows(), vocab, head.chunking);
        let blocks = vocab_chunks
            .iter()
            .flat_map(|cols| {
                row_blocks
                    .iter()
                    .map(move |rows| block_shape(rows.len(), cols.len()))
            })
            .map(|shape| Tensor::zeros(gpu, &shape, DType::F32))
            .collect::<Result<_>>()?;
        Ok(KeptLogits { blocks })
    }

    /// Hands the tensors to `batch`, which frees them once the work recorded so far has run.
    pub fn release(self, batch: &mut Batch) {
        for block in self.blocks {
            batch.keep(block);
        }
    }

    /// Device bytes `KeptLogits::new` allocates for `tokens` rows and a `vocab`-entry head (less
    /// each tensor's rounding up, and the padding of chunks before the last).
    pub fn bytes(tokens: usize, vocab: usize) -> u64 {
        block_bytes(tokens, vocab)
    }
}

/// One block of the tiling: vocabulary chunk `c`'s entries `cols`, row block `b`'s rows `rows`.
#[derive(Clone, Copy)]
struct BlockAt<'r> {
    c: usize,
    b: usize,
    rows: &'r Range<usize>,
    cols: &'r Range<usize>,
}

/// Shapes of one call, validated.
struct Problem<'a> {
    tokens: usize,
    vocab: usize,
    row_blocks: Vec<Range<usize>>,
    vocab_chunks: Vec<Range<usize>>,
    logits: Logits<'a>,
}

/// Where a call's logits blocks are made.
enum Logits<'a> {
    /// One temporary [block rows, chunk entries], reused by every block.
    Temporary(Tensor),
    Kept(&'a KeptLogits),
}

impl<'a> Problem<'a> {
    fn new(gpu: &Gpu, role: &str, head: &LmHead<'a>) -> Result<Problem<'a>> {
        let LmHead {
            hidden,
            w_lm,
            chunking,
            kept,
        } = *head;
        let (tokens, dim) = (hidden.rows(), hidden.row_len());
        let (vocab, w_dim) = w_lm.vocab_dim();
        ensure!(
            hidden.dtype() == DType::F32,
            "{role}: hidden must be f32, got {:?}",
            hidden.dtype()
        );
        ensure!(
            w_dim == dim,
            "{role}: w_lm [{vocab}, {w_dim}] does not match hidden {:?}",
            hidden.shape()
        );
        ensure!(
            w_lm.dtype() != DType::U32,
            "{role}: w_lm must be bf16 or f32"
        );
        ensure!(
            chunking.rows > 0 && chunking.vocab > 0,
            "{role}: empty chunking {chunking:?}"
        );
        let (row_blocks, vocab_chunks) = tiling(gpu, tokens, vocab, chunking);
        let logits = match kept {
            Some(kept) => {
                ensure!(
                    kept.blocks.len() == row_blocks.len() * vocab_chunks.len(),
                    "{role}: the kept logits were made for another tiling"
                );
                for (i, block) in kept.blocks.iter().enumerate() {
                    let (c, b) = (i / row_blocks.len(), i % row_blocks.len());
                    let shape = block_shape(row_blocks[b].len(), vocab_chunks[c].len());
                    block.expect(
                        &format!("{role}: kept logits of chunk {c}, block {b}"),
                        &shape,
                        Some(DType::F32),
                    )?;
                }
                Logits::Kept(kept)
            }
            None => {
                let shape = block_shape(row_blocks[0].len(), vocab_chunks[0].len());
                Logits::Temporary(Tensor::zeros(gpu, &shape, DType::F32)?)
            }
        };
        Ok(Problem {
            tokens,
            vocab,
            row_blocks,
            vocab_chunks,
            logits,
        })
    }

    /// The tensor that holds the logits of chunk `c`, block `b`: its kept one, or the temporary.
    fn tensor(&self, c: usize, b: usize) -> &Tensor {
        match &self.logits {
            Logits::Kept(kept) => &kept.blocks[c * self.row_blocks.len() + b],
            Logits::Temporary(temporary) => temporary,
        }
    }

    /// Hands the temporary, if any, to `batch` until its work has run.
    fn release(self, batch: &mut Batch) {
        if let Logits::Temporary(temporary) = self.logits {
            batch.keep(temporary);
        }
    }

    /// Each vocabulary chunk with the one after it.
    fn chunks_and_next(
        &self,
    ) -> impl Iterator<Item = (usize, (Range<usize>, Option<Range<usize>>))> + '_ {
        let chunks = &self.vocab_chunks;
        (0..chunks.len()).map(move |c| (c, (chunks[c].clone(), chunks.get(c + 1).cloned())))
    }

    /// The logits of `at` = `hidden[rows]·w_chunkᵀ`, `w_chunk` the head's rows `cols`.
    fn make_logits(
        &self,
        batch: &mut Batch,
        hidden: &Tensor,
        w_chunk: &Mat,
        at: BlockAt,
    ) -> Result<()> {
        Gemm::new(
            Mat::new(hidden).rows(at.rows.clone()),
            false,
            w_chunk.clone(),
            true,
        )
        .run(batch, self.block(at))
    }

    /// The block holding the logits of `at`.
    fn block(&self, at: BlockAt) -> Mat<'_> {
        Mat::new(self.tensor(at.c, at.b))
            .rows(0..at.rows.len())
            .cols(0..at.cols.len())
    }

    /// Dispatches `entry` over the logits block of `at`, one buffer of its tensor at a time,
    /// `groups` giving the workgroups for a segment of that many rows.
    fn over_block(
        &self,
        batch: &mut Batch,
        entry: &'static str,
        at: BlockAt,
        params: Params,
        buffers: &[&Chunk],
        groups: impl Fn(u32) -> [u32; 3],
    ) -> Result<()> {
        let BlockAt { rows, cols, .. } = at;
        let logits = self.tensor(at.c, at.b);
        for seg in row_segments(rows.len(), &[logits]) {
            let first = logits.row(seg.start);
            let params = Params {
                rows: seg.len() as u32,
                cols: cols.len() as u32,
                ld: logits.row_len() as u32,
                l_off: first.offset,
                t0: (rows.start + seg.start) as u32,
                v0: cols.start as u32,
                vocab: self.vocab as u32,
                ..params
            };
            let mut all = vec![first.buffer];
            all.extend_from_slice(buffers);
            batch.dispatch(
                &kernel(entry, batch.gpu.plan.rowwise),
                &params,
                &all,
                groups(seg.len() as u32),
            )?;
        }
        Ok(())
    }
}

/// The loss's logits `hidden·w_lmᵀ` ([T, D] f32 times the LM head [V, D], bf16 or f32), made
/// block by block as `chunking` says: into one temporary block, or (`kept`) into tensors that
/// the backward reads instead of making them again.
#[derive(Clone, Copy)]
pub struct LmHead<'a> {
    pub hidden: &'a Tensor,
    pub w_lm: &'a dyn HeadRows,
    pub chunking: Chunking,
    pub kept: Option<&'a KeptLogits>,
}

/// The single buffer of a small per-token or scalar tensor.
fn whole<'t>(t: &'t Tensor, role: &str, shape: &[usize], dtype: DType) -> Result<&'t Chunk> {
    t.expect(role, shape, Some(dtype))?;
    ensure!(
        t.chunks().len() == 1,
        "{role}: {shape:?} must fit one storage binding"
    );
    Ok(&t.chunks()[0])
}

/// Loss of `hidden` [T, D] f32 under the LM head `w_lm` [V, D] (bf16 or f32) with `targets` [T]
/// u32: writes each row's logsumexp into `lse` [T] f32 (for backward), and adds the summed loss to
/// `loss` [1] f32 and the number of supervised tokens to `count` [1] u32.
pub fn cross_entropy_forward(
    batch: &mut Batch,
    head: LmHead,
    targets: &Tensor,
    lse: &Tensor,
    loss: &Tensor,
    count: &Tensor,
) -> Result<()> {
    let (hidden, w_lm) = (head.hidden, head.w_lm);
    let gpu = batch.gpu;
    let problem = Problem::new(gpu, "cross_entropy_forward", &head)?;
    let tokens = problem.tokens;
    let targets_buf = whole(
        targets,
        "cross_entropy_forward targets",
        &[tokens],
        DType::U32,
    )?;
    let lse_buf = whole(lse, "cross_entropy_forward lse", &[tokens], DType::F32)?;
    let loss_buf = whole(loss, "cross_entropy_forward loss", &[1], DType::F32)?;
    let count_buf = whole(count, "cross_entropy_forward count", &[1], DType::U32)?;
    let sumexp = Tensor::zeros(gpu, &[tokens], DType::F32)?;
    let target_logit = Tensor::zeros(gpu, &[tokens], DType::F32)?;
    let stats_buffers = [
        targets_buf,
        lse_buf,
        &sumexp.chunks()[0],
        &target_logit.chunks()[0],
    ];
    for (c, (cols, next)) in problem.chunks_and_next() {
        let w_chunk = w_lm.chunk(batch, cols.clone(), next)?;
        for (b, rows) in problem.row_blocks.iter().enumerate() {
            let at = BlockAt {
                c,
                b,
                rows,
                cols: &cols,
            };
            problem.make_logits(batch, hidden, &w_chunk, at)?;
            let params = Params {
                first: u32::from(c == 0),
                ..bytemuck::Zeroable::zeroed()
            };
            problem.over_block(batch, "chunk_stats", at, params, &stats_buffers, |n| {
                rowwise_groups(gpu, n as usize)
            })?;
        }
    }
    let params = Params {
        rows: tokens as u32,
        vocab: problem.vocab as u32,
        ..bytemuck::Zeroable::zeroed()
    };
    let buffers = [
        targets_buf,
        lse_buf,
        &sumexp.chunks()[0],
        &target_logit.chunks()[0],
        loss_buf,
        count_buf,
    ];
    batch.dispatch(
        &kernel("finalize", batch.gpu.plan.rowwise),
        &params,
        &buffers,
        [1, 1, 1],
    )?;
    problem.release(batch);
    batch.keep(sumexp);
    batch.keep(target_logit);
    Ok(())
}

/// Gradients of `grad_scale ·` (the summed loss) given forward's `lse`: into `dhidden` [T, D] and,
/// for full fine-tuning, `dw_lm` [V, D] f32. `grad_scale` is 1 / (supervised tokens of the whole
/// optimizer step) for a mean loss. Unsupervised rows get a zero dhidden.
pub fn cross_entropy_backward(
    batch: &mut Batch,
    head: LmHead,
    targets: &Tensor,
    lse: &Tensor,
    grad_scale: f32,
    dhidden: Out,
    dw_lm: Option<Out>,
) -> Result<()> {
    let (hidden, w_lm) = (head.hidden, head.w_lm);
    let gpu = batch.gpu;
    let problem = Problem::new(gpu, "cross_entropy_backward", &head)?;
    let tokens = problem.tokens;
    let targets_buf = whole(
        targets,
        "cross_entropy_backward targets",
        &[tokens],
        DType::U32,
    )?;
    let lse_buf = whole(lse, "cross_entropy_backward lse", &[tokens], DType::F32)?;
    dhidden.tensor.expect(
        "cross_entropy_backward dhidden",
        hidden.shape(),
        Some(DType::F32),
    )?;
    if let Some(dw) = dw_lm {
        let (vocab, dim) = w_lm.vocab_dim();
        dw.tensor.expect(
            "cross_entropy_backward dw_lm",
            &[vocab, dim],
            Some(DType::F32),
        )?;
    }
    let params = Params {
        grad_scale,
        ..bytemuck::Zeroable::zeroed()
    };
    for (c, (cols, next)) in problem.chunks_and_next() {
        let w_chunk = w_lm.chunk(batch, cols.clone(), next)?;
        for (b, rows) in problem.row_blocks.iter().enumerate() {
            let at = BlockAt {
                c,
                b,
                rows,
                cols: &cols,
            };
            if let Logits::Temporary(_) = problem.logits {
                problem.make_logits(batch, hidden, &w_chunk, at)?;
            }
            problem.over_block(
                batch,
                "softmax_grad",
                at,
                params,
                &[targets_buf, lse_buf],
                |n| linear_groups(gpu, (n * cols.len() as u32).div_ceil(WG)),
            )?;
            let dlogits = problem.block(at);
            let beta = if c == 0 { dhidden.beta } else { 1.0 };
            Gemm::new(dlogits.clone(), false, w_chunk.clone(), false)
                .beta(beta)
                .run(batch, Mat::new(dhidden.tensor).rows(rows.clone()))?;
            if let Some(dw) = dw_lm {
                let beta = if b == 0 { dw.beta } else { 1.0 };
                Gemm::new(dlogits, true, Mat::new(hidden).rows(rows.clone()), false)
                    .beta(beta)
                    .run(batch, Mat::new(dw.tensor).rows(cols.clone()))?;
            }
        }
    }
    problem.release(batch);
    Ok(())
}

pub mod cpu {
    use super::IGNORE;

    fn logits_row(hidden: &[f64], w: &[f64], t: usize, vocab: usize, dim: usize) -> Vec<f64> {
        let h = &hidden[t * dim..(t + 1) * dim];
        (0..vocab)
            .map(|v| {
                w[v * dim..(v + 1) * dim]
                    .iter()
                    .zip(h)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    }

    fn logsumexp(z: &[f64]) -> f64 {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    fn supervised(target: u32, vocab: usize) -> bool {
        target != IGNORE && (target as usize) < vocab
    }

    /// (summed loss, supervised count, per-row logsumexp) of hidden [T, D] under w [V, D].
    pub fn cross_entropy_forward(
        hidden: &[f64],
        w: &[f64],
        targets: &[u32],
        vocab: usize,
        dim: usize,
    ) -> (f64, u32, Vec<f64>) {
        let (mut loss, mut count, mut lse) = (0.0, 0, Vec::new());
        for (t, &target) in targets.iter().enumerate() {
            let z = logits_row(hidden, w, t, vocab, dim);
            let l = logsumexp(&z);
            if supervised(target, vocab) {
                loss += l - z[target as usize];
                count += 1;
            }
            lse.push(l);
        }
        (loss, count, lse)
    }

    /// (dhidden, dw) of grad_scale · the summed loss.
    pub fn cross_entropy_backward(
        hidden: &[f64],
        w: &[f64],
        targets: &[u32],
        vocab: usize,
        dim: usize,
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut dh = vec![0.0; hidden.len()];
        let mut dw = vec![0.0; w.len()];
        for (t, &target) in targets.iter().enumerate() {
            if !supervised(target, vocab) {
                continue;
            }
            let z = logits_row(hidden, w, t, vocab, dim);
            let l = logsumexp(&z);
            for v in 0..vocab {
                let g = grad_scale * ((z[v] - l).exp() - f64::from(v == target as usize));
                for d in 0..dim {
                    dh[t * dim + d] += g * w[v * dim + d];
                    dw[v * dim + d] += g * hidden[t * dim + d];
                }
            }
        }
        (dh, dw)
    }
}

/// Random targets in 0..vocab with every third token ignored (and the first supervised).
pub fn random_targets(seed: u64, tokens: usize, vocab: usize) -> Vec<u32> {
    random(seed, tokens, 1.0)
        .iter()
        .enumerate()
        .map(|(t, x)| {
            if t % 3 == 2 {
                IGNORE
            } else {
                ((x.abs() * vocab as f32) as u32).min(vocab as u32 - 1)
            }
        })
        .collect()
}

/// One test problem: `tokens` hidden rows of `dim` features, a `vocab`-entry LM head (bf16 or f32),
/// and whether backward also produces dw_lm (full fine-tuning).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub tokens: usize,
    pub vocab: usize,
    pub dim: usize,
    pub w_bf16: bool,
    pub dw_lm: bool,
    pub chunking: Chunking,
}

/// Forward (accumulating onto a non-zero loss and count) and backward (gradients accumulating
/// onto random values) on random inputs against the CPU reference.
pub fn check_cross_entropy(gpu: &Gpu, case: Case, seed: u64) -> Result<Vec<Check>> {
    let Case {
        tokens,
        vocab,
        dim,
        w_bf16,
        dw_lm,
        chunking,
    } = case;
    let hv = random(seed, tokens * dim, 1.0);
    let (w, w64) = weight(gpu, &[vocab, dim], w_bf16, seed + 1, 1.0)?;
    let tv = random_targets(seed + 2, tokens, vocab);
    let dh0 = random(seed + 3, tokens * dim, 1.0);
    let hidden = Tensor::from_f32(gpu, &[tokens, dim], &hv)?;
    let targets = Tensor::from_u32(gpu, &[tokens], &tv)?;
    let lse = Tensor::zeros(gpu, &[tokens], DType::F32)?;
    let loss = Tensor::from_f32(gpu, &[1], &[1.5])?;
    let count = Tensor::from_u32(gpu, &[1], &[3])?;
    let dhidden = Tensor::from_f32(gpu, &[tokens, dim], &dh0)?;
    let dw0 = if dw_lm {
        random(seed + 4, vocab * dim, 1.0)
    } else {
        Vec::new()
    };
    let dw = if dw_lm {
        Some(Tensor::from_f32(gpu, &[vocab, dim], &dw0)?)
    } else {
        None
    };
    let grad_scale = 0.5;
    let mut batch = gpu.batch();
    let head = LmHead {
        hidden: &hidden,
        w_lm: &w,
        chunking,
        kept: None,
    };
    cross_entropy_forward(&mut batch, head, &targets, &lse, &loss, &count)?;
    let dhidden_grad = Out::add(&dhidden);
    let dw_grad = dw.as_ref().map(Out::add);
    cross_entropy_backward(
        &mut batch,
        head,
        &targets,
        &lse,
        grad_scale,
        dhidden_grad,
        dw_grad,
    )?;
    batch.submit();
    let h64 = to_f64(&hv);
    let (loss_ref, count_ref, lse_ref) = cpu::cross_entropy_forward(&h64, &w64, &tv, vocab, dim);
    let (dh_ref, dw_ref) =
        cpu::cross_entropy_backward(&h64, &w64, &tv, vocab, dim, grad_scale as f64);
    let shape = format!(
        "T{tokens} V{vocab} D{dim}{}",
        if w_bf16 { " bf16" } else { "" }
    );
    let check = |kernel: &str, values: Vec<f32>, reference: Vec<f64>, tolerance: f64| Check {
        kernel: kernel.into(),
        shape: shape.clone(),
        max_err: max_error(&values, &reference),
        tolerance,
    };
    let gpu_count = count.to_u32(gpu)?[0] as f32;
    let mut checks = vec![
        check(
            "cross_entropy_forward loss",
            loss.to_f32(gpu)?,
            vec![1.5 + loss_ref],
            1e-5,
        ),
        check(
            "cross_entropy_forward count",
            vec![gpu_count],
            vec![3.0 + count_ref as f64],
            0.0,
        ),
        check("cross_entropy_forward lse", lse.to_f32(gpu)?, lse_ref, 1e-5),
        check(
            "cross_entropy_backward dhidden",
            dhidden.to_f32(gpu)?,
            plus_scaled(&dh_ref, 1.0, &dh0),
            1e-5,
        ),
    ];
    if let Some(dw) = dw {
        checks.push(check(
            "cross_entropy_backward dw_lm",
            dw.to_f32(gpu)?,
            plus_scaled(&dw_ref, 1.0, &dw0),
            1e-5,
        ));
    }
    Ok(checks)
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let case = Case {
        tokens: 19,
        vocab: 1000,
        dim: 40,
        w_bf16: true,
        dw_lm: true,
        chunking: Chunking {
            rows: 8,
            vocab: 300,
        },
    };
    check_cross_entropy(gpu, case, 1)
}

/// Forward, backward without dw_lm (LoRA: a frozen head) and with it (full fine-tuning).
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let tokens = config.seq_len;
    let mut results = Vec::new();
    for &model in &config.shapes {
        let (vocab, dim) = (model.vocab, model.hidden);
        let hidden = bench_tensor(gpu, &[tokens, dim], DType::F32)?;
        let w = bench_tensor(gpu, &[vocab, dim], DType::BF16)?;
        let targets = Tensor::from_u32(gpu, &[tokens], &random_targets(0, tokens, vocab))?;
        let lse = Tensor::zeros(gpu, &[tokens], DType::F32)?;
        let loss = Tensor::zeros(gpu, &[1], DType::F32)?;
        let count = Tensor::zeros(gpu, &[1], DType::U32)?;
        let dhidden = Tensor::zeros(gpu, &[tokens, dim], DType::F32)?;
        let dw = Tensor::zeros(gpu, &[vocab, dim], DType::F32)?;
        let head = LmHead {
            hidden: &hidden,
            w_lm: &w,
            chunking: Chunking::default(),
            kept: None,
        };
        let shape = format!("{} T{tokens} V{vocab} D{dim}", model.name);
        let gemm_flops = 2.0 * (tokens * vocab * dim) as f64;
        let bytes = 2.0 * (vocab * dim) as f64 + 4.0 * (tokens * dim) as f64;
        let forward = time(gpu, config.reps, |batch| {
            cross_entropy_forward(batch, head, &targets, &lse, &loss, &count)
        })?;
        results.push(BenchResult {
            kernel: "cross_entropy_forward".into(),
            shape: shape.clone(),
            time: forward,
            flops: gemm_flops,
            bytes,
        });
        let dh = Out::write(&dhidden);
        for (kernel, dw_lm, gemms) in [
            ("cross_entropy_backward", None, 2.0),
            ("cross_entropy_backward +dw_lm", Some(Out::write(&dw)), 3.0),
        ] {
            let t = time(gpu, config.reps, |batch| {
                cross_entropy_backward(batch, head, &targets, &lse, 1.0, dh, dw_lm)
            })?;
            results.push(BenchResult {
                kernel: kernel.into(),
                shape: shape.clone(),
                time: t,
                flops: gemms * gemm_flops,
                bytes,
            });
        }
    }
    Ok(results)
}
