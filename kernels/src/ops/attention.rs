//! Causal grouped-query flash attention (`shaders/attention.wgsl`), f32.
//!
//! Activations are [B * T, H * D] (B sequences of T rows stacked; a row holds one token's heads side
//! by side): q and out [B * tq, hq * D], k and v [B * tk, hkv * D], lse [B * tq, hq]. Query head h
//! reads kv head h / (hq / hkv). Query i of a sequence sits at position tk - tq + i and sees keys
//! 0..=tk - tq + i, so tq = tk is training / prefill and tq < tk extends a KV cache. With
//! [`KeyLens`] each sequence has its own key count in place of tk (the slots of a batched KV cache
//! decoded together), read by the forward kernels from a u32 [B] buffer.
//!
//! - Forward, blocked: a workgroup takes 64 queries of one head and streams 64-key tiles through
//!   workgroup memory with an online softmax; scores, probabilities and the output accumulators
//!   live in registers (4 x 4 score and 4 x D/16 output elements per thread). It saves only out and
//!   the row log-sum-exp.
//! - Head sizes: any even D in [`HEAD_DIMS`], padded with zeros inside the kernels; the [rows,
//!   H * D] bindings are vec4s, or vec2s when D % 4 = 2 (docs/architecture.md, Attention).
//! - Forward, split keys (decode, small tq): a workgroup takes the G query heads of one kv head for
//!   every query of the dispatch (16 rows), so each key is loaded once per group, and the grid
//!   splits the keys so that even one token fills the GPU; partial (out, lse) per split go to a
//!   scratch buffer that `attn_merge` combines.
//! - Backward: drow = rowsum(dout * out); one kernel per query block recomputes the probabilities
//!   and forms dq, one per 64-key block loops over the G query heads and every query tile that sees
//!   its keys to form dk and dv. No atomics: each output element has one writer, so results are
//!   deterministic. dq, dk and dv are overwritten, not accumulated into.
//! - Variants ([`Gpu::plan`]): `tiled` is the design above; `rows` (CPU adapters without subgroups)
//!   swaps the forward (training, split-key and ragged) for `attn_fwd_rows`, a few query rows per
//!   invocation with no workgroup memory and no barriers, and keeps the tiled backward; `subgroup`
//!   (CPU adapters with subgroups of 8, shaders/attention_subgroup.wgsl) runs the forward and both
//!   backward kernels with one row per lane and the other side's rows shared by broadcasts
//!   (docs/architecture.md).
//!
//! Split tensors: query-row tensors (q, out, lse, dout, dq) are walked by row segments; when k/v are
//! split, the forward runs once per k/v chunk and folds each later chunk into out/lse with the
//! saved lse (out = out1 e^(lse1 - lse) + out2 e^(lse2 - lse)), dq adds later chunks' terms, and dk /
//! dv add the terms of later q chunks.
use std::ops::{Range, RangeInclusive};

use anyhow::{bail, Result};

use super::check::{max_error, random, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{BenchConfig, BenchResult};
use crate::gpu::{linear_groups, Gpu, GpuOptions};
use crate::plan::AttentionVariant;
use crate::shader::{params, Const, Kernel, Shader, ATTENTION, ATTENTION_SUBGROUP};
use crate::tensor::{row_segments, Chunk, DType, Tensor};

params!(
    ATTENTION,
    struct Params {
        tq: u32,
        tk: u32,
        hq: u32,
        hkv: u32,
        b0: u32,
        i_lo: u32,
        i_hi: u32,
        key_lo: u32,
        key_hi: u32,
        kv_cap: u32,
        q_row0: u32,
        kv_row0: u32,
        q_off: u32,
        out_off: u32,
        lse_off: u32,
        dout_off: u32,
        drow_off: u32,
        dq_off: u32,
        k_off: u32,
        v_off: u32,
        dk_off: u32,
        dv_off: u32,
        out_row0: u32,
        out_split_stride: u32,
        lse_split_stride: u32,
        split_keys: u32,
        split_first: u32,
        row_blocks: u32,
        n_splits: u32,
        n: u32,
        scale: f32,
        _pad: u32,
    }
);

/// Queries per workgroup of the blocked kernels, keys per tile, rows per decode workgroup.
const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 64;
const DECODE_ROWS: usize = 16;
/// The split-key forward runs when a kv head's query rows (G * tq) fill at most this many rows.
const DECODE_MAX_ROWS: usize = 64;
/// Workgroups the split-key forward aims for: enough to fill a large GPU with one token.
const DECODE_TARGET_GROUPS: usize = 512;
/// Upper bound of the split-key scratch (partial outputs of every split).
const DECODE_SCRATCH_BYTES: u64 = 64 << 20;
const WG: u32 = 256;
/// Invocations per workgroup of the rows variant (its kernels' `@workgroup_size`): two SIMD
/// groups on llvmpipe, which runs each workgroup on one thread, so that a small model's few
/// query rows (256 per kv head at T = 128 in the tiny test models) still make several
/// workgroups for the CPU's threads to share.
const LANES: usize = 16;

/// Query rows each invocation of the rows forward owns: several share each loaded key row, as
/// many as keep the registers (two heads per row) within what spills cheaply; one when decoding,
/// where the few rows are better spread over lanes.
fn lane_rows(head_dim: usize, decode: bool) -> usize {
    match head_dim {
        _ if decode => 1,
        0..=64 => 4,
        65..=128 => 2,
        _ => 1,
    }
}

/// Keys the rows and subgroup kernels take: they loop once per key (or query), and llvmpipe ends a
/// loop after 65535 iterations.
const ROWS_MAX_KEYS: usize = 65535;

/// Lanes (= query rows) of a workgroup of the subgroup kernels (their `SG_LANES`), one subgroup.
const SUBGROUP_LANES: usize = 8;

/// Query rows one workgroup of the rows or subgroup forward (or subgroup dq) covers.
fn rows_per_group(variant: AttentionVariant, head_dim: usize, decode: bool) -> usize {
    match variant {
        AttentionVariant::Subgroup => SUBGROUP_LANES,
        _ => LANES * lane_rows(head_dim, decode),
    }
}

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// Sequences B.
    pub batch_size: usize,
    /// Queries per sequence.
    pub tq: usize,
    /// Keys per sequence (>= tq).
    pub tk: usize,
    pub hq: usize,
    pub hkv: usize,
    /// Any even size in [`HEAD_DIMS`].
    pub head_dim: usize,
    /// Softmax scale, 1 / sqrt(head_dim) for Qwen2.
    pub scale: f32,
}

