// The GEMM of matmul.wgsl (same Params, bindings, variant constants and load helpers; the loader
// appends this file to it) for CPU adapters with subgroups. A separate file because a module
// that uses subgroup builtins needs the SUBGROUP feature even for its other entry points.
//
// On llvmpipe (lavapipe) every per-lane memory operation and every barrier costs, while FMAs are
// nearly free (it runs a workgroup's SIMD groups as coroutines and gathers per-lane loads one
// access at a time, whatever its width). So: no workgroup memory, no barriers, and 128-bit loads.
// A workgroup is one subgroup of 8 lanes (8 lanes with work in every SIMD group of a 256-bit
// llvmpipe, where wider workgroups left whole groups idle on narrow products); lane t owns the 8
// columns j0 + 8t .. j0 + 8t + 7 of a block of SG_ROWS rows.
// Per K-step of 8 it reads its 8×8 block of op(B) as 8 contiguous runs, each one vec4 load of
// bf16 B (two of f32 B). A is read once per workgroup and shared by subgroupBroadcast: lane l
// loads rows l, l + 8, .. of the block as two vec4 each (A [M, K]), or column k0 + l of every
// row as SG_ROWS / 4 vec4 (A stored [K, M]); the broadcasts then give every lane each A value
// from registers. Correct for every subgroup size >= 8 (a wider subgroup holds the 8 lanes and
// idles the rest); the kernel plan selects it only on adapters whose sizes are all >= 8. Tensor
// buffers are whole multiples of 16 bytes (tensor.rs), so the vec4 views reach every element.
// The fused second product (SECOND: A2 [M, K2], B2 f32) runs in a loop of its own after the
// first product's, with the same loads and broadcasts, into the same accumulators.
//
// Variant constants besides matmul.wgsl's: SG_ROWS, the rows of the block, a multiple of 8 up to
// 64; SG_ALIGNED, set when every operand's offset and row length are whole vec4s of its storage
// (4 f32, 8 bf16; C's and the bias offset too), so that every run, every four A values and every
// four outputs are one vec4 access. Such a variant reads without guards: rows past M and columns
// past N read whatever lies there (robust buffer access makes that defined: another value of the
// buffer, or zero) and feed only outputs the store discards, and selects zero the values past K
// of a last K-step that K does not fill. Without SG_ALIGNED every element is read on its own,
// clamped inside and zero outside the product. Neither has a branch in its K loop: llvmpipe runs
// both sides of every branch whose condition it cannot fold, with masks, so a guarded vec4 load
// paid for its element-by-element fallback even where the guard passed (the 0.5B forward
// products ran 1.5-1.9x slower). Per K-step a lane loads SG_ROWS / 4 + 8 vec4 (bf16 B) for
// 64 · SG_ROWS FMAs: the larger the block, the fewer loads (what costs) per FMA, spilled
// accumulators notwithstanding (docs/kernels.md); few-row products (decode's) take 8.
//
// llvmpipe keeps a private array in registers only when every index is a constant, and unrolls
// only small loops; so the block is four mat4x4 filled from whole runs, each row's update is one
// call written out per row (subgroupBroadcast needs a constant lane anyway), and no loop indexes
// an array.

// 128-bit views of bindings 1 to 6 (A, B, C, bias, A2 and B2 of matmul.wgsl): this kernel uses
// its operands through these only (an entry point may use one variable per binding).
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> c4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> a24: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> b24: array<vec4<f32>>;

const SG_K: u32 = 8u;
// Lanes of a workgroup, which must fit in one subgroup (the broadcasts read lanes 0..7).
const SG_LANES: u32 = 8u;

// The reduction length of the first product, or of the second when `second`.
fn sg_k(second: bool) -> u32 {
    if SECOND && second {
        return p.k2;
    }
    return p.k;
}

// Four elements of A's storage (A2's when `second`) from e, a multiple of 4.
fn sg_a_vec(second: bool, e: u32) -> vec4<f32> {
    if SECOND && second {
        return a24[e >> 2u];
    }
    return a4[e >> 2u];
}

