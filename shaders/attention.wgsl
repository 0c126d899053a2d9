// Causal flash attention with grouped-query heads, f32, never an O(T^2) buffer.
//
// Activations are [B * T, H * D] row-major (sequence b's row t is row b * T + t; its heads side by
// side). Query i of a sequence sits at position tk - tq + i and sees keys 0..=tk - tq + i. Query head
// h reads kv head h / G (G = hq / hkv).
//
// Variant constants (prepended): HEAD_DIM (any even size 8..=256), EW and EL (the element of the
// [rows, H * D] bindings: vec4<f32> when HEAD_DIM % 4 = 0, else vec2<f32>), DECODE (attn_fwd only:
// rows are the G query heads of one kv head times a few queries, the grid splits the keys, and each
// split writes a partial result that attn_merge combines) and RAGGED (attn_fwd only: sequence b has
// its own key count key_lens[b] <= tk, e.g. the slots of a batched KV cache; its queries are its last
// tq positions), LANES and LANE_ROWS (attn_fwd_rows only, below).
//
// Along D the kernels work in vec4 columns c4 < D4 of a head (the last one half used when D % 4 = 2).
// Registers and workgroup memory hold DP4 = D4 rounded up to 16 columns (a multiple of 64
// elements), zeros past the head; a HEAD_DIM that is a multiple of 64 (FULL) needs no masks, so 64
// and 128 compile to unmasked kernels.
//
// The score tiles are small register-blocked matrix products. 256 threads = 16 (ty) x 16 (tx);
// thread (ty, tx) owns rows ty * RQ + a (a < RQ) and tile columns 4 tx + c (c < 4) of a score tile,
// and output columns (vec4s) tx + 16 m (m < NV4 = DP4 / 16) of an output tile, held in registers.
// Operands are staged through one workgroup array `sm` (12 KiB at D = 128, at most WebGPU's
// baseline 16 KiB at any D), re-used phase by phase:
//  - score product: A[16 d][BQ rows] and B[16 d][64 cols], transposed, one 16-wide d-slice at a time;
//  - row maxima / sums: [16 tx][BQ rows];
//  - probability x values: P[KS keys][BQ rows] and V[KS keys][DP4 vec4s].

