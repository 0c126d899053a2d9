// The GEMM of matmul.wgsl (same Params, bindings, variant constants and load helpers; the loader
// appends this file to it) for CPU adapters with subgroups. A separate file because a module
// that uses subgroup builtins needs the SUBGROUP feature even for its other entry points.
//
// On llvmpipe (lavapipe) every per-lane memory operation and every barrier costs, while FMAs are
// nearly free (it runs a workgroup's SIMD groups as coroutines and gathers per-lane loads one
// element at a time). So: no workgroup memory, no barriers. Lane t of the workgroup owns the 8
// columns j0 + 8t .. j0 + 8t + 7 of a block of SG_ROWS rows. Per K-step of 8 it reads its 8×8
// block of op(B) as 8 contiguous runs (4 words each for bf16 B), and lane l of each subgroup reads
// op(A)[i, k0 + l % 8] for every row i of the block, once; subgroupBroadcast from lanes 0..7 then
// gives every lane each A value from registers. Correct for every subgroup size >= 8 (lanes past
// 8 read duplicates); the kernel plan selects it only on adapters whose sizes are all >= 8.
//
// Variant constants besides matmul.wgsl's: SG_ROWS, the rows of the block (8, 16 or 32: 8 for
// few-row products such as decode's).
//
// llvmpipe keeps a private array in registers only when every index is a constant, and unrolls
// only small loops; so the block is four mat4x4 filled from whole runs, each row's update is one
// call written out per row, and no loop indexes an array.

const SG_K: u32 = 8u;
const SG_WG: u32 = 32u;

// The reduction length of the first product, or of the second when `second`.
fn sg_k(second: bool) -> u32 {
    if SECOND && second {
        return p.k2;
    }
    return p.k;
}

// op(A)[i, kk] of the first product, or of the second (A2) when `second`, scaled by its alpha;
// zero outside the product. Branch-free (a clamped load and a select): llvmpipe turns each branch
// into masked code, and this runs for every row of the block.
fn sg_a(second: bool, i: u32, kk: u32) -> f32 {
    let kn = sg_k(second);
    let ic = min(i, p.m - 1u);
    let kc = min(kk, kn - 1u);
    var v = p.alpha * load_a(ic, kc);
    if SECOND && second {
        v = p.alpha2 * load_a2(ic, kc);
    }
    return select(0.0, v, i < p.m && kk < kn);
}