// Element e of A's storage (A2's when `second`).
fn sg_a_elem(second: bool, e: u32) -> f32 {
    return sg_a_vec(second, e & ~3u)[e & 3u];
}

// Element e of B's storage (B2's, always f32, when `second`).
fn sg_b_elem(second: bool, e: u32) -> f32 {
    if SECOND && second {
        return b24[e >> 2u][e & 3u];
    }
    if B_BF16 {
        return bf16_unpack(b4[e >> 3u][(e >> 1u) & 3u], (e & 1u) == 1u);
    }
    return bitcast<f32>(b4[e >> 2u][e & 3u]);
}

// op(A)[i, kk] of the first product, or of the second (A2) when `second`, unscaled; zero outside
// the product (a clamped load and a select: llvmpipe turns each branch into masked code).
fn sg_a(second: bool, i: u32, kk: u32) -> f32 {
    let kn = sg_k(second);
    let ic = min(i, p.m - 1u);
    let kc = min(kk, kn - 1u);
    var e = p.a_off + ic * p.lda + kc;
    if SECOND && second {
        e = p.a2_off + ic * p.lda2 + kc;
    } else if TRANS_A {
        e = p.a_off + kc * p.lda + ic;
    }
    return select(0.0, sg_a_elem(second, e), i < p.m && kk < kn);
}

// Four values of op(A) (or A2) read one by one through `sg_a`: (i..i + 3, kk) when `along_i`,
// else (i, kk..kk + 3).
fn sg_a_quad(second: bool, i: u32, kk: u32, along_i: bool) -> vec4<f32> {
    if along_i {
        return vec4(sg_a(second, i, kk), sg_a(second, i + 1u, kk), sg_a(second, i + 2u, kk), sg_a(second, i + 3u, kk));
    }
    return vec4(sg_a(second, i, kk), sg_a(second, i, kk + 1u), sg_a(second, i, kk + 2u), sg_a(second, i, kk + 3u));
}

// Offsets k0 + 0..3 and k0 + 4..7 of a K-step's values, for the selects that zero those past K.
const SG_LO: vec4<u32> = vec4(0u, 1u, 2u, 3u);
const SG_HI: vec4<u32> = vec4(4u, 5u, 6u, 7u);

// Row i of op(A) at k0..k0 + 7, scaled by the product's alpha (A [M, K] and A2 [M, K2]).
fn sg_a_row(second: bool, i: u32, k0: u32) -> mat2x4<f32> {
    var e = p.a_off + i * p.lda + k0;
    var scale = p.alpha;
    if SECOND && second {
        e = p.a2_off + i * p.lda2 + k0;
        scale = p.alpha2;
    }
    if SG_ALIGNED {
        let kn = vec4(sg_k(second));
        return mat2x4(
            scale * select(vec4(0.0), sg_a_vec(second, e), k0 + SG_LO < kn),
            scale * select(vec4(0.0), sg_a_vec(second, e + 4u), k0 + SG_HI < kn),
        );
    }
    return mat2x4(scale * sg_a_quad(second, i, k0, false), scale * sg_a_quad(second, i, k0 + 4u, false));
}

// Rows i..i + 3 of op(A) at column kk, scaled (A stored [K, M]; only the first product's A is
// ever transposed).
fn sg_a_col(i: u32, kk: u32) -> vec4<f32> {
    if SG_ALIGNED {
        return p.alpha * select(vec4(0.0), sg_a_vec(false, p.a_off + kk * p.lda + i), kk < p.k);
    }
    return p.alpha * sg_a_quad(false, i, kk, true);
}