struct Params {
    tq: u32,
    tk: u32,
    hq: u32,
    hkv: u32,
    // Sequences b0 .. b0 + (grid z); each contributes queries i_lo..i_hi and keys key_lo..key_hi,
    // the rows that lie in the bound chunks.
    b0: u32,
    i_lo: u32,
    i_hi: u32,
    key_lo: u32,
    key_hi: u32,
    // Rows per sequence in k/v (>= tk: a KV cache may hold spare rows).
    kv_cap: u32,
    // Global rows at the start of the bound query-row chunks (q, out, lse, dout, drow, dq) and key-row
    // chunks (k, v, dk, dv); the offsets below are those rows' offsets inside their chunks (EL
    // units for [rows, H * D] tensors, f32 units for [rows, H] ones).
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
    // out / lse of attn_fwd: the global row at out_off / lse_off (q_row0, or 0 in the decode
    // scratch) and the distance between two splits' slots (0 unless decoding).
    out_row0: u32,
    out_split_stride: u32,
    lse_split_stride: u32,
    // Decode: keys per split, the first split of this dispatch, row blocks per kv head, and (merge)
    // the number of splits.
    split_keys: u32,
    split_first: u32,
    row_blocks: u32,
    n_splits: u32,
    // Threads of the flat kernels (attn_merge, attn_bwd_prep).
    n: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<EL>;
@group(0) @binding(2) var<storage, read> k: array<EL>;
@group(0) @binding(3) var<storage, read> v: array<EL>;
@group(0) @binding(4) var<storage, read_write> out: array<EL>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<EL>;
@group(0) @binding(7) var<storage, read_write> drow: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<EL>;
@group(0) @binding(9) var<storage, read_write> dk: array<EL>;
@group(0) @binding(10) var<storage, read_write> dv: array<EL>;
@group(0) @binding(11) var<storage, read> part_out: array<EL>;
@group(0) @binding(12) var<storage, read> part_lse: array<f32>;
@group(0) @binding(13) var<storage, read> key_lens: array<u32>;

const RQ: u32 = select(4u, 1u, DECODE);
const BQ: u32 = 16u * RQ;
const BQ4: u32 = BQ / 4u;
const BK: u32 = 64u;
const D4: u32 = (HEAD_DIM + 3u) / 4u;
const DP4: u32 = (D4 + 15u) / 16u * 16u;
const NV4: u32 = DP4 / 16u;
const SLICES: u32 = (D4 + 3u) / 4u;
const FULL: bool = HEAD_DIM % 64u == 0u;
// Binding elements per head, per column, and from a column's first element to its upper half.
const HE: u32 = HEAD_DIM / EW;
const V4: u32 = 4u / EW;
const HI: u32 = 2u / EW;
// Keys per value-product slice and queries per dk / dv slice: fewer for the widest heads, which
// keeps `sm` within 16 KiB.
const KS: u32 = select(16u, 8u, DP4 > 48u);
const QS: u32 = select(8u, 4u, DP4 > 32u);
// vec4s of key rows each thread stages per value slice.
const NL: u32 = KS * DP4 / 256u;
// Where B of the score product and V of the value product start in `sm`.
const B_AT: u32 = 4u * BQ;
const V_AT: u32 = 4u * BQ;
// The largest phase: score operands, P and V, or attn_bwd_dkv's P, dS, dout and q slices.
const SM4: u32 = max(max(B_AT + 256u, V_AT + KS * DP4), 32u * QS + 2u * QS * DP4);
// A finite "minus infinity": exp2(NEG - m) is 0 for any real m, and NEG - NEG is 0, not NaN.
const NEG: f32 = -1.0e30;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

var<workgroup> sm: array<vec4<f32>, SM4>;

// Keys of sequence b: tk, or its own count when RAGGED. A read-only storage load is uniform, so the
// key loops that depend on it may hold barriers.
fn key_count(b: u32) -> u32 {
    if RAGGED {
        return key_lens[b];
    }
    return p.tk;
}

// The keys a forward workgroup takes: the bound k/v chunk's (key_lo..key_hi), cut to its split's
// when DECODE (x: the split within this dispatch); and whether its result merges into what out
// and lse already hold (keys of an earlier chunk of the same split came first).
struct ForwardKeys {
    split: u32,
    kbeg: u32,
    kend: u32,
    merge: bool,
}

fn forward_keys(wx: u32) -> ForwardKeys {
    var keys = ForwardKeys(0u, p.key_lo, p.key_hi, false);
    if DECODE {
        keys.split = p.split_first + wx;
        keys.kbeg = max(keys.kbeg, keys.split * p.split_keys);
        keys.kend = min(keys.kend, (keys.split + 1u) * p.split_keys);
    }
    keys.merge = p.key_lo > keys.split * p.split_keys;
    return keys;
}

// Element index of head h of query row (b, i) in a q-row chunk starting at global row q_row0.
fn q_at(off: u32, b: u32, i: u32, h: u32) -> u32 {
    return off + (b * p.tq + i - p.q_row0) * (p.hq * HE) + h * HE;
}

// Element index of kv head h of key row (b, j) in a k-row chunk starting at global row kv_row0.
fn kv_at(off: u32, b: u32, j: u32, h: u32) -> u32 {
    return off + (b * p.kv_cap + j - p.kv_row0) * (p.hkv * HE) + h * HE;
}

// Column c4 of a head from the binding elements holding its lower (lo) and upper (hi) half: zeros
// past the head's end and where !ok.
fn column(lo: EL, hi: EL, c4: u32, ok: bool) -> vec4<f32> {
    let x = vec4(lo[0], lo[1], hi[2u % EW], hi[3u % EW]);
    if FULL {
        return select(vec4(0.0), x, ok);
    }
    let lo_ok = ok && 4u * c4 < HEAD_DIM;
    let hi_ok = ok && 4u * c4 + 2u < HEAD_DIM;
    return vec4(select(vec2(0.0), x.xy, lo_ok), select(vec2(0.0), x.zw, hi_ok));
}

// Loads of column c4 of the head starting at element `at` (storage buffers cannot be passed).
fn q_col(at: u32, c4: u32, ok: bool) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(q[i], q[i + HI], c4, ok);
}

fn k_col(at: u32, c4: u32, ok: bool) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(k[i], k[i + HI], c4, ok);
}

fn v_col(at: u32, c4: u32, ok: bool) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(v[i], v[i + HI], c4, ok);
}

fn dout_col(at: u32, c4: u32, ok: bool) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(dout[i], dout[i + HI], c4, ok);
}

fn out_col(at: u32, c4: u32) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(out[i], out[i + HI], c4, true);
}

fn part_col(at: u32, c4: u32) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(part_out[i], part_out[i + HI], c4, true);
}

fn dq_col(at: u32, c4: u32) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(dq[i], dq[i + HI], c4, true);
}

fn dk_col(at: u32, c4: u32) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(dk[i], dk[i + HI], c4, true);
}

fn dv_col(at: u32, c4: u32) -> vec4<f32> {
    let i = at + c4 * V4;
    return column(dv[i], dv[i + HI], c4, true);
}

// Elements first..first + EW of x as one binding element.
fn element(x: vec4<f32>, first: u32) -> EL {
    var e: EL;
    for (var c = 0u; c < EW; c++) {
        e[c] = x[first + c];
    }
    return e;
}

// Whether column c4's lower / upper half lies in the head (stores skip the rest).
fn lo_in_head(c4: u32) -> bool {
    return FULL || 4u * c4 < HEAD_DIM;
}

fn hi_in_head(c4: u32) -> bool {
    return EW == 2u && 4u * c4 + 2u < HEAD_DIM;
}

// Stores of column c4 of the head starting at element `at` (one function per binding: a WGSL
// function cannot take a storage buffer as a parameter).
fn out_store(at: u32, c4: u32, x: vec4<f32>) {
    let i = at + c4 * V4;
    if lo_in_head(c4) {
        out[i] = element(x, 0u);
    }
    if hi_in_head(c4) {
        out[i + 1u] = element(x, 2u);
    }
}