impl AttentionDims {
    fn validate(&self) -> Result<()> {
        let d = self;
        if d.batch_size == 0 || d.tq == 0 || d.tk < d.tq {
            bail!("attention: need B >= 1 and 1 <= tq <= tk, got {d:?}");
        }
        if d.hq == 0 || d.hkv == 0 || !d.hq.is_multiple_of(d.hkv) {
            bail!("attention: hq must be a positive multiple of hkv, got {d:?}");
        }
        check_head_dim(d.head_dim)
    }

    fn group(&self) -> usize {
        self.hq / self.hkv
    }

    fn label(&self) -> String {
        let d = self;
        format!(
            "B{} tq{} tk{} h{}/{} D{}",
            d.batch_size, d.tq, d.tk, d.hq, d.hkv, d.head_dim
        )
    }
}

/// Head sizes the kernels take (even ones only). Registers and workgroup memory hold a head padded
/// to a multiple of 64: a size costs what the next multiple of 64 does.
pub const HEAD_DIMS: RangeInclusive<usize> = 8..=256;

/// Whether the kernels take heads of `head_dim` elements: even, in [`HEAD_DIMS`].
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if !HEAD_DIMS.contains(&head_dim) || !head_dim.is_multiple_of(2) {
        bail!(
            "attention: head_dim must be even and in {}..={}, got {head_dim}",
            HEAD_DIMS.start(),
            HEAD_DIMS.end()
        );
    }
    Ok(())
}

/// Elements of the kernels' [rows, H * D] bindings: vec4 when D allows, else vec2 (D is even).
fn element_width(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(4) {
        4
    } else {
        2
    }
}

/// Per-sequence key counts of a batched KV cache: sequence b's queries are the last tq of its
/// `lens[b]` keys, so query i sees keys 0..lens[b] - tq + i (inclusive). `AttentionDims::tk` is then
/// the longest (it sizes the key splits and bounds the keys read).
#[derive(Clone, Copy)]
pub struct KeyLens<'a> {
    /// u32 [B], each in tq..=tk. Not read back: a count outside that range gives wrong results
    /// (never an out-of-bounds read).
    pub lens: &'a Tensor,
    /// Rows of k / v per sequence (>= tk): sequence b's keys start at row b * capacity. k / v may
    /// hold more rows than B * capacity (slots past the B sequences of this call).
    pub capacity: usize,
}

/// Which forward kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardPath {
    /// Split keys when the query rows per kv head are few (decode), blocked otherwise.
    Auto,
    Blocked,
    SplitKeys,
}

fn kernel(
    shader: &'static Shader,
    entry: &'static str,
    head_dim: usize,
    decode: bool,
    ragged: bool,
) -> Kernel {
    let width = element_width(head_dim);
    let element = if width == 4 { "vec4<f32>" } else { "vec2<f32>" };
    Kernel::new(shader, entry)
        .with("HEAD_DIM", Const::U32(head_dim as u32))
        .with("EW", Const::U32(width as u32))
        .with("EL", Const::Type(element))
        .with("DECODE", Const::Bool(decode))
        .with("RAGGED", Const::Bool(ragged))
        .with("LANES", Const::U32(LANES as u32))
        .with("LANE_ROWS", Const::U32(lane_rows(head_dim, decode) as u32))
}

/// The forward kernel of `variant`.
fn forward_kernel(
    variant: AttentionVariant,
    head_dim: usize,
    decode: bool,
    ragged: bool,
) -> Kernel {
    let (shader, entry) = match variant {
        AttentionVariant::Tiled => (&ATTENTION, "attn_fwd"),
        AttentionVariant::Rows => (&ATTENTION, "attn_fwd_rows"),
        AttentionVariant::Subgroup => (&ATTENTION_SUBGROUP, "attn_fwd_sg"),
    };
    kernel(shader, entry, head_dim, decode, ragged)
}

/// The dq and the dk / dv kernels of `variant` (the rows variant keeps the tiled ones: rows
/// backward kernels measured slower on lavapipe, docs/benchmarks.md).
fn backward_kernels(variant: AttentionVariant, head_dim: usize) -> [Kernel; 2] {
    let (shader, entries) = match variant {
        AttentionVariant::Tiled | AttentionVariant::Rows => {
            (&ATTENTION, ["attn_bwd_dq", "attn_bwd_dkv"])
        }
        AttentionVariant::Subgroup => (&ATTENTION_SUBGROUP, ["attn_bwd_dq_sg", "attn_bwd_dkv_sg"]),
    };
    entries.map(|entry| kernel(shader, entry, head_dim, false, false))
}

/// Kernels every variant shares (attention.wgsl).
fn shared_kernel(entry: &'static str, head_dim: usize) -> Kernel {
    kernel(&ATTENTION, entry, head_dim, false, false)
}

pub fn variants() -> Vec<Kernel> {
    let mut all = Vec::new();
    // The fast sizes, then one of each layout: vec2 elements (10, 250), padded to 64 (16) or 128
    // (80), fewer queries per dk / dv slice (176), fewer keys per value slice too (250, 256).
    for d in [64, 128, 10, 16, 80, 176, 250, 256] {
        for &variant in AttentionVariant::ALL {
            for (decode, ragged) in [(false, false), (true, false), (false, true), (true, true)] {
                all.push(forward_kernel(variant, d, decode, ragged));
            }
            if variant != AttentionVariant::Rows {
                all.extend(backward_kernels(variant, d));
            }
        }
        for entry in ["attn_merge", "attn_bwd_prep"] {
            all.push(shared_kernel(entry, d));
        }
    }
    all
}

/// Rows of a row segment as a run of sequences b0..b0 + count that each contribute rows lo..hi.
#[derive(Clone, Copy, Debug)]
struct Piece {
    b0: usize,
    count: usize,
    lo: usize,
    hi: usize,
    /// Global row where the segment (and the chunks' offsets) starts.
    row0: usize,
}