// Eight consecutive elements of B's storage (or B2's): elements 0..3 and 4..7 of a run.
struct Run {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn sg_word(word: u32) -> vec2<f32> {
    return vec2(bf16_unpack(word, false), bf16_unpack(word, true));
}

// The run at element e, 16-byte aligned: one vec4 load of bf16 B, two of f32 B (and of B2).
fn sg_run(second: bool, e: u32) -> Run {
    if SECOND && second {
        return Run(b24[e >> 2u], b24[(e >> 2u) + 1u]);
    }
    if !B_BF16 {
        return Run(bitcast<vec4<f32>>(b4[e >> 2u]), bitcast<vec4<f32>>(b4[(e >> 2u) + 1u]));
    }
    let w = b4[e >> 3u];
    return Run(vec4(sg_word(w.x), sg_word(w.y)), vec4(sg_word(w.z), sg_word(w.w)));
}

// op(B)[kk, jj] of the first product or of the second; zero outside the product (branch-free).
fn sg_b(second: bool, kk: u32, jj: u32) -> f32 {
    let kn = sg_k(second);
    let kc = min(kk, kn - 1u);
    let jc = min(jj, p.n - 1u);
    var off = p.b_off;
    var ld = p.ldb;
    if SECOND && second {
        off = p.b2_off;
        ld = p.ldb2;
    }
    var e = off + kc * ld + jc;
    if TRANS_B {
        e = off + jc * ld + kc;
    }
    return select(0.0, sg_b_elem(second, e), kk < kn && jj < p.n);
}

// Element t of run x of the lane's block, guarded: (k0 + t, j + x) of op(B) when TRANS_B (a run is
// a column), else (k0 + x, j + t) (a row).
fn sg_elem(second: bool, k0: u32, j: u32, x: u32, t: u32) -> f32 {
    if TRANS_B {
        return sg_b(second, k0 + t, j + x);
    }
    return sg_b(second, k0 + x, j + t);
}

// Run x of the lane's block: a column of op(B) (j + x, from row k0) when TRANS_B, else a row
// (k0 + x, from column j); each is contiguous in B's storage. SG_ALIGNED reads it whole and
// zeroes what lies past K; otherwise element by element, zero outside the product.
fn sg_block_run(second: bool, k0: u32, j: u32, x: u32) -> Run {
    if SG_ALIGNED {
        var off = p.b_off;
        var ld = p.ldb;
        if SECOND && second {
            off = p.b2_off;
            ld = p.ldb2;
        }
        let kn = sg_k(second);
        if TRANS_B {
            let r = sg_run(second, off + (j + x) * ld + k0);
            return Run(select(vec4(0.0), r.lo, k0 + SG_LO < vec4(kn)), select(vec4(0.0), r.hi, k0 + SG_HI < vec4(kn)));
        }
        let r = sg_run(second, off + (k0 + x) * ld + j);
        let inside = k0 + x < kn;
        return Run(select(vec4(0.0), r.lo, inside), select(vec4(0.0), r.hi, inside));
    }
    return Run(
        vec4(
            sg_elem(second, k0, j, x, 0u),
            sg_elem(second, k0, j, x, 1u),
            sg_elem(second, k0, j, x, 2u),
            sg_elem(second, k0, j, x, 3u),
        ),
        vec4(
            sg_elem(second, k0, j, x, 4u),
            sg_elem(second, k0, j, x, 5u),
            sg_elem(second, k0, j, x, 6u),
            sg_elem(second, k0, j, x, 7u),
        ),
    );
}

// The lane's 8×8 block of op(B) from row k0 and column j, as four quarters whose columns are the
// rows kk of op(B): q00 holds rows 0..3 at columns j..j+3, q01 rows 0..3 at j+4..j+7, q10 and q11
// rows 4..7.
struct Block {
    q00: mat4x4<f32>,
    q01: mat4x4<f32>,
    q10: mat4x4<f32>,
    q11: mat4x4<f32>,
}

fn sg_block(second: bool, k0: u32, j: u32) -> Block {
    let r0 = sg_block_run(second, k0, j, 0u);
    let r1 = sg_block_run(second, k0, j, 1u);
    let r2 = sg_block_run(second, k0, j, 2u);
    let r3 = sg_block_run(second, k0, j, 3u);
    let r4 = sg_block_run(second, k0, j, 4u);
    let r5 = sg_block_run(second, k0, j, 5u);
    let r6 = sg_block_run(second, k0, j, 6u);
    let r7 = sg_block_run(second, k0, j, 7u);
    if TRANS_B {
        // Runs are columns: transposing puts rows of op(B) in the matrix columns.
        return Block(
            transpose(mat4x4(r0.lo, r1.lo, r2.lo, r3.lo)),
            transpose(mat4x4(r4.lo, r5.lo, r6.lo, r7.lo)),
            transpose(mat4x4(r0.hi, r1.hi, r2.hi, r3.hi)),
            transpose(mat4x4(r4.hi, r5.hi, r6.hi, r7.hi)),
        );
    }
    return Block(
        mat4x4(r0.lo, r1.lo, r2.lo, r3.lo),
        mat4x4(r0.hi, r1.hi, r2.hi, r3.hi),
        mat4x4(r4.lo, r5.lo, r6.lo, r7.lo),
        mat4x4(r4.hi, r5.hi, r6.hi, r7.hi),
    );
}

// One row's update: acc (its 8 columns as two vec4) + Σ_kk A[kk]·op(B)[kk, ..], with A[0..8] in
// a (two vec4).
fn sg_row(acc: mat2x4<f32>, a: mat2x4<f32>, blk: Block) -> mat2x4<f32> {
    return mat2x4(acc[0] + blk.q00 * a[0] + blk.q10 * a[1], acc[1] + blk.q01 * a[0] + blk.q11 * a[1]);
}

// A[0..8] of a row whose value at column kk lane kk holds (A stored [K, M]).
fn sg_spread(v: f32) -> mat2x4<f32> {
    return mat2x4(
        vec4(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u)),
        vec4(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)),
    );
}