fn dq_store(at: u32, c4: u32, x: vec4<f32>) {
    let i = at + c4 * V4;
    if lo_in_head(c4) {
        dq[i] = element(x, 0u);
    }
    if hi_in_head(c4) {
        dq[i + 1u] = element(x, 2u);
    }
}

fn dk_store(at: u32, c4: u32, x: vec4<f32>) {
    let i = at + c4 * V4;
    if lo_in_head(c4) {
        dk[i] = element(x, 0u);
    }
    if hi_in_head(c4) {
        dk[i + 1u] = element(x, 2u);
    }
}

fn dv_store(at: u32, c4: u32, x: vec4<f32>) {
    let i = at + c4 * V4;
    if lo_in_head(c4) {
        dv[i] = element(x, 0u);
    }
    if hi_in_head(c4) {
        dv[i + 1u] = element(x, 2u);
    }
}

// Stores one staged vec4 of the score product transposed: elements d0..d0+3 of row `row` of a
// [16 d][rows4 * 4] area at `base`.
fn stage_t(base: u32, rows4: u32, row: u32, d0: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        sm[base + (d0 + c) * rows4 + row / 4u][row % 4u] = x[c];
    }
}

// Component of the thread's first row inside a vec4 of rows: 0 when RQ = 4 (rows 4 ty..4 ty + 3
// fill one vec4; a constant, so the hot loops index registers statically), ty % 4 when RQ = 1.
fn row_lane(ty: u32) -> u32 {
    return select(0u, ty % 4u, RQ == 1u);
}

// acc[a][c] += sum over the staged 16-wide d-slice of A[d][ty * RQ + a] * B[d][4 tx + c].
fn slice_product(acc: ptr<function, array<vec4<f32>, RQ>>, tx: u32, ty: u32) {
    let lane = row_lane(ty);
    for (var d = 0u; d < 16u; d++) {
        let bv = sm[B_AT + d * 16u + tx];
        let av = sm[d * BQ4 + ty * RQ / 4u];
        for (var a = 0u; a < RQ; a++) {
            (*acc)[a] += av[lane + a] * bv;
        }
    }
}

// The sum (or maximum, when `is_max`) over the 16 tx threads of x[a], for the thread's RQ rows.
// Begins with a barrier (earlier readers of `sm` are done); the next writer of `sm` must barrier.
fn rows_reduce(x: array<f32, RQ>, is_max: bool, tx: u32, ty: u32) -> array<f32, RQ> {
    workgroupBarrier();
    for (var a = 0u; a < RQ; a++) {
        let r = ty * RQ + a;
        sm[tx * BQ4 + r / 4u][r % 4u] = x[a];
    }
    workgroupBarrier();
    var total: array<f32, RQ>;
    for (var a = 0u; a < RQ; a++) {
        total[a] = select(0.0, NEG, is_max);
    }
    let lane = row_lane(ty);
    for (var t = 0u; t < 16u; t++) {
        let w = sm[t * BQ4 + ty * RQ / 4u];
        for (var a = 0u; a < RQ; a++) {
            let x = w[lane + a];
            total[a] = select(total[a] + x, max(total[a], x), is_max);
        }
    }
    return total;
}

// Writes the 4 x RQ tile values `x` of this thread's tile columns into P[KS keys][BQ rows] when
// those columns fall in key slice `ks`.
fn stage_p(x: array<vec4<f32>, RQ>, ks: u32, tx: u32, ty: u32) {
    if tx / (KS / 4u) != ks {
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        let kl = 4u * (tx % (KS / 4u)) + c;
        for (var a = 0u; a < RQ; a++) {
            let r = ty * RQ + a;
            sm[kl * BQ4 + r / 4u][r % 4u] = x[a][c];
        }
    }
}

// acc[a][m] += sum over the KS staged keys of P[key][ty * RQ + a] * V[key][tx + 16 m].
fn value_product(acc: ptr<function, array<vec4<f32>, RQ * NV4>>, tx: u32, ty: u32) {
    let lane = row_lane(ty);
    for (var kk = 0u; kk < KS; kk++) {
        let pw = sm[kk * BQ4 + ty * RQ / 4u];
        for (var m = 0u; m < NV4; m++) {
            let vv = sm[V_AT + kk * DP4 + tx + 16u * m];
            for (var a = 0u; a < RQ; a++) {
                (*acc)[a * NV4 + m] += pw[lane + a] * vv;
            }
        }
    }
}

// This thread's share (NL vec4s) of rows first_key..first_key + KS of k or v for the value
// product, zeros past kend (0 * garbage could be NaN) and past the head.
fn key_rows(from_k: bool, b: u32, hkv: u32, first_key: u32, kend: u32, lid: u32) -> array<vec4<f32>, NL> {
    var x: array<vec4<f32>, NL>;
    for (var n = 0u; n < NL; n++) {
        let idx = lid + 256u * n;
        let key = first_key + idx / DP4;
        if key < kend {
            if from_k {
                x[n] = k_col(kv_at(p.k_off, b, key, hkv), idx % DP4, true);
            } else {
                x[n] = v_col(kv_at(p.v_off, b, key, hkv), idx % DP4, true);
            }
        }
    }
    return x;
}