/// The pieces of `segments` (row ranges of batch_size * stride rows) restricted to the first `len`
/// rows of each sequence.
fn pieces(segments: &[Range<usize>], batch_size: usize, stride: usize, len: usize) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for seg in segments {
        for b in seg.start / stride..=((seg.end - 1) / stride).min(batch_size - 1) {
            let lo = seg.start.max(b * stride) - b * stride;
            let hi = (seg.end - b * stride).min(len);
            if lo >= hi {
                continue;
            }
            match out.last_mut() {
                Some(last)
                    if last.row0 == seg.start
                        && (last.lo, last.hi) == (lo, hi)
                        && last.b0 + last.count == b =>
                {
                    last.count += 1
                }
                _ => out.push(Piece {
                    b0: b,
                    count: 1,
                    lo,
                    hi,
                    row0: seg.start,
                }),
            }
        }
    }
    out
}

/// The sequences two pieces share, as (first, count).
fn overlap(a: &Piece, b: &Piece) -> Option<(usize, usize)> {
    let first = a.b0.max(b.b0);
    let end = (a.b0 + a.count).min(b.b0 + b.count);
    (first < end).then(|| (first, end - first))
}

/// Offset of `row` inside its chunk in binding elements ([rows, H * D] tensors).
fn element_offset(t: &Tensor, row: usize, head_dim: usize) -> u32 {
    t.row(row).offset / element_width(head_dim) as u32
}

fn dims_params(dims: &AttentionDims, kv_cap: usize, qp: &Piece, kp: &Piece, b0: usize) -> Params {
    Params {
        tq: dims.tq as u32,
        tk: dims.tk as u32,
        hq: dims.hq as u32,
        hkv: dims.hkv as u32,
        b0: b0 as u32,
        i_lo: qp.lo as u32,
        i_hi: qp.hi as u32,
        key_lo: kp.lo as u32,
        key_hi: kp.hi as u32,
        kv_cap: kv_cap as u32,
        q_row0: qp.row0 as u32,
        kv_row0: kp.row0 as u32,
        out_row0: qp.row0 as u32,
        scale: dims.scale,
        ..bytemuck::Zeroable::zeroed()
    }
}

fn expect_f32(role: &str, t: &Tensor, rows: usize, cols: usize) -> Result<()> {
    t.expect(role, &[rows, cols], Some(DType::F32))
}

/// Queries [B * tq, hq * D], keys and values [B * tk (or B * cap), hkv * D] (f32) of one attention
/// call, or, in [`attention_backward`], their gradients.
#[derive(Clone, Copy)]
pub struct Qkv<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

impl<'a> Qkv<'a> {
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Qkv { q, k, v }
    }
}

/// Checks q / out / lse / k / v (and the key counts) and returns the rows per sequence of k and v
/// (>= tk).
fn check_forward_shapes(
    dims: &AttentionDims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    keys: Option<&KeyLens>,
) -> Result<usize> {
    dims.validate()?;
    let (b, d) = (dims.batch_size, dims.head_dim);
    expect_f32("attention q", q, b * dims.tq, dims.hq * d)?;
    expect_f32("attention out", out, b * dims.tq, dims.hq * d)?;
    expect_f32("attention lse", lse, b * dims.tq, dims.hq)?;
    let kv_rows = k.shape().first().copied().unwrap_or(0);
    let kv_cap = match keys {
        Some(keys) => {
            keys.lens
                .expect("attention key lengths", &[b], Some(DType::U32))?;
            if keys.lens.chunks().len() > 1 {
                bail!("attention key lengths: {b} counts do not fit one storage binding");
            }
            keys.capacity
        }
        None => kv_rows / b,
    };
    if kv_cap < dims.tk || kv_rows < b * kv_cap {
        bail!(
            "attention k: {:?} does not hold {b} sequences of at least {} keys",
            k.shape(),
            dims.tk
        );
    }
    let kv_rows = if keys.is_some() { kv_rows } else { b * kv_cap };
    expect_f32("attention k", k, kv_rows, dims.hkv * d)?;
    expect_f32("attention v", v, kv_rows, dims.hkv * d)?;
    Ok(kv_cap)
}

/// Causal attention forward: out = softmax(scale q k^T) v per query head, and lse, the natural log
/// of each row's softmax denominator (with the scaled scores), which the backward needs. k / v may
/// hold more rows per sequence than tk (a KV cache with spare capacity: [B * cap, hkv * D]); only
/// the first tk are read. Small tq takes the split-key path, which allocates a scratch buffer of
/// the splits' partial results.
pub fn attention_forward(
    batch: &mut Batch,
    qkv: Qkv,
    out: &Tensor,
    lse: &Tensor,
    dims: AttentionDims,
) -> Result<()> {
    attention_forward_with(batch, qkv, out, lse, dims, None, ForwardPath::Auto)
}

/// [`attention_forward`] over sequences with their own key counts (`keys`): B slots of a batched
/// KV cache, each of its own length, decoded or extended together in one launch.
pub fn attention_forward_ragged(
    batch: &mut Batch,
    qkv: Qkv,
    out: &Tensor,
    lse: &Tensor,
    dims: AttentionDims,
    keys: KeyLens,
) -> Result<()> {
    attention_forward_with(batch, qkv, out, lse, dims, Some(keys), ForwardPath::Auto)
}