// The block's accumulators and the A values of the current K-step this lane loaded: rows
// 8q + l % 8 (A [M, K], `sg_rows[q]`) or rows 4q..4q + 3 at column k0 + l % 8 (A stored [K, M],
// `sg_cols[q]`). Private, indexed by constants only once the calls below are inlined.
var<private> sg_acc: array<mat2x4<f32>, 64>;
var<private> sg_rows: array<mat2x4<f32>, 8>;
var<private> sg_cols: array<vec4<f32>, 16>;

// Whether the block has its q-th group of 8 rows (a constant once inlined: groups past SG_ROWS
// compile away).
fn sg_has(q: u32) -> bool {
    return 8u * q < SG_ROWS;
}

// Loads the lane's A values of rows 8q..8q + 7 of the block (i0 its first row) at K-step k0.
fn sg_load8(q: u32, second: bool, i0: u32, k0: u32, l: u32) {
    if TRANS_A && !(SECOND && second) {
        sg_cols[2u * q] = sg_a_col(i0 + 8u * q, k0 + l);
        sg_cols[2u * q + 1u] = sg_a_col(i0 + 8u * q + 4u, k0 + l);
    } else {
        sg_rows[q] = sg_a_row(second, i0 + 8u * q + l, k0);
    }
}

// Updates rows 8q..8q + 7 of the block with the K-step's block of op(B).
fn sg_update8(q: u32, second: bool, blk: Block) {
    let r = 8u * q;
    if TRANS_A && !(SECOND && second) {
        let lo = sg_cols[2u * q];
        let hi = sg_cols[2u * q + 1u];
        sg_acc[r] = sg_row(sg_acc[r], sg_spread(lo.x), blk);
        sg_acc[r + 1u] = sg_row(sg_acc[r + 1u], sg_spread(lo.y), blk);
        sg_acc[r + 2u] = sg_row(sg_acc[r + 2u], sg_spread(lo.z), blk);
        sg_acc[r + 3u] = sg_row(sg_acc[r + 3u], sg_spread(lo.w), blk);
        sg_acc[r + 4u] = sg_row(sg_acc[r + 4u], sg_spread(hi.x), blk);
        sg_acc[r + 5u] = sg_row(sg_acc[r + 5u], sg_spread(hi.y), blk);
        sg_acc[r + 6u] = sg_row(sg_acc[r + 6u], sg_spread(hi.z), blk);
        sg_acc[r + 7u] = sg_row(sg_acc[r + 7u], sg_spread(hi.w), blk);
        return;
    }
    let v = sg_rows[q];
    sg_acc[r] = sg_row(sg_acc[r], mat2x4(subgroupBroadcast(v[0], 0u), subgroupBroadcast(v[1], 0u)), blk);
    sg_acc[r + 1u] = sg_row(sg_acc[r + 1u], mat2x4(subgroupBroadcast(v[0], 1u), subgroupBroadcast(v[1], 1u)), blk);
    sg_acc[r + 2u] = sg_row(sg_acc[r + 2u], mat2x4(subgroupBroadcast(v[0], 2u), subgroupBroadcast(v[1], 2u)), blk);
    sg_acc[r + 3u] = sg_row(sg_acc[r + 3u], mat2x4(subgroupBroadcast(v[0], 3u), subgroupBroadcast(v[1], 3u)), blk);
    sg_acc[r + 4u] = sg_row(sg_acc[r + 4u], mat2x4(subgroupBroadcast(v[0], 4u), subgroupBroadcast(v[1], 4u)), blk);
    sg_acc[r + 5u] = sg_row(sg_acc[r + 5u], mat2x4(subgroupBroadcast(v[0], 5u), subgroupBroadcast(v[1], 5u)), blk);
    sg_acc[r + 6u] = sg_row(sg_acc[r + 6u], mat2x4(subgroupBroadcast(v[0], 6u), subgroupBroadcast(v[1], 6u)), blk);
    sg_acc[r + 7u] = sg_row(sg_acc[r + 7u], mat2x4(subgroupBroadcast(v[0], 7u), subgroupBroadcast(v[1], 7u)), blk);
}