// This thread's vec4 (idx = lid < QS * DP4) of query rows first_query..first_query + QS of dout and
// q for the dk / dv products, zeros past i_hi and past the head.
fn query_rows(b: u32, head: u32, first_query: u32, lid: u32) -> array<vec4<f32>, 2> {
    var x: array<vec4<f32>, 2>;
    let i = first_query + lid / DP4;
    if lid < QS * DP4 && i < p.i_hi {
        let at = q_at(0u, b, i, head);
        x[0] = dout_col(p.dout_off + at, lid % DP4, true);
        x[1] = q_col(p.q_off + at, lid % DP4, true);
    }
    return x;
}

// Query index of workgroup row f (prefill: one head, consecutive queries; decode: the G heads of
// one kv head for each query) and its query head.
fn row_query(f: u32, g: u32) -> u32 {
    return p.i_lo + select(f, f / g, DECODE);
}

fn row_head(f: u32, g: u32, head: u32) -> u32 {
    return select(head, head * g + f % g, DECODE);
}

// Forward: out = softmax(scale q k^T, causal) v and lse = log sum exp of the scaled scores, per
// query row and head. Grid: prefill (query blocks of BQ, hq, sequences); decode (key splits,
// hkv * row blocks, sequences). Keys key_lo..key_hi of the bound k/v chunks are folded into what
// out/lse already hold when earlier keys of the same split came first (key_lo past the split start).
@compute @workgroup_size(256)
fn attn_fwd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let b = p.b0 + wid.z;
    let g = p.hq / p.hkv;
    let nq = p.i_hi - p.i_lo;
    let scale2 = p.scale * LOG2E;
    var head: u32;
    var first: u32;
    var nrows: u32;
    let keys = forward_keys(wid.x);
    let split = keys.split;
    let kbeg = keys.kbeg;
    if DECODE {
        head = wid.y / p.row_blocks;
        first = (wid.y % p.row_blocks) * BQ;
        nrows = g * nq;
    } else {
        head = wid.y;
        // Latest (most expensive) query blocks first, for a better tail.
        first = (nwg.x - 1u - wid.x) * BQ;
        nrows = nq;
    }
    let hkv = select(head / g, head, DECODE);
    // Query i sits at key position shift + i; the causal bound below also stops at the sequence's
    // last key.
    let shift = key_count(b) - p.tq;
    let kend = min(keys.kend, shift + row_query(min(first + BQ, nrows) - 1u, g) + 1u);
    let merge = keys.merge;

    // Staging slot of this thread: row / key lid / 4, vec4 lid % 4 of a 16-wide d-slice. Rows out
    // of range read element 0 and stage zeros.
    let srow = lid / 4u;
    let spart = lid % 4u;
    let q_ok = lid < 4u * BQ && first + srow < nrows;
    var qa = 0u;
    if q_ok {
        let f = first + srow;
        qa = q_at(p.q_off, b, row_query(f, g), row_head(f, g, head));
    }

    var pos: array<u32, RQ>;
    var m: array<f32, RQ>;
    var l: array<f32, RQ>;
    var acc: array<vec4<f32>, RQ * NV4>;
    for (var a = 0u; a < RQ; a++) {
        pos[a] = shift + row_query(first + ty * RQ + a, g);
        m[a] = NEG;
    }

    for (var kt = kbeg; kt < kend; kt += BK) {
        let key_s = kt + srow;
        let k_ok = key_s < kend;
        let ka = select(0u, kv_at(p.k_off, b, key_s, hkv), k_ok);
        // Software pipelining: the global loads of the next slice are issued before the products
        // of the current one.
        var qn = q_col(qa, spart, q_ok) * scale2;
        var kn = k_col(ka, spart, k_ok);
        var s: array<vec4<f32>, RQ>;
        for (var sl = 0u; sl < SLICES; sl++) {
            workgroupBarrier();
            if lid < 4u * BQ {
                stage_t(0u, BQ4, srow, 4u * spart, qn);
            }
            stage_t(B_AT, 16u, srow, 4u * spart, kn);
            workgroupBarrier();
            if sl + 1u < SLICES {
                qn = q_col(qa, spart + 4u * sl + 4u, q_ok) * scale2;
                kn = k_col(ka, spart + 4u * sl + 4u, k_ok);
            }
            slice_product(&s, tx, ty);
        }
        // The first value slice loads during the softmax.
        var vn = key_rows(false, b, hkv, kt, kend, lid);

        // Online softmax in base 2: the row maximum over the tile, then rescale what came before.
        var tile_max: array<f32, RQ>;
        for (var a = 0u; a < RQ; a++) {
            tile_max[a] = NEG;
            for (var c = 0u; c < 4u; c++) {
                let key = kt + 4u * tx + c;
                if key < kend && key <= pos[a] {
                    tile_max[a] = max(tile_max[a], s[a][c]);
                }
            }
        }
        let row_max = rows_reduce(tile_max, true, tx, ty);
        var pr: array<vec4<f32>, RQ>;
        for (var a = 0u; a < RQ; a++) {
            let m_new = max(m[a], row_max[a]);
            let alpha = exp2(m[a] - m_new);
            m[a] = m_new;
            var sum = 0.0;
            for (var c = 0u; c < 4u; c++) {
                let key = kt + 4u * tx + c;
                if key < kend && key <= pos[a] {
                    pr[a][c] = exp2(s[a][c] - m_new);
                    sum += pr[a][c];
                }
            }
            // l is this thread's share of the row sum (its columns); reduced at the end.
            l[a] = l[a] * alpha + sum;
            for (var mm = 0u; mm < NV4; mm++) {
                acc[a * NV4 + mm] *= alpha;
            }
        }

        for (var ks = 0u; ks < BK / KS; ks++) {
            workgroupBarrier();
            stage_p(pr, ks, tx, ty);
            for (var n = 0u; n < NL; n++) {
                sm[V_AT + lid + 256u * n] = vn[n];
            }
            workgroupBarrier();
            if ks + 1u < BK / KS {
                vn = key_rows(false, b, hkv, kt + (ks + 1u) * KS, kend, lid);
            }
            value_product(&acc, tx, ty);
        }
    }

    let sum = rows_reduce(l, false, tx, ty);
    // Merging reads lse before any thread of the workgroup overwrites it.
    var w: array<RowWeights, RQ>;
    var la: array<u32, RQ>;
    var oa: array<u32, RQ>;
    for (var a = 0u; a < RQ; a++) {
        let f = first + ty * RQ + a;
        if f >= nrows {
            continue;
        }
        let row = b * p.tq + row_query(f, g) - p.out_row0;
        let h = row_head(f, g, head);
        la[a] = p.lse_off + split * p.lse_split_stride + row * p.hq + h;
        oa[a] = p.out_off + split * p.out_split_stride + row * (p.hq * HE) + h * HE;
        w[a] = row_weights(m[a], sum[a], merge, la[a]);
    }
    workgroupBarrier();
    for (var a = 0u; a < RQ; a++) {
        if first + ty * RQ + a >= nrows {
            continue;
        }
        for (var mm = 0u; mm < NV4; mm++) {
            let c4 = tx + 16u * mm;
            var o = acc[a * NV4 + mm] * w[a].of_acc;
            if merge {
                o += out_col(oa[a], c4) * w[a].of_out;
            }
            out_store(oa[a], c4, o);
        }
        if tx == 0u {
            lse[la[a]] = w[a].lse;
        }
    }
}