/// [`attention_forward`] or [`attention_forward_ragged`] with the kernel chosen by the caller
/// (tests run both on every shape).
pub fn attention_forward_with(
    batch: &mut Batch,
    qkv: Qkv,
    out: &Tensor,
    lse: &Tensor,
    dims: AttentionDims,
    keys: Option<KeyLens>,
    path: ForwardPath,
) -> Result<()> {
    let Qkv { q, k, v } = qkv;
    let kv_cap = check_forward_shapes(&dims, q, k, v, out, lse, keys.as_ref())?;
    let pieces = ForwardPieces {
        q: pieces(
            &row_segments(dims.batch_size * dims.tq, &[q, out, lse]),
            dims.batch_size,
            dims.tq,
            dims.tq,
        ),
        kv: pieces(
            &row_segments(dims.batch_size * kv_cap, &[k, v]),
            dims.batch_size,
            kv_cap,
            dims.tk,
        ),
    };
    let variant = batch.gpu.plan.attention;
    check_loop_keys(variant, &dims)?;
    if decode_path(&dims, path) {
        if let Some(split_keys) = decode_split_keys(batch.gpu, &dims, variant) {
            let tensors = [q, k, v, out, lse];
            return forward_split_keys(
                batch,
                tensors,
                keys.map(|keys| keys.lens),
                &dims,
                kv_cap,
                &pieces,
                split_keys,
            );
        }
        if path == ForwardPath::SplitKeys {
            bail!(
                "attention: the split-key scratch for {} does not fit one binding",
                dims.label()
            );
        }
    }
    let d = dims.head_dim;
    let fwd = forward_kernel(variant, d, false, keys.is_some());
    // Key chunks in order, so that each sequence's first keys are written before later ones merge.
    for kp in &pieces.kv {
        for qp in &pieces.q {
            let Some((b0, count)) = overlap(qp, kp) else {
                continue;
            };
            let (row_blocks, groups) = query_groups(&dims, variant, qp, count);
            let params = Params {
                q_off: element_offset(q, qp.row0, d),
                out_off: element_offset(out, qp.row0, d),
                lse_off: lse.row(qp.row0).offset,
                k_off: element_offset(k, kp.row0, d),
                v_off: element_offset(v, kp.row0, d),
                row_blocks,
                ..dims_params(&dims, kv_cap, qp, kp, b0)
            };
            let buffers = [
                q.row(qp.row0).buffer,
                k.row(kp.row0).buffer,
                v.row(kp.row0).buffer,
                out.row(qp.row0).buffer,
                lse.row(qp.row0).buffer,
                key_lens_buffer(keys.map(|keys| keys.lens), q, qp),
            ];
            batch.dispatch(&fwd, &params, &buffers, groups)?;
        }
    }
    Ok(())
}

/// Refuses more keys than the rows and subgroup kernels' loops take, with the way out.
fn check_loop_keys(variant: AttentionVariant, dims: &AttentionDims) -> Result<()> {
    if variant != AttentionVariant::Tiled && dims.tk > ROWS_MAX_KEYS {
        bail!(
            "attention: {} has more than the {ROWS_MAX_KEYS} keys the {} kernels take \
             (WGTRAIN_KERNELS=attention=tiled runs the tiled ones)",
            dims.label(),
            variant.name()
        );
    }
    Ok(())
}

/// The row blocks per kv head (Params::row_blocks) of the rows and subgroup kernels over the
/// query rows of `qp`, and their grid for `count` sequences.
fn row_block_groups(
    dims: &AttentionDims,
    variant: AttentionVariant,
    qp: &Piece,
    count: usize,
) -> (u32, [u32; 3]) {
    let rows = dims.group() * (qp.hi - qp.lo);
    let row_blocks = rows.div_ceil(rows_per_group(variant, dims.head_dim, false));
    (
        row_blocks as u32,
        [1, (dims.hkv * row_blocks) as u32, count as u32],
    )
}

/// The grid of the forward without split keys over the query rows of `qp` for `count`
/// sequences, and the row blocks per kv head (Params::row_blocks) of the rows and subgroup
/// variants.
fn query_groups(
    dims: &AttentionDims,
    variant: AttentionVariant,
    qp: &Piece,
    count: usize,
) -> (u32, [u32; 3]) {
    let nq = qp.hi - qp.lo;
    match variant {
        AttentionVariant::Tiled => (
            0,
            [nq.div_ceil(BLOCK_Q) as u32, dims.hq as u32, count as u32],
        ),
        AttentionVariant::Rows | AttentionVariant::Subgroup => {
            row_block_groups(dims, variant, qp, count)
        }
    }
}

/// Rows per workgroup of the split-key forward.
fn decode_rows(head_dim: usize, variant: AttentionVariant) -> usize {
    match variant {
        AttentionVariant::Tiled => DECODE_ROWS,
        AttentionVariant::Rows | AttentionVariant::Subgroup => {
            rows_per_group(variant, head_dim, true)
        }
    }
}

/// The buffer bound to `key_lens`: the counts, or (not RAGGED) q's chunk, never read — naga counts
/// a binding under a const-false branch as used. Counts are one binding (4 bytes per sequence).
fn key_lens_buffer<'t>(lens: Option<&'t Tensor>, q: &'t Tensor, qp: &Piece) -> &'t Chunk {
    lens.map_or(q.row(qp.row0).buffer, |lens| &lens.chunks()[0])
}

/// Whether `path` asks for the split-key forward.
fn decode_path(dims: &AttentionDims, path: ForwardPath) -> bool {
    match path {
        ForwardPath::Auto => dims.group() * dims.tq <= DECODE_MAX_ROWS,
        ForwardPath::Blocked => false,
        ForwardPath::SplitKeys => true,
    }
}

/// Keys per split of the split-key forward: enough splits to reach DECODE_TARGET_GROUPS
/// workgroups, whole key tiles each, the scratch within one binding. None if even one split's
/// scratch is too large.
fn decode_split_keys(gpu: &Gpu, dims: &AttentionDims, variant: AttentionVariant) -> Option<usize> {
    let row_blocks = (dims.group() * dims.tq).div_ceil(decode_rows(dims.head_dim, variant));
    let groups_per_split = dims.batch_size * dims.hkv * row_blocks;
    let wanted = DECODE_TARGET_GROUPS.div_ceil(groups_per_split).max(1);
    let split_bytes = (dims.batch_size * dims.tq * dims.hq * (dims.head_dim + 1) * 4) as u64;
    let limit = DECODE_SCRATCH_BYTES.min(gpu.limits.max_storage_buffer_binding_size);
    let max_splits = (limit / split_bytes) as usize;
    if max_splits == 0 {
        return None;
    }
    let splits = wanted.min(max_splits);
    Some(dims.tk.div_ceil(splits).next_multiple_of(BLOCK_K))
}

/// The pieces of a forward's query rows (q, out, lse) and key rows (k, v), each within one chunk.
struct ForwardPieces {
    q: Vec<Piece>,
    kv: Vec<Piece>,
}