// Stores rows 8q..8q + 7 of the lane's columns j..j+7 (those inside C).
fn sg_store8(q: u32, i0: u32, j: u32) {
    let r = 8u * q;
    sg_store(i0 + r, j, sg_acc[r]);
    sg_store(i0 + r + 1u, j, sg_acc[r + 1u]);
    sg_store(i0 + r + 2u, j, sg_acc[r + 2u]);
    sg_store(i0 + r + 3u, j, sg_acc[r + 3u]);
    sg_store(i0 + r + 4u, j, sg_acc[r + 4u]);
    sg_store(i0 + r + 5u, j, sg_acc[r + 5u]);
    sg_store(i0 + r + 6u, j, sg_acc[r + 6u]);
    sg_store(i0 + r + 7u, j, sg_acc[r + 7u]);
}

// Stores row i of the lane's columns j..j+7 (those inside C).
fn sg_store(i: u32, j: u32, v: mat2x4<f32>) {
    if SG_ALIGNED {
        sg_store4(i, j, v[0]);
        sg_store4(i, j + 4u, v[1]);
        return;
    }
    for (var t = 0u; t < 4u; t++) {
        sg_store1(i, j + t, v[0][t]);
        sg_store1(i, j + 4u + t, v[1][t]);
    }
}

// C[i, j..j + 3] = sum + bias + beta · C as one vec4 read-modify-write (SG_ALIGNED: C's offset
// and row length and the bias offset are whole vec4s). Its columns past N keep their values: they
// lie inside C's row (j < N and j + 4 <= the row length) and no invocation of the launch writes
// them. One vec4 access instead of four scalar ones: on llvmpipe each is a per-lane loop, and
// with the scalar stores skipped the 1024³ product ran 1.17x faster (docs/benchmarks.md).
fn sg_store4(i: u32, j: u32, sum: vec4<f32>) {
    if i >= p.m || j >= p.n {
        return;
    }
    let e = (p.c_off + i * p.ldc + j) >> 2u;
    let old = c4[e];
    var v = sum;
    if BIAS {
        v += bias4[(p.bias_off + j) >> 2u];
    }
    // beta = 0 ignores C's old values (read only for the columns past N), so stale NaNs in C
    // cannot leak in.
    v = select(v, v + p.beta * old, p.beta != 0.0);
    c4[e] = select(old, v, j + SG_LO < vec4(p.n));
}