// A finished forward row: its log-sum-exp, and the weights of the new result (the accumulators)
// and, when merging, of the one out already holds.
struct RowWeights {
    lse: f32,
    of_acc: f32,
    of_out: f32,
}

// From the row's running maximum m (base 2) and sum of exponentials; merging reads the old lse at
// la (the caller makes sure no one has overwritten it yet).
fn row_weights(m: f32, sum: f32, merge: bool, la: u32) -> RowWeights {
    var w = RowWeights(NEG, 0.0, 0.0);
    if sum > 0.0 {
        w.lse = (m + log2(sum)) * LN2;
        w.of_acc = 1.0 / sum;
    }
    if merge {
        let lse_old = lse[la];
        let top = max(lse_old, w.lse);
        let total = top + log(exp(lse_old - top) + exp(w.lse - top));
        w.of_acc *= exp(w.lse - total);
        w.of_out = exp(lse_old - total);
        w.lse = total;
    }
    return w;
}

// Decode: combines the splits' partial (out, lse) in part_out / part_lse into out / lse. One thread
// per (row, head, column) of the bound out chunk.
@compute @workgroup_size(256)
fn attn_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_group(wid, nwg) * 256u + lid;
    if t >= p.n {
        return;
    }
    let c4 = t % D4;
    let h = (t / D4) % p.hq;
    let r = t / D4 / p.hq;
    let slot = (p.q_row0 + r) * p.hq + h;
    var top = NEG;
    for (var s = 0u; s < p.n_splits; s++) {
        top = max(top, part_lse[s * p.lse_split_stride + slot]);
    }
    var total = 0.0;
    var o = vec4(0.0);
    for (var s = 0u; s < p.n_splits; s++) {
        let w = exp(part_lse[s * p.lse_split_stride + slot] - top);
        total += w;
        o += w * part_col(s * p.out_split_stride + slot * HE, c4);
    }
    out_store(p.out_off + (r * p.hq + h) * HE, c4, o / total);
    if c4 == 0u {
        lse[p.lse_off + r * p.hq + h] = top + log(total);
    }
}

// Backward, step 1: drow = rowsum(dout * out) per (row, head), one thread each.
@compute @workgroup_size(256)
fn attn_bwd_prep(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_group(wid, nwg) * 256u + lid;
    if t >= p.n {
        return;
    }
    var acc = vec4(0.0);
    for (var c = 0u; c < D4; c++) {
        acc += out_col(p.out_off + t * HE, c) * dout_col(p.dout_off + t * HE, c, true);
    }
    drow[p.drow_off + t] = acc.x + acc.y + acc.z + acc.w;
}