fn forward_split_keys(
    batch: &mut Batch,
    [q, k, v, out, lse]: [&Tensor; 5],
    key_lens: Option<&Tensor>,
    dims: &AttentionDims,
    kv_cap: usize,
    pieces: &ForwardPieces,
    split_keys: usize,
) -> Result<()> {
    let variant = batch.gpu.plan.attention;
    let (d, rows) = (dims.head_dim, dims.batch_size * dims.tq);
    let n_splits = dims.tk.div_ceil(split_keys);
    let slot_lse = rows * dims.hq;
    // The splits' partial outputs (strides in binding elements) and f32 partial lse.
    let slot_out = slot_lse * d / element_width(d);
    let part_out = Tensor::scratch(batch.gpu, n_splits * slot_lse * d)?;
    let part_lse = Tensor::scratch(batch.gpu, n_splits * slot_lse)?;
    let fwd = forward_kernel(variant, dims.head_dim, true, key_lens.is_some());
    for kp in &pieces.kv {
        let split_first = kp.lo / split_keys;
        let splits = (kp.hi - 1) / split_keys + 1 - split_first;
        for qp in &pieces.q {
            let Some((b0, count)) = overlap(qp, kp) else {
                continue;
            };
            let row_blocks = (dims.group() * (qp.hi - qp.lo)).div_ceil(decode_rows(d, variant));
            let params = Params {
                q_off: element_offset(q, qp.row0, d),
                k_off: element_offset(k, kp.row0, d),
                v_off: element_offset(v, kp.row0, d),
                // The partial results go to split slots of the scratch, indexed by global row.
                out_row0: 0,
                out_split_stride: slot_out as u32,
                lse_split_stride: slot_lse as u32,
                split_keys: split_keys as u32,
                split_first: split_first as u32,
                row_blocks: row_blocks as u32,
                ..dims_params(dims, kv_cap, qp, kp, b0)
            };
            let buffers = [
                q.row(qp.row0).buffer,
                k.row(kp.row0).buffer,
                v.row(kp.row0).buffer,
                &part_out.chunks()[0],
                &part_lse.chunks()[0],
                key_lens_buffer(key_lens, q, qp),
            ];
            let groups = [splits as u32, (dims.hkv * row_blocks) as u32, count as u32];
            batch.dispatch(&fwd, &params, &buffers, groups)?;
        }
    }
    let merge = shared_kernel("attn_merge", dims.head_dim);
    for seg in row_segments(rows, &[out, lse]) {
        // One thread per vec4 column of each head.
        let n = (seg.len() * dims.hq * d.div_ceil(4)) as u32;
        let params = Params {
            hq: dims.hq as u32,
            q_row0: seg.start as u32,
            out_off: element_offset(out, seg.start, d),
            lse_off: lse.row(seg.start).offset,
            out_split_stride: slot_out as u32,
            lse_split_stride: slot_lse as u32,
            n_splits: n_splits as u32,
            n,
            ..bytemuck::Zeroable::zeroed()
        };
        let buffers = [
            out.row(seg.start).buffer,
            lse.row(seg.start).buffer,
            &part_out.chunks()[0],
            &part_lse.chunks()[0],
        ];
        batch.dispatch(
            &merge,
            &params,
            &buffers,
            linear_groups(batch.gpu, n.div_ceil(WG)),
        )?;
    }
    batch.keep(part_out);
    batch.keep(part_lse);
    Ok(())
}

/// Causal attention backward. `out` and `lse` are what [`attention_forward`] saved; writes dq
/// [B * tq, hq * D] and dk, dv [B * tk, hkv * D] (overwriting them). k / v must hold exactly tk
/// rows per sequence. Allocates the [B * tq, hq] row-dot buffer drow.
pub fn attention_backward(
    batch: &mut Batch,
    qkv: Qkv,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    grads: Qkv,
    dims: AttentionDims,
) -> Result<()> {
    let (
        Qkv { q, k, v },
        Qkv {
            q: dq,
            k: dk,
            v: dv,
        },
    ) = (qkv, grads);
    let kv_cap = check_forward_shapes(&dims, q, k, v, out, lse, None)?;
    if kv_cap != dims.tk {
        bail!(
            "attention backward: k / v must hold exactly tk = {} rows per sequence",
            dims.tk
        );
    }
    let (b, d) = (dims.batch_size, dims.head_dim);
    let rows = b * dims.tq;
    expect_f32("attention dout", dout, rows, dims.hq * d)?;
    expect_f32("attention dq", dq, rows, dims.hq * d)?;
    expect_f32("attention dk", dk, b * dims.tk, dims.hkv * d)?;
    expect_f32("attention dv", dv, b * dims.tk, dims.hkv * d)?;
    let drow = Tensor::zeros(batch.gpu, &[rows, dims.hq], DType::F32)?;

    let variant = batch.gpu.plan.attention;
    check_loop_keys(variant, &dims)?;
    let [dq_kernel, dkv_kernel] = backward_kernels(variant, d);
    let prep = shared_kernel("attn_bwd_prep", d);
    for seg in row_segments(rows, &[out, dout, &drow]) {
        let n = (seg.len() * dims.hq) as u32;
        let params = Params {
            out_off: element_offset(out, seg.start, d),
            dout_off: element_offset(dout, seg.start, d),
            drow_off: drow.row(seg.start).offset,
            n,
            ..bytemuck::Zeroable::zeroed()
        };
        let buffers = [
            out.row(seg.start).buffer,
            dout.row(seg.start).buffer,
            drow.row(seg.start).buffer,
        ];
        batch.dispatch(
            &prep,
            &params,
            &buffers,
            linear_groups(batch.gpu, n.div_ceil(WG)),
        )?;
    }

    let q_pieces_of =
        |tensors: &[&Tensor]| pieces(&row_segments(rows, tensors), b, dims.tq, dims.tq);
    let kv_pieces_of =
        |tensors: &[&Tensor]| pieces(&row_segments(b * dims.tk, tensors), b, dims.tk, dims.tk);
    // Offsets of every tensor at the pieces' rows (each kernel reads those of its bindings).
    let offsets = |qp: &Piece, kp: &Piece, b0| Params {
        q_off: element_offset(q, qp.row0, d),
        lse_off: lse.row(qp.row0).offset,
        dout_off: element_offset(dout, qp.row0, d),
        drow_off: drow.row(qp.row0).offset,
        dq_off: element_offset(dq, qp.row0, d),
        k_off: element_offset(k, kp.row0, d),
        v_off: element_offset(v, kp.row0, d),
        dk_off: element_offset(dk, kp.row0, d),
        dv_off: element_offset(dv, kp.row0, d),
        ..dims_params(&dims, kv_cap, qp, kp, b0)
    };

    // dq: key chunks in order (the first writes, later ones add).
    let q_pieces = q_pieces_of(&[q, lse, dout, &drow, dq]);
    for kp in &kv_pieces_of(&[k, v]) {
        for qp in &q_pieces {
            let Some((b0, count)) = overlap(qp, kp) else {
                continue;
            };
            let (qr, kr) = (qp.row0, kp.row0);
            let buffers = [
                q.row(qr).buffer,
                k.row(kr).buffer,
                v.row(kr).buffer,
                lse.row(qr).buffer,
                dout.row(qr).buffer,
                drow.row(qr).buffer,
                dq.row(qr).buffer,
            ];
            let (row_blocks, groups) = match variant {
                AttentionVariant::Subgroup => row_block_groups(&dims, variant, qp, count),
                _ => (
                    0,
                    [
                        (qp.hi - qp.lo).div_ceil(BLOCK_Q) as u32,
                        dims.hq as u32,
                        count as u32,
                    ],
                ),
            };
            let params = Params {
                row_blocks,
                ..offsets(qp, kp, b0)
            };
            batch.dispatch(&dq_kernel, &params, &buffers, groups)?;
        }
    }

    // dk, dv: query chunks in order (the first writes, later ones add).
    let keys_per_group = match variant {
        AttentionVariant::Subgroup => SUBGROUP_LANES,
        _ => BLOCK_K,
    };
    let kv_pieces = kv_pieces_of(&[k, v, dk, dv]);
    for qp in &q_pieces_of(&[q, lse, dout, &drow]) {
        for kp in &kv_pieces {
            let Some((b0, count)) = overlap(qp, kp) else {
                continue;
            };
            let (qr, kr) = (qp.row0, kp.row0);
            let buffers = [
                q.row(qr).buffer,
                k.row(kr).buffer,
                v.row(kr).buffer,
                lse.row(qr).buffer,
                dout.row(qr).buffer,
                drow.row(qr).buffer,
                dk.row(kr).buffer,
                dv.row(kr).buffer,
            ];
            let groups = [
                (kp.hi - kp.lo).div_ceil(keys_per_group) as u32,
                dims.hkv as u32,
                count as u32,
            ];
            batch.dispatch(&dkv_kernel, &offsets(qp, kp, b0), &buffers, groups)?;
        }
    }
    batch.keep(drow);
    Ok(())
}