// Eight consecutive elements of B's storage (or B2's): elements 0..3 and 4..7 of a run.
struct Run {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn sg_word(word: u32) -> vec2<f32> {
    return vec2(bf16_unpack(word, false), bf16_unpack(word, true));
}

// The run at element e, all inside the operand: four word loads for bf16 B from an even element
// (five from an odd one).
fn sg_run(second: bool, e: u32) -> Run {
    if SECOND && second {
        return Run(
            vec4(b2[e], b2[e + 1u], b2[e + 2u], b2[e + 3u]),
            vec4(b2[e + 4u], b2[e + 5u], b2[e + 6u], b2[e + 7u]),
        );
    }
    if !B_BF16 {
        let lo = vec4(b[e], b[e + 1u], b[e + 2u], b[e + 3u]);
        let hi = vec4(b[e + 4u], b[e + 5u], b[e + 6u], b[e + 7u]);
        return Run(bitcast<vec4<f32>>(lo), bitcast<vec4<f32>>(hi));
    }
    let w = e >> 1u;
    if (e & 1u) == 0u {
        let w0 = sg_word(b[w]);
        let w1 = sg_word(b[w + 1u]);
        let w2 = sg_word(b[w + 2u]);
        let w3 = sg_word(b[w + 3u]);
        return Run(vec4(w0, w1), vec4(w2, w3));
    }
    let w0 = sg_word(b[w]);
    let w1 = sg_word(b[w + 1u]);
    let w2 = sg_word(b[w + 2u]);
    let w3 = sg_word(b[w + 3u]);
    let w4 = sg_word(b[w + 4u]);
    return Run(vec4(w0.y, w1, w2.x), vec4(w2.y, w3, w4.x));
}

// op(B)[kk, jj] of the first product or of the second; zero outside the product (branch-free).
fn sg_b(second: bool, kk: u32, jj: u32) -> f32 {
    let kn = sg_k(second);
    let kc = min(kk, kn - 1u);
    let jc = min(jj, p.n - 1u);
    var v = load_b(kc, jc);
    if SECOND && second {
        v = load_b2(kc, jc);
    }
    return select(0.0, v, kk < kn && jj < p.n);
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
// (k0 + x, from column j); each is contiguous in B's storage. Runs that cross an edge of the
// product read element by element, zero outside.
fn sg_block_run(second: bool, k0: u32, j: u32, x: u32) -> Run {
    let kn = sg_k(second);
    var e = p.b_off + k0 * p.ldb + j + x * p.ldb;
    if TRANS_B {
        e = p.b_off + j * p.ldb + k0 + x * p.ldb;
    }
    if SECOND && second {
        e = p.b2_off + k0 * p.ldb2 + j + x * p.ldb2;
        if TRANS_B {
            e = p.b2_off + j * p.ldb2 + k0 + x * p.ldb2;
        }
    }
    var inside = k0 + x < kn && j + 8u <= p.n;
    if TRANS_B {
        inside = k0 + SG_K <= kn && j + x < p.n;
    }
    if inside {
        return sg_run(second, e);
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

// One row's update: acc (its 8 columns as two vec4) + Σ_kk A[kk]·op(B)[kk, ..], where lane kk of
// the subgroup holds A[kk] in `a` (subgroupBroadcast takes a constant lane).
fn sg_row(acc: mat2x4<f32>, a: f32, blk: Block) -> mat2x4<f32> {
    let lo = vec4(
        subgroupBroadcast(a, 0u),
        subgroupBroadcast(a, 1u),
        subgroupBroadcast(a, 2u),
        subgroupBroadcast(a, 3u),
    );
    let hi = vec4(
        subgroupBroadcast(a, 4u),
        subgroupBroadcast(a, 5u),
        subgroupBroadcast(a, 6u),
        subgroupBroadcast(a, 7u),
    );
    return mat2x4(acc[0] + blk.q00 * lo + blk.q10 * hi, acc[1] + blk.q01 * lo + blk.q11 * hi);
}

// Stores row i of the lane's columns j..j+7 (those inside C).
fn sg_store(i: u32, j: u32, v: mat2x4<f32>) {
    store_row(i, j, v[0]);
    store_row(i, j + 4u, v[1]);
}

@compute @workgroup_size(SG_WG)
fn gemm_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let i0 = wid.y * SG_ROWS;
    let j = (wid.x * SG_WG + lid) * 8u;
    let steps1 = (p.k + SG_K - 1u) / SG_K;
    var steps = steps1;
    if SECOND {
        steps += (p.k2 + SG_K - 1u) / SG_K;
    }
    // Zero-initialised; rows past SG_ROWS are never touched and compile away.
    var acc: array<mat2x4<f32>, 32>;
    // Every lane walks every step (lanes past N compute discarded values): the broadcasts need
    // the whole subgroup.
    for (var t = 0u; t < steps; t++) {
        let second = SECOND && t >= steps1;
        var k0 = t * SG_K;
        if second {
            k0 = (t - steps1) * SG_K;
        }
        let blk = sg_block(second, k0, j);
        let ka = k0 + lane % SG_K;
        acc[0] = sg_row(acc[0], sg_a(second, i0 + 0u, ka), blk);
        acc[1] = sg_row(acc[1], sg_a(second, i0 + 1u, ka), blk);
        acc[2] = sg_row(acc[2], sg_a(second, i0 + 2u, ka), blk);
        acc[3] = sg_row(acc[3], sg_a(second, i0 + 3u, ka), blk);
        acc[4] = sg_row(acc[4], sg_a(second, i0 + 4u, ka), blk);
        acc[5] = sg_row(acc[5], sg_a(second, i0 + 5u, ka), blk);
        acc[6] = sg_row(acc[6], sg_a(second, i0 + 6u, ka), blk);
        acc[7] = sg_row(acc[7], sg_a(second, i0 + 7u, ka), blk);
        if SG_ROWS > 8u {
            acc[8] = sg_row(acc[8], sg_a(second, i0 + 8u, ka), blk);
            acc[9] = sg_row(acc[9], sg_a(second, i0 + 9u, ka), blk);
            acc[10] = sg_row(acc[10], sg_a(second, i0 + 10u, ka), blk);
            acc[11] = sg_row(acc[11], sg_a(second, i0 + 11u, ka), blk);
            acc[12] = sg_row(acc[12], sg_a(second, i0 + 12u, ka), blk);
            acc[13] = sg_row(acc[13], sg_a(second, i0 + 13u, ka), blk);
            acc[14] = sg_row(acc[14], sg_a(second, i0 + 14u, ka), blk);
            acc[15] = sg_row(acc[15], sg_a(second, i0 + 15u, ka), blk);
        }
        if SG_ROWS > 16u {
            acc[16] = sg_row(acc[16], sg_a(second, i0 + 16u, ka), blk);
            acc[17] = sg_row(acc[17], sg_a(second, i0 + 17u, ka), blk);
            acc[18] = sg_row(acc[18], sg_a(second, i0 + 18u, ka), blk);
            acc[19] = sg_row(acc[19], sg_a(second, i0 + 19u, ka), blk);
            acc[20] = sg_row(acc[20], sg_a(second, i0 + 20u, ka), blk);
            acc[21] = sg_row(acc[21], sg_a(second, i0 + 21u, ka), blk);
            acc[22] = sg_row(acc[22], sg_a(second, i0 + 22u, ka), blk);
            acc[23] = sg_row(acc[23], sg_a(second, i0 + 23u, ka), blk);
            acc[24] = sg_row(acc[24], sg_a(second, i0 + 24u, ka), blk);
            acc[25] = sg_row(acc[25], sg_a(second, i0 + 25u, ka), blk);
            acc[26] = sg_row(acc[26], sg_a(second, i0 + 26u, ka), blk);
            acc[27] = sg_row(acc[27], sg_a(second, i0 + 27u, ka), blk);
            acc[28] = sg_row(acc[28], sg_a(second, i0 + 28u, ka), blk);
            acc[29] = sg_row(acc[29], sg_a(second, i0 + 29u, ka), blk);
            acc[30] = sg_row(acc[30], sg_a(second, i0 + 30u, ka), blk);
            acc[31] = sg_row(acc[31], sg_a(second, i0 + 31u, ka), blk);
        }
    }
    sg_store(i0 + 0u, j, acc[0]);
    sg_store(i0 + 1u, j, acc[1]);
    sg_store(i0 + 2u, j, acc[2]);
    sg_store(i0 + 3u, j, acc[3]);
    sg_store(i0 + 4u, j, acc[4]);
    sg_store(i0 + 5u, j, acc[5]);
    sg_store(i0 + 6u, j, acc[6]);
    sg_store(i0 + 7u, j, acc[7]);
    if SG_ROWS > 8u {
        sg_store(i0 + 8u, j, acc[8]);
        sg_store(i0 + 9u, j, acc[9]);
        sg_store(i0 + 10u, j, acc[10]);
        sg_store(i0 + 11u, j, acc[11]);
        sg_store(i0 + 12u, j, acc[12]);
        sg_store(i0 + 13u, j, acc[13]);
        sg_store(i0 + 14u, j, acc[14]);
        sg_store(i0 + 15u, j, acc[15]);
    }
    if SG_ROWS > 16u {
        sg_store(i0 + 16u, j, acc[16]);
        sg_store(i0 + 17u, j, acc[17]);
        sg_store(i0 + 18u, j, acc[18]);
        sg_store(i0 + 19u, j, acc[19]);
        sg_store(i0 + 20u, j, acc[20]);
        sg_store(i0 + 21u, j, acc[21]);
        sg_store(i0 + 22u, j, acc[22]);
        sg_store(i0 + 23u, j, acc[23]);
        sg_store(i0 + 24u, j, acc[24]);
        sg_store(i0 + 25u, j, acc[25]);
        sg_store(i0 + 26u, j, acc[26]);
        sg_store(i0 + 27u, j, acc[27]);
        sg_store(i0 + 28u, j, acc[28]);
        sg_store(i0 + 29u, j, acc[29]);
        sg_store(i0 + 30u, j, acc[30]);
        sg_store(i0 + 31u, j, acc[31]);
    }
}