// Backward, dq: one workgroup per (query block of 64, head, sequence); it recomputes the
// probabilities of every key tile the block sees and accumulates dq = scale * sum dS K, with
// dS = P * (dP - drow), dP = dout v^T. Writes dq, or adds to it for later k/v chunks (key_lo > 0).
@compute @workgroup_size(256)
fn attn_bwd_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let b = p.b0 + wid.z;
    let head = wid.y;
    let g = p.hq / p.hkv;
    let hkv = head / g;
    let nq = p.i_hi - p.i_lo;
    let scale2 = p.scale * LOG2E;
    let first = (nwg.x - 1u - wid.x) * BQ;
    let shift = p.tk - p.tq;
    let kend = min(p.key_hi, shift + p.i_lo + min(first + BQ, nq));

    let srow = lid / 4u;
    let spart = lid % 4u;
    let q_ok = first + srow < nq;
    let qa = select(0u, q_at(p.q_off, b, p.i_lo + first + srow, head), q_ok);
    let da = select(0u, q_at(p.dout_off, b, p.i_lo + first + srow, head), q_ok);

    var pos: array<u32, RQ>;
    var lse2: array<f32, RQ>;
    var dr: array<f32, RQ>;
    for (var a = 0u; a < RQ; a++) {
        let f = first + ty * RQ + a;
        pos[a] = shift + p.i_lo + f;
        if f < nq {
            let at = (b * p.tq + p.i_lo + f - p.q_row0) * p.hq + head;
            lse2[a] = lse[p.lse_off + at] * LOG2E;
            dr[a] = drow[p.drow_off + at];
        }
    }
    var acc: array<vec4<f32>, RQ * NV4>;

    for (var kt = p.key_lo; kt < kend; kt += BK) {
        let key_s = kt + srow;
        let k_ok = key_s < kend;
        let ka = select(0u, kv_at(p.k_off, b, key_s, hkv), k_ok);
        let va = select(0u, kv_at(p.v_off, b, key_s, hkv), k_ok);
        var s: array<vec4<f32>, RQ>;
        var dp: array<vec4<f32>, RQ>;
        var an = q_col(qa, spart, q_ok) * scale2;
        var bn = k_col(ka, spart, k_ok);
        for (var sl = 0u; sl < SLICES; sl++) {
            workgroupBarrier();
            stage_t(0u, BQ4, srow, 4u * spart, an);
            stage_t(B_AT, 16u, srow, 4u * spart, bn);
            workgroupBarrier();
            // The next slice, then dP's first one.
            if sl + 1u < SLICES {
                an = q_col(qa, spart + 4u * sl + 4u, q_ok) * scale2;
                bn = k_col(ka, spart + 4u * sl + 4u, k_ok);
            } else {
                an = dout_col(da, spart, q_ok);
                bn = v_col(va, spart, k_ok);
            }
            slice_product(&s, tx, ty);
        }
        for (var sl = 0u; sl < SLICES; sl++) {
            workgroupBarrier();
            stage_t(0u, BQ4, srow, 4u * spart, an);
            stage_t(B_AT, 16u, srow, 4u * spart, bn);
            workgroupBarrier();
            if sl + 1u < SLICES {
                an = dout_col(da, spart + 4u * sl + 4u, q_ok);
                bn = v_col(va, spart + 4u * sl + 4u, k_ok);
            }
            slice_product(&dp, tx, ty);
        }
        var kn = key_rows(true, b, hkv, kt, kend, lid);
        var ds: array<vec4<f32>, RQ>;
        for (var a = 0u; a < RQ; a++) {
            for (var c = 0u; c < 4u; c++) {
                let key = kt + 4u * tx + c;
                if key < kend && key <= pos[a] {
                    ds[a][c] = exp2(s[a][c] - lse2[a]) * (dp[a][c] - dr[a]);
                }
            }
        }
        for (var ks = 0u; ks < BK / KS; ks++) {
            workgroupBarrier();
            stage_p(ds, ks, tx, ty);
            for (var n = 0u; n < NL; n++) {
                sm[V_AT + lid + 256u * n] = kn[n];
            }
            workgroupBarrier();
            if ks + 1u < BK / KS {
                kn = key_rows(true, b, hkv, kt + (ks + 1u) * KS, kend, lid);
            }
            value_product(&acc, tx, ty);
        }
    }

    for (var a = 0u; a < RQ; a++) {
        let f = first + ty * RQ + a;
        if f >= nq {
            continue;
        }
        let row = q_at(p.dq_off, b, p.i_lo + f, head);
        for (var mm = 0u; mm < NV4; mm++) {
            let c4 = tx + 16u * mm;
            var x = acc[a * NV4 + mm] * p.scale;
            if p.key_lo > 0u {
                x += dq_col(row, c4);
            }
            dq_store(row, c4, x);
        }
    }
}