/// f64 references, naive O(T^2) per row.
pub mod cpu {
    use super::AttentionDims;

    /// Softmax probabilities of query row (b, i) and head h over keys 0..=keys - tq + i, `keys`
    /// being the sequence's key count (k / v with `kv_cap` rows per sequence).
    fn probabilities(
        q: &[f64],
        k: &[f64],
        dims: &AttentionDims,
        kv_cap: usize,
        keys: usize,
        (b, i, h): (usize, usize, usize),
    ) -> (Vec<f64>, f64) {
        let d = dims.head_dim;
        let hk = h / dims.group();
        let qrow = &q[((b * dims.tq + i) * dims.hq + h) * d..][..d];
        let visible = keys - dims.tq + i + 1;
        let scores: Vec<f64> = (0..visible)
            .map(|j| {
                let krow = &k[((b * kv_cap + j) * dims.hkv + hk) * d..][..d];
                dims.scale as f64 * qrow.iter().zip(krow).map(|(x, y)| x * y).sum::<f64>()
            })
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        (e.iter().map(|x| x / sum).collect(), top + sum.ln())
    }

    /// (out [B * tq, hq * D], lse [B * tq, hq]).
    pub fn forward(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dims: &AttentionDims,
        kv_cap: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        forward_ragged(q, k, v, dims, kv_cap, &vec![dims.tk; dims.batch_size])
    }

