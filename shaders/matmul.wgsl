// General matrix product C = op(A)·op(B) [+ alpha2·A2·op(B2)] (+ bias) + beta·C, the one GEMM that
// linear layers, LoRA and the LM head all use.
//
// Variant constants (prepended by the launcher):
//   TRANS_A  A is stored [K, M] (op(A) = Aᵀ), else [M, K]
//   TRANS_B  B is stored [N, K] (op(B) = Bᵀ, a weight in its [out, in] layout), else [K, N]
//   B_BF16   B holds bf16 pairs in u32 words, else f32 bit patterns
//   BIAS     add bias[j] to every row
//   SECOND   a second product A2 [M, K2] (row-major) · op(B2) (B2 laid out like B, f32), scaled by
//            alpha2 and accumulated in the same registers: LoRA's y = x·Wᵀ + s·u·Bᵀ in one launch.
// Offsets are element offsets (also for bf16 B) of op-element (0, 0) inside the bound chunk; the
// launcher splits operands at chunk boundaries, so every index here stays inside one binding.

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

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> a2: array<f32>;
@group(0) @binding(6) var<storage, read> b2: array<f32>;

// op(A)[i, kk] and op(B)[kk, j] of the first product.
fn load_a(i: u32, kk: u32) -> f32 {
    if TRANS_A {
        return a[p.a_off + kk * p.lda + i];
    }
    return a[p.a_off + i * p.lda + kk];
}

fn load_b(kk: u32, j: u32) -> f32 {
    var e = p.b_off + kk * p.ldb + j;
    if TRANS_B {
        e = p.b_off + j * p.ldb + kk;
    }
    if B_BF16 {
        return bf16_unpack(b[e >> 1u], (e & 1u) == 1u);
    }
    return bitcast<f32>(b[e]);
}

// The second product's operands.
fn load_a2(i: u32, kk: u32) -> f32 {
    return a2[p.a2_off + i * p.lda2 + kk];
}

fn load_b2(kk: u32, j: u32) -> f32 {
    if TRANS_B {
        return b2[p.b2_off + j * p.ldb2 + kk];
    }
    return b2[p.b2_off + kk * p.ldb2 + j];
}

// Final value of C[i, j] given the scaled product sum.
fn store_c(i: u32, j: u32, sum: f32) {
    let idx = p.c_off + i * p.ldc + j;
    var v = sum;
    if BIAS {
        v += bias[p.bias_off + j];
    }
    // beta = 0 overwrites without reading, so stale NaNs in C cannot leak in.
    if p.beta != 0.0 {
        v += p.beta * c[idx];
    }
    c[idx] = v;
}

// Tiled kernel: a 32×256 tile of C per workgroup of 64 threads; thread t owns the 32 rows of
// columns 4t..4t+3 (a 32×4 register block). All threads read the same A values (a broadcast from
// workgroup memory, which CPU drivers turn into one scalar load since the address is uniform) and
// their own B vec4: 9 vec4 workgroup loads per 128 FMAs. Both operands are staged per K-step of 8
// with consecutive threads walking each operand's contiguous dimension, so global reads coalesce
// for every layout, and each staged B element serves 32 rows (per-lane memory operations are what
// costs most on lavapipe, whose SIMD lanes gather one element at a time).
const TM: u32 = 32u;
const TN: u32 = 256u;
const TK: u32 = 8u;
const WG: u32 = 64u;
// B rows are padded by one vec4 so the transposing stores of a [N, K] weight spread over banks.
const B_STRIDE: u32 = TN / 4u + 1u;
var<workgroup> a_tile: array<vec4<f32>, 64>; // [TK][TM / 4]
var<workgroup> b_tile: array<vec4<f32>, 520>; // [TK][B_STRIDE]

// Stages K-step `t` (of either product) into the tiles; elements past an edge are zero.
fn load_tiles(t: u32, tiles1: u32, i0: u32, j0: u32, lid: u32) {
    let second = SECOND && t >= tiles1;
    var k0 = t * TK;
    var kn = p.k;
    var scale = p.alpha;
    if second {
        k0 = (t - tiles1) * TK;
        kn = p.k2;
        scale = p.alpha2;
    }
    for (var q = 0u; q < TM * TK / WG; q++) {
        let e = lid + WG * q;
        var ii = e / TK;
        var kk = e % TK;
        if TRANS_A && !second {
            ii = e % TM;
            kk = e / TM;
        }
        var v = 0.0;
        if i0 + ii < p.m && k0 + kk < kn {
            if second {
                v = load_a2(i0 + ii, k0 + kk);
            } else {
                v = load_a(i0 + ii, k0 + kk);
            }
        }
        a_tile[kk * (TM / 4u) + ii / 4u][ii % 4u] = scale * v;
    }
    for (var q = 0u; q < TN * TK / WG; q++) {
        let e = lid + WG * q;
        var jj = e % TN;
        var kk = e / TN;
        if TRANS_B {
            jj = e / TK;
            kk = e % TK;
        }
        var w = 0.0;
        if j0 + jj < p.n && k0 + kk < kn {
            if second {
                w = load_b2(k0 + kk, j0 + jj);
            } else {
                w = load_b(k0 + kk, j0 + jj);
            }
        }
        b_tile[kk * B_STRIDE + jj / 4u][jj % 4u] = w;
    }
}