// Backward, dk and dv: one workgroup per (block of 64 keys, kv head, sequence); it loops over the G
// query heads of the group and the query tiles that see its keys, recomputing the probabilities:
// dv = sum P^T dout, dk = scale * sum dS^T q. Here thread rows are keys (ty * 4 + a) and tile
// columns are queries (RQ = 4: no DECODE). Writes dk / dv, or adds to them for later q chunks
// (i_lo > 0).
@compute @workgroup_size(256)
fn attn_bwd_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let b = p.b0 + wid.z;
    let hkv = wid.y;
    let g = p.hq / p.hkv;
    let scale2 = p.scale * LOG2E;
    let k0 = p.key_lo + wid.x * BK;
    let shift = p.tk - p.tq;
    // The first query that sees key k0.
    let i_first = max(p.i_lo, select(0u, k0 - shift, k0 > shift));

    let srow = lid / 4u;
    let spart = lid % 4u;
    let k_ok = k0 + srow < p.key_hi;
    let ka = select(0u, kv_at(p.k_off, b, k0 + srow, hkv), k_ok);
    let va = select(0u, kv_at(p.v_off, b, k0 + srow, hkv), k_ok);

    var dk_acc: array<vec4<f32>, 4u * NV4>;
    var dv_acc: array<vec4<f32>, 4u * NV4>;
    for (var hh = 0u; hh < g; hh++) {
        let head = hkv * g + hh;
        for (var qt = i_first; qt < p.i_hi; qt += 64u) {
            let q_ok = qt + srow < p.i_hi;
            let qa = select(0u, q_at(p.q_off, b, qt + srow, head), q_ok);
            let da = select(0u, q_at(p.dout_off, b, qt + srow, head), q_ok);
            var st: array<vec4<f32>, RQ>;
            var dpt: array<vec4<f32>, RQ>;
            var an = k_col(ka, spart, k_ok);
            var bn = q_col(qa, spart, q_ok) * scale2;
            for (var sl = 0u; sl < SLICES; sl++) {
                workgroupBarrier();
                stage_t(0u, 16u, srow, 4u * spart, an);
                stage_t(B_AT, 16u, srow, 4u * spart, bn);
                workgroupBarrier();
                if sl + 1u < SLICES {
                    an = k_col(ka, spart + 4u * sl + 4u, k_ok);
                    bn = q_col(qa, spart + 4u * sl + 4u, q_ok) * scale2;
                } else {
                    an = v_col(va, spart, k_ok);
                    bn = dout_col(da, spart, q_ok);
                }
                slice_product(&st, tx, ty);
            }
            for (var sl = 0u; sl < SLICES; sl++) {
                workgroupBarrier();
                stage_t(0u, 16u, srow, 4u * spart, an);
                stage_t(B_AT, 16u, srow, 4u * spart, bn);
                workgroupBarrier();
                if sl + 1u < SLICES {
                    an = v_col(va, spart + 4u * sl + 4u, k_ok);
                    bn = dout_col(da, spart + 4u * sl + 4u, q_ok);
                }
                slice_product(&dpt, tx, ty);
            }
            var rows_n = query_rows(b, head, qt, lid);
            var pt: array<vec4<f32>, 4>;
            var dst: array<vec4<f32>, 4>;
            for (var c = 0u; c < 4u; c++) {
                let i = qt + 4u * tx + c;
                if i >= p.i_hi {
                    continue;
                }
                let at = (b * p.tq + i - p.q_row0) * p.hq + head;
                let lse2 = lse[p.lse_off + at] * LOG2E;
                let dr = drow[p.drow_off + at];
                for (var a = 0u; a < 4u; a++) {
                    let key = k0 + 4u * ty + a;
                    if key < p.key_hi && key <= shift + i {
                        pt[a][c] = exp2(st[a][c] - lse2);
                        dst[a][c] = pt[a][c] * (dpt[a][c] - dr);
                    }
                }
            }
            // dv += P^T dout and dk += dS^T q over slices of QS queries: P and dS as [QS][64 keys]
            // at 0 and 16 QS, dout and q rows as [QS][D] after them.
            for (var qs = 0u; qs < 64u / QS; qs++) {
                workgroupBarrier();
                if tx / (QS / 4u) == qs {
                    for (var c = 0u; c < 4u; c++) {
                        let ql = 4u * (tx % (QS / 4u)) + c;
                        sm[ql * 16u + ty] = vec4(pt[0][c], pt[1][c], pt[2][c], pt[3][c]);
                        sm[16u * QS + ql * 16u + ty] = vec4(dst[0][c], dst[1][c], dst[2][c], dst[3][c]);
                    }
                }
                if lid < QS * DP4 {
                    sm[32u * QS + lid] = rows_n[0];
                    sm[32u * QS + QS * DP4 + lid] = rows_n[1];
                }
                workgroupBarrier();
                if qs + 1u < 64u / QS {
                    rows_n = query_rows(b, head, qt + (qs + 1u) * QS, lid);
                }
                for (var qq = 0u; qq < QS; qq++) {
                    let pw = sm[qq * 16u + ty];
                    let dw = sm[16u * QS + qq * 16u + ty];
                    for (var mm = 0u; mm < NV4; mm++) {
                        let dov = sm[32u * QS + qq * DP4 + tx + 16u * mm];
                        let qv = sm[32u * QS + QS * DP4 + qq * DP4 + tx + 16u * mm];
                        for (var a = 0u; a < 4u; a++) {
                            dv_acc[a * NV4 + mm] += pw[a] * dov;
                            dk_acc[a * NV4 + mm] += dw[a] * qv;
                        }
                    }
                }
            }
        }
    }

    for (var a = 0u; a < 4u; a++) {
        let key = k0 + 4u * ty + a;
        if key >= p.key_hi {
            continue;
        }
        let kat = kv_at(p.dk_off, b, key, hkv);
        let vat = kv_at(p.dv_off, b, key, hkv);
        for (var mm = 0u; mm < NV4; mm++) {
            let c4 = tx + 16u * mm;
            var xk = dk_acc[a * NV4 + mm] * p.scale;
            var xv = dv_acc[a * NV4 + mm];
            if p.i_lo > 0u {
                xk += dk_col(kat, c4);
                xv += dv_col(vat, c4);
            }
            dk_store(kat, c4, xk);
            dv_store(vat, c4, xv);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rows forward (CPU adapters: docs/architecture.md, Attention). An invocation owns LANE_ROWS
// query rows of one kv head (the G heads of a query side by side, as DECODE orders them) with
// their heads and accumulators in registers, and streams the keys and values itself as whole
// vec4 columns. No workgroup memory and no barriers: on llvmpipe each memory operation and each
// barrier costs while an FMA is nearly free, so every loaded vec4 feeds 4 LANE_ROWS FMAs.
// LANE_ROWS and LANES (the workgroup size) are prepended by the launcher.

// Query index and query head of row f of kv head hkv.
fn grouped_query(f: u32, g: u32) -> u32 {
    return p.i_lo + f / g;
}

fn grouped_head(f: u32, g: u32, hkv: u32) -> u32 {
    return hkv * g + f % g;
}

// Forward: as attn_fwd (same grid meaning of x: key splits when DECODE), with y = hkv * row
// blocks of LANES * LANE_ROWS rows.

@compute @workgroup_size(LANES)
fn attn_fwd_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = p.b0 + wid.z;
    let g = p.hq / p.hkv;
    let nrows = g * (p.i_hi - p.i_lo);
    let scale2 = p.scale * LOG2E;
    let hkv = wid.y / p.row_blocks;
    // Latest (most expensive) row blocks first, for a better tail.
    let block = p.row_blocks - 1u - wid.y % p.row_blocks;
    let first = (block * LANES + lid) * LANE_ROWS;
    let keys = forward_keys(wid.x);
    let split = keys.split;
    let kend = keys.kend;
    let merge = keys.merge;
    let shift = key_count(b) - p.tq;

    var qr: array<array<vec4<f32>, D4>, LANE_ROWS>;
    var acc: array<array<vec4<f32>, D4>, LANE_ROWS>;
    var pos: array<u32, LANE_ROWS>;
    var m: array<f32, LANE_ROWS>;
    var l: array<f32, LANE_ROWS>;
    // One past the last key any of this lane's rows sees.
    var lane_end = keys.kbeg;
    for (var r = 0u; r < LANE_ROWS; r++) {
        m[r] = NEG;
        let f = first + r;
        if f < nrows {
            pos[r] = shift + grouped_query(f, g);
            lane_end = max(lane_end, min(kend, pos[r] + 1u));
            let at = q_at(p.q_off, b, grouped_query(f, g), grouped_head(f, g, hkv));
            for (var c = 0u; c < D4; c++) {
                qr[r][c] = q_col(at, c, true) * scale2;
            }
        }
    }

    for (var j = keys.kbeg; j < lane_end; j++) {
        let ka = kv_at(p.k_off, b, j, hkv);
        let va = kv_at(p.v_off, b, j, hkv);
        var dot: array<vec4<f32>, LANE_ROWS>;
        for (var c = 0u; c < D4; c++) {
            let kc = k_col(ka, c, true);
            for (var r = 0u; r < LANE_ROWS; r++) {
                dot[r] += qr[r][c] * kc;
            }
        }
        // Online softmax in base 2, one key at a time: the rescale rides on the accumulation's
        // FMA (acc alpha + p v), cheaper here than a block of scores kept in memory.
        var alpha: array<f32, LANE_ROWS>;
        var pr: array<f32, LANE_ROWS>;
        for (var r = 0u; r < LANE_ROWS; r++) {
            let sr = dot[r].x + dot[r].y + dot[r].z + dot[r].w;
            let seen = j <= pos[r];
            let top = select(m[r], max(m[r], sr), seen);
            alpha[r] = exp2(m[r] - top);
            pr[r] = select(0.0, exp2(sr - top), seen);
            l[r] = l[r] * alpha[r] + pr[r];
            m[r] = top;
        }
        for (var c = 0u; c < D4; c++) {
            let vc = v_col(va, c, true);
            for (var r = 0u; r < LANE_ROWS; r++) {
                acc[r][c] = acc[r][c] * alpha[r] + pr[r] * vc;
            }
        }
    }

    for (var r = 0u; r < LANE_ROWS; r++) {
        let f = first + r;
        if f >= nrows {
            continue;
        }
        let row = b * p.tq + grouped_query(f, g) - p.out_row0;
        let h = grouped_head(f, g, hkv);
        let la = p.lse_off + split * p.lse_split_stride + row * p.hq + h;
        let oa = p.out_off + split * p.out_split_stride + row * (p.hq * HE) + h * HE;
        let w = row_weights(m[r], l[r], merge, la);
        for (var c = 0u; c < D4; c++) {
            var o = acc[r][c] * w.of_acc;
            if merge {
                o += out_col(oa, c) * w.of_out;
            }
            out_store(oa, c, o);
        }
        lse[la] = w.lse;
    }
}