    /// [`forward`] with sequence b's own key count `lens[b]` (in tq..=kv_cap) in place of tk.
    pub fn forward_ragged(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dims: &AttentionDims,
        kv_cap: usize,
        lens: &[usize],
    ) -> (Vec<f64>, Vec<f64>) {
        let d = dims.head_dim;
        let rows = dims.batch_size * dims.tq;
        let mut out = vec![0.0; rows * dims.hq * d];
        let mut lse = vec![0.0; rows * dims.hq];
        for b in 0..dims.batch_size {
            for i in 0..dims.tq {
                for h in 0..dims.hq {
                    let (p, l) = probabilities(q, k, dims, kv_cap, lens[b], (b, i, h));
                    let row = (b * dims.tq + i) * dims.hq + h;
                    lse[row] = l;
                    for (j, pj) in p.iter().enumerate() {
                        let vrow = &v[((b * kv_cap + j) * dims.hkv + h / dims.group()) * d..][..d];
                        for (o, x) in out[row * d..][..d].iter_mut().zip(vrow) {
                            *o += pj * x;
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// (dq, dk, dv) of sum(out * dout), k / v with tk rows per sequence.
    pub fn backward(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dout: &[f64],
        dims: &AttentionDims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, tk) = (dims.head_dim, dims.tk);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for b in 0..dims.batch_size {
            for i in 0..dims.tq {
                for h in 0..dims.hq {
                    let (p, _) = probabilities(q, k, dims, tk, tk, (b, i, h));
                    let row = ((b * dims.tq + i) * dims.hq + h) * d;
                    let kv = |j: usize| ((b * tk + j) * dims.hkv + h / dims.group()) * d;
                    let g = &dout[row..][..d];
                    let out_dot: f64 = p
                        .iter()
                        .enumerate()
                        .map(|(j, pj)| pj * dot(g, &v[kv(j)..][..d]))
                        .sum();
                    for (j, pj) in p.iter().enumerate() {
                        let ds = pj * (dot(g, &v[kv(j)..][..d]) - out_dot) * dims.scale as f64;
                        for c in 0..d {
                            dv[kv(j) + c] += pj * g[c];
                            dq[row + c] += ds * k[kv(j) + c];
                            dk[kv(j) + c] += ds * q[row + c];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

/// Random q (wider, for peakier softmaxes), k and v of a problem; k / v with `kv_cap` rows per
/// sequence.
fn inputs(dims: &AttentionDims, kv_cap: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, d) = (dims.batch_size, dims.head_dim);
    (
        random(seed, b * dims.tq * dims.hq * d, 2.0),
        random(seed + 1, b * kv_cap * dims.hkv * d, 1.0),
        random(seed + 2, b * kv_cap * dims.hkv * d, 1.0),
    )
}

/// Runs the forward (with `path`) on random inputs and compares out and lse with the CPU
/// reference; k / v hold `kv_cap` >= tk rows per sequence.
pub fn check_forward(
    gpu: &Gpu,
    dims: AttentionDims,
    kv_cap: usize,
    path: ForwardPath,
    seed: u64,
) -> Result<Vec<Check>> {
    forward_checks(gpu, dims, kv_cap, None, path, seed)
}

/// [`check_forward`] with per-sequence key counts `lens` (each in tq..=tk), k / v holding one
/// spare slot of `kv_cap` rows past the B sequences, as a batched KV cache whose last slots are
/// free does.
pub fn check_forward_ragged(
    gpu: &Gpu,
    dims: AttentionDims,
    kv_cap: usize,
    lens: &[usize],
    path: ForwardPath,
    seed: u64,
) -> Result<Vec<Check>> {
    if lens.len() != dims.batch_size || lens.iter().any(|&l| l < dims.tq || l > dims.tk) {
        bail!(
            "attention check: key counts {lens:?} are not {} values in tq..=tk of {}",
            dims.batch_size,
            dims.label()
        );
    }
    forward_checks(gpu, dims, kv_cap, Some(lens), path, seed)
}

fn forward_checks(
    gpu: &Gpu,
    dims: AttentionDims,
    kv_cap: usize,
    lens: Option<&[usize]>,
    path: ForwardPath,
    seed: u64,
) -> Result<Vec<Check>> {
    let (b, d) = (dims.batch_size, dims.head_dim);
    let slots = b + usize::from(lens.is_some());
    let (mut qv, kv, vv) = inputs(
        &AttentionDims {
            batch_size: slots,
            ..dims
        },
        kv_cap,
        seed,
    );
    qv.truncate(b * dims.tq * dims.hq * d);
    let q = Tensor::from_f32(gpu, &[b * dims.tq, dims.hq * d], &qv)?;
    let k = Tensor::from_f32(gpu, &[slots * kv_cap, dims.hkv * d], &kv)?;
    let v = Tensor::from_f32(gpu, &[slots * kv_cap, dims.hkv * d], &vv)?;
    let out = Tensor::zeros(gpu, &[b * dims.tq, dims.hq * d], DType::F32)?;
    let lse = Tensor::zeros(gpu, &[b * dims.tq, dims.hq], DType::F32)?;
    let lens_tensor = lens
        .map(|l| Tensor::from_u32(gpu, &[b], &l.iter().map(|&x| x as u32).collect::<Vec<_>>()))
        .transpose()?;
    let keys = lens_tensor.as_ref().map(|lens| KeyLens {
        lens,
        capacity: kv_cap,
    });
    let mut batch = gpu.batch();
    let qkv = Qkv::new(&q, &k, &v);
    attention_forward_with(&mut batch, qkv, &out, &lse, dims, keys, path)?;
    batch.submit();
    let all_keys = vec![dims.tk; b];
    let (want_out, want_lse) = cpu::forward_ragged(
        &to_f64(&qv),
        &to_f64(&kv),
        &to_f64(&vv),
        &dims,
        kv_cap,
        lens.unwrap_or(&all_keys),
    );
    let mut shape = format!(
        "{} {}",
        dims.label(),
        if decode_path(&dims, path) {
            "split-k"
        } else {
            "blocked"
        }
    );
    if kv_cap > dims.tk {
        shape += &format!(" cap{kv_cap}");
    }
    if let Some(lens) = lens {
        shape += &format!(" lens{lens:?}");
    }
    Ok(vec![
        Check {
            kernel: "attention_forward out".into(),
            shape: shape.clone(),
            max_err: max_error(&out.to_f32(gpu)?, &want_out),
            tolerance: 1e-5,
        },
        Check {
            kernel: "attention_forward lse".into(),
            shape,
            max_err: max_error(&lse.to_f32(gpu)?, &want_lse),
            tolerance: 1e-5,
        },
    ])
}

/// Runs the backward on random inputs (with out / lse from the CPU reference, so it is judged
/// alone) and compares dq, dk and dv with the CPU reference.
pub fn check_backward(gpu: &Gpu, dims: AttentionDims, seed: u64) -> Result<Vec<Check>> {
    let (b, d) = (dims.batch_size, dims.head_dim);
    let (qv, kv, vv) = inputs(&dims, dims.tk, seed);
    let gv = random(seed + 3, b * dims.tq * dims.hq * d, 1.0);
    let (q64, k64, v64, g64) = (to_f64(&qv), to_f64(&kv), to_f64(&vv), to_f64(&gv));
    let (out_ref, lse_ref) = cpu::forward(&q64, &k64, &v64, &dims, dims.tk);
    let f32s = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let qshape = [b * dims.tq, dims.hq * d];
    let kshape = [b * dims.tk, dims.hkv * d];
    let q = Tensor::from_f32(gpu, &qshape, &qv)?;
    let k = Tensor::from_f32(gpu, &kshape, &kv)?;
    let v = Tensor::from_f32(gpu, &kshape, &vv)?;
    let out = Tensor::from_f32(gpu, &qshape, &f32s(&out_ref))?;
    let lse = Tensor::from_f32(gpu, &[b * dims.tq, dims.hq], &f32s(&lse_ref))?;
    let dout = Tensor::from_f32(gpu, &qshape, &gv)?;
    let dq = Tensor::zeros(gpu, &qshape, DType::F32)?;
    let dk = Tensor::zeros(gpu, &kshape, DType::F32)?;
    let dv = Tensor::zeros(gpu, &kshape, DType::F32)?;
    let mut batch = gpu.batch();
    let qkv = Qkv::new(&q, &k, &v);
    let grads = Qkv::new(&dq, &dk, &dv);
    attention_backward(&mut batch, qkv, &out, &lse, &dout, grads, dims)?;
    batch.submit();
    let (want_dq, want_dk, want_dv) = cpu::backward(&q64, &k64, &v64, &g64, &dims);
    let shape = dims.label();
    let check = |name: &str, t: &Tensor, want: &[f64]| -> Result<Check> {
        Ok(Check {
            kernel: format!("attention_backward {name}"),
            shape: shape.clone(),
            max_err: max_error(&t.to_f32(gpu)?, want),
            tolerance: 5e-5,
        })
    };
    Ok(vec![
        check("dq", &dq, &want_dq)?,
        check("dk", &dk, &want_dk)?,
        check("dv", &dv, &want_dv)?,
    ])
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let dims = |batch_size, tq, tk, hq, hkv, head_dim: usize| AttentionDims {
        batch_size,
        tq,
        tk,
        hq,
        hkv,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let mut checks = check_forward(gpu, dims(2, 37, 37, 6, 2, 64), 37, ForwardPath::Blocked, 1)?;
    checks.extend(check_forward(
        gpu,
        dims(1, 1, 70, 7, 1, 128),
        75,
        ForwardPath::SplitKeys,
        2,
    )?);
    checks.extend(check_forward_ragged(
        gpu,
        dims(3, 1, 70, 7, 1, 128),
        75,
        &[1, 70, 33],
        ForwardPath::SplitKeys,
        4,
    )?);
    checks.extend(check_backward(gpu, dims(1, 33, 33, 4, 2, 128), 3)?);
    // A head size padded in the kernels (80: as 128) and one read as vec2s (10).
    checks.extend(check_forward(
        gpu,
        dims(1, 33, 33, 4, 2, 80),
        33,
        ForwardPath::Blocked,
        5,
    )?);
    checks.extend(check_backward(gpu, dims(1, 33, 33, 2, 1, 10), 6)?);
    Ok(checks)
}

/// Every variant the adapter runs (each on a device of `gpu`'s kind with that variant forced):
/// forward and backward at T = seq_len (causal: forward 4 B hq T^2 D / 2 flops, backward 2.5x
/// that, the usual count of its five products) and one decode step against a seq_len cache.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for &variant in AttentionVariant::ALL {
        if variant == gpu.plan.attention {
            results.extend(bench_variant(gpu, config)?);
            continue;
        }
        let env = GpuOptions::from_env()?;
        let forced = [
            env.kernels.clone(),
            Some(format!("attention={}", variant.name())),
        ];
        let options = GpuOptions {
            kernels: Some(forced.into_iter().flatten().collect::<Vec<_>>().join(",")),
            ..env
        };
        match Gpu::new(&options) {
            Ok(forced) => results.extend(bench_variant(&forced, config)?),
            Err(e) => eprintln!("attention={} not measured: {e:#}", variant.name()),
        }
    }
    Ok(results)
}

fn bench_variant(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let t = config.seq_len;
    let variant = gpu.plan.attention.name();
    let mut results = Vec::new();
    for &shape in &config.shapes {
        let d = shape.head_dim;
        let dims = AttentionDims {
            batch_size: 1,
            tq: t,
            tk: t,
            hq: shape.heads,
            hkv: shape.kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let (qv, kv, vv) = inputs(&dims, t, 1);
        let qshape = [t, dims.hq * d];
        let kshape = [t, dims.hkv * d];
        let q = Tensor::from_f32(gpu, &qshape, &qv)?;
        let k = Tensor::from_f32(gpu, &kshape, &kv)?;
        let v = Tensor::from_f32(gpu, &kshape, &vv)?;
        let out = Tensor::zeros(gpu, &qshape, DType::F32)?;
        let lse = Tensor::zeros(gpu, &[t, dims.hq], DType::F32)?;
        let dout = Tensor::from_f32(gpu, &qshape, &qv)?;
        let dq = Tensor::zeros(gpu, &qshape, DType::F32)?;
        let dk = Tensor::zeros(gpu, &kshape, DType::F32)?;
        let dv = Tensor::zeros(gpu, &kshape, DType::F32)?;
        let qkv = Qkv::new(&q, &k, &v);
        let grads = Qkv::new(&dq, &dk, &dv);
        let label = format!("{} T={t} hq={} hkv={} D={d}", shape.name, dims.hq, dims.hkv);
        let flops = 2.0 * (dims.hq * t * t * d) as f64;
        let time = crate::bench::time(gpu, config.reps, |b| {
            attention_forward_with(b, qkv, &out, &lse, dims, None, ForwardPath::Blocked)
        })?;
        results.push(BenchResult {
            kernel: format!("attention_forward ({variant})"),
            shape: label.clone(),
            time,
            flops,
            bytes: 0.0,
        });
        let time = crate::bench::time(gpu, config.reps, |b| {
            attention_backward(b, qkv, &out, &lse, &dout, grads, dims)
        })?;
        results.push(BenchResult {
            kernel: format!("attention_backward ({variant})"),
            shape: label,
            time,
            flops: 2.5 * flops,
            bytes: 0.0,
        });

        let step = AttentionDims { tq: 1, ..dims };
        let (q1, out1, lse1) = (
            Tensor::from_f32(gpu, &[1, dims.hq * d], &qv[..dims.hq * d])?,
            Tensor::zeros(gpu, &[1, dims.hq * d], DType::F32)?,
            Tensor::zeros(gpu, &[1, dims.hq], DType::F32)?,
        );
        let time = crate::bench::time(gpu, config.reps, |b| {
            attention_forward(b, Qkv { q: &q1, ..qkv }, &out1, &lse1, step)
        })?;
        results.push(BenchResult {
            kernel: format!("attention_decode ({variant})"),
            shape: format!(
                "{} tq=1 tk={t} hq={} hkv={} D={d}",
                shape.name, dims.hq, dims.hkv
            ),
            time,
            flops: 4.0 * (dims.hq * t * d) as f64,
            bytes: 2.0 * (t * dims.hkv * d * 4) as f64,
        });
    }
    Ok(results)
}