// C[i, j] = sum + bias + beta · C, inside C only (matmul.wgsl's store_c through the vec4 views).
fn sg_store1(i: u32, j: u32, sum: f32) {
    if i >= p.m || j >= p.n {
        return;
    }
    let e = p.c_off + i * p.ldc + j;
    var v = sum;
    if BIAS {
        let b = p.bias_off + j;
        v += bias4[b >> 2u][b & 3u];
    }
    if p.beta != 0.0 {
        v += p.beta * c4[e >> 2u][e & 3u];
    }
    c4[e >> 2u][e & 3u] = v;
}

// Loads the lane's A values of every group of the block at K-step k0.
fn sg_load(second: bool, i0: u32, k0: u32, l: u32) {
    sg_load8(0u, second, i0, k0, l);
    if sg_has(1u) {
        sg_load8(1u, second, i0, k0, l);
    }
    if sg_has(2u) {
        sg_load8(2u, second, i0, k0, l);
    }
    if sg_has(3u) {
        sg_load8(3u, second, i0, k0, l);
    }
    if sg_has(4u) {
        sg_load8(4u, second, i0, k0, l);
    }
    if sg_has(5u) {
        sg_load8(5u, second, i0, k0, l);
    }
    if sg_has(6u) {
        sg_load8(6u, second, i0, k0, l);
    }
    if sg_has(7u) {
        sg_load8(7u, second, i0, k0, l);
    }
}

// Updates every group of the block with the K-step's block of op(B).
fn sg_update(second: bool, blk: Block) {
    sg_update8(0u, second, blk);
    if sg_has(1u) {
        sg_update8(1u, second, blk);
    }
    if sg_has(2u) {
        sg_update8(2u, second, blk);
    }
    if sg_has(3u) {
        sg_update8(3u, second, blk);
    }
    if sg_has(4u) {
        sg_update8(4u, second, blk);
    }
    if sg_has(5u) {
        sg_update8(5u, second, blk);
    }
    if sg_has(6u) {
        sg_update8(6u, second, blk);
    }
    if sg_has(7u) {
        sg_update8(7u, second, blk);
    }
}

// Accumulates the first product over all its K-steps, or the second's when `second`: one loop
// per product, so that once inlined each loop's body holds one product's loads only.
fn sg_product(second: bool, i0: u32, j: u32, l: u32) {
    let steps = (sg_k(second) + SG_K - 1u) / SG_K;
    // Every lane walks every step (lanes past N compute discarded values): the broadcasts need
    // the whole subgroup.
    for (var t = 0u; t < steps; t++) {
        let k0 = t * SG_K;
        sg_load(second, i0, k0, l);
        sg_update(second, sg_block(second, k0, j));
    }
}

@compute @workgroup_size(SG_LANES)
fn gemm_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let i0 = wid.y * SG_ROWS;
    let j = (wid.x * SG_LANES + lid) * 8u;
    let l = lane % SG_LANES;
    sg_product(false, i0, j, l);
    if SECOND {
        sg_product(true, i0, j, l);
    }
    sg_store8(0u, i0, j);
    if sg_has(1u) {
        sg_store8(1u, i0, j);
    }
    if sg_has(2u) {
        sg_store8(2u, i0, j);
    }
    if sg_has(3u) {
        sg_store8(3u, i0, j);
    }
    if sg_has(4u) {
        sg_store8(4u, i0, j);
    }
    if sg_has(5u) {
        sg_store8(5u, i0, j);
    }
    if sg_has(6u) {
        sg_store8(6u, i0, j);
    }
    if sg_has(7u) {
        sg_store8(7u, i0, j);
    }
}