@compute @workgroup_size(64)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i0 = wid.y * TM;
    let j0 = wid.x * TN;
    let tiles1 = (p.k + TK - 1u) / TK;
    var tiles = tiles1;
    if SECOND {
        tiles += (p.k2 + TK - 1u) / TK;
    }
    // Zero-initialised; indexed only by constants so that it lives in registers.
    var acc: array<vec4<f32>, 32>;
    for (var t = 0u; t < tiles; t++) {
        load_tiles(t, tiles1, i0, j0, lid);
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let bv = b_tile[kk * B_STRIDE + lid];
            for (var r4 = 0u; r4 < TM / 4u; r4++) {
                let av = a_tile[kk * (TM / 4u) + r4];
                acc[4u * r4] += av.x * bv;
                acc[4u * r4 + 1u] += av.y * bv;
                acc[4u * r4 + 2u] += av.z * bv;
                acc[4u * r4 + 3u] += av.w * bv;
            }
        }
        workgroupBarrier();
    }
    let j = j0 + 4u * lid;
    // Constant indices only: a loop here would force `acc` out of registers on some drivers.
    store_rows(i0 + 0u, j, acc[0], acc[1], acc[2], acc[3]);
    store_rows(i0 + 4u, j, acc[4], acc[5], acc[6], acc[7]);
    store_rows(i0 + 8u, j, acc[8], acc[9], acc[10], acc[11]);
    store_rows(i0 + 12u, j, acc[12], acc[13], acc[14], acc[15]);
    store_rows(i0 + 16u, j, acc[16], acc[17], acc[18], acc[19]);
    store_rows(i0 + 20u, j, acc[20], acc[21], acc[22], acc[23]);
    store_rows(i0 + 24u, j, acc[24], acc[25], acc[26], acc[27]);
    store_rows(i0 + 28u, j, acc[28], acc[29], acc[30], acc[31]);
}

// Stores C[i..i+4, j..j+4] (the elements inside C).
fn store_rows(i: u32, j: u32, r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>) {
    store_row(i, j, r0);
    store_row(i + 1u, j, r1);
    store_row(i + 2u, j, r2);
    store_row(i + 3u, j, r3);
}

fn store_row(i: u32, j: u32, v: vec4<f32>) {
    if i >= p.m {
        return;
    }
    for (var cc = 0u; cc < 4u; cc++) {
        if j + cc < p.n {
            store_c(i, j + cc, v[cc]);
        }
    }
}

// Few-row kernel for decode's y = x·Wᵀ (TRANS_B, !TRANS_A, !SECOND, M ≤ GV_ROWS): the tiled
// kernel would spend a 32-row tile on 1..4 rows. Thread t owns column j of the block and walks K
// in pairs with all threads on the same kk, so each A load has a workgroup-uniform address (one
// scalar load on CPU drivers) and each thread reads its W row once, two bf16 per u32 word, feeding
// all M rows from registers.
const GV_ROWS: u32 = 8u;

// W[j, kk] and W[j, kk + 1] (the second only meaningful when kk + 1 < K).
fn load_b_pair(j: u32, kk: u32) -> vec2<f32> {
    let e = p.b_off + j * p.ldb + kk;
    if !B_BF16 {
        return vec2(bitcast<f32>(b[e]), bitcast<f32>(b[e + 1u]));
    }
    let w = b[e >> 1u];
    if (e & 1u) == 0u {
        return vec2(bf16_unpack(w, false), bf16_unpack(w, true));
    }
    return vec2(bf16_unpack(w, true), bf16_unpack(b[(e >> 1u) + 1u], false));
}

@compute @workgroup_size(64)
fn gemv(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    // Clamped, not returned from, so all threads keep walking K together; stores are guarded.
    let jr = min(j, p.n - 1u);
    var acc: array<f32, GV_ROWS>;
    for (var kk = 0u; kk < p.k; kk += 2u) {
        var w = load_b_pair(jr, kk);
        if kk + 1u >= p.k {
            w.y = 0.0;
        }
        // Constant trip count: unrolled, so `acc` stays in registers.
        for (var r = 0u; r < GV_ROWS; r++) {
            if r < p.m {
                let ar = p.a_off + r * p.lda + kk;
                var a1 = 0.0;
                if kk + 1u < p.k {
                    a1 = a[ar + 1u];
                }
                acc[r] += a[ar] * w.x + a1 * w.y;
            }
        }
    }
    if j < p.n {
        for (var r = 0u; r < GV_ROWS; r++) {
            if r < p.m {
                store_c(r, j, p.alpha * acc[r]);
            }
        }
    }
}

// One thread per output, straight from global memory: the benchmark's baseline.
@compute @workgroup_size(16, 16)
fn gemm_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y;
    let j = gid.x;
    if i >= p.m || j >= p.n {
        return;
    }
    var sum = 0.0;
    for (var kk = 0u; kk < p.k; kk++) {
        sum += load_a(i, kk) * load_b(kk, j);
    }
    sum *= p.alpha;
    if SECOND {
        var sum2 = 0.0;
        for (var kk = 0u; kk < p.k2; kk++) {
            sum2 += load_a2(i, kk) * load_b2(kk, j);
        }
        sum += p.alpha2 * sum2;
    }
    store_c(i, j, sum);
}
