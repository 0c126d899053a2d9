// The attention of attention.wgsl (same Params, bindings, variant constants and load helpers; the
// loader appends this file to it) for CPU adapters with subgroups: the forward (training,
// split-key and ragged) and both backward kernels. A separate file because a module that uses
// subgroup builtins needs the SUBGROUP feature even for its other entry points.
//
// A workgroup is one subgroup of 8 lanes (as in matmul_subgroup.wgsl: the broadcasts read lanes
// 0..7, so any subgroup of at least 8 holds them). Each lane owns one row (a query row and head
// in the forward and dq, a key row in dk / dv) with its head and accumulators in registers, and
// the 8 lanes walk the other side's rows together: per row, lane L loads columns L, L + 8, .. of
// it (KV8 vec4 each) and `subgroupBroadcast` hands every lane each column from registers. On
// llvmpipe that beats the rows forward (every lane loading every column itself, four rows per
// lane) by ~4x at the 0.5B shape (2x at D 128), and the tiled backward by 8.5x (1.6-2.8x;
// docs/benchmarks.md), for two reasons: a storage load costs per lane whether or not the lanes
// share its address, so eight lanes loading a row once each beat eight loading all of it; and
// with one row per lane every register array is indexed by constants only (the column groups are
// written out below), which llvmpipe needs to keep them in registers (an array it cannot resolve
// lives in per-lane scratch, each access a loop over lanes).
//
// Registers hold DP8 = 8 KV8 columns, zeros past the head. The key (or query) loop is the same
// for every lane (broadcasts need all 8): it runs to the block's last row, and a row masks what
// lies past its own causal end.

const SG_LANES: u32 = 8u;
// vec4 columns each lane loads per row, and the columns the registers hold.
const KV8: u32 = (D4 + SG_LANES - 1u) / SG_LANES;
const DP8: u32 = KV8 * SG_LANES;

alias SgRow = array<vec4<f32>, DP8>;
alias SgCols = array<vec4<f32>, KV8>;

// Whether column c lies in the head (the registers' padding reads zeros).
fn sg_in_head(c: u32) -> bool {
    return c < D4;
}

// This lane's columns lane, lane + 8, .. of the row at `at` of k, v, q and dout. One function per
// binding: a WGSL function cannot take a storage buffer, and one switching over the bindings
// would count all four as used by every entry point (naga counts untaken branches too).
fn sg_k_cols(at: u32, lane: u32) -> SgCols {
    var x: SgCols;
    for (var u = 0u; u < KV8; u++) {
        let c = u * SG_LANES + lane;
        x[u] = k_col(at, c, sg_in_head(c));
    }
    return x;
}

fn sg_v_cols(at: u32, lane: u32) -> SgCols {
    var x: SgCols;
    for (var u = 0u; u < KV8; u++) {
        let c = u * SG_LANES + lane;
        x[u] = v_col(at, c, sg_in_head(c));
    }
    return x;
}

fn sg_q_cols(at: u32, lane: u32) -> SgCols {
    var x: SgCols;
    for (var u = 0u; u < KV8; u++) {
        let c = u * SG_LANES + lane;
        x[u] = q_col(at, c, sg_in_head(c));
    }
    return x;
}

fn sg_dout_cols(at: u32, lane: u32) -> SgCols {
    var x: SgCols;
    for (var u = 0u; u < KV8; u++) {
        let c = u * SG_LANES + lane;
        x[u] = dout_col(at, c, sg_in_head(c));
    }
    return x;
}

// A whole row of k, v, q or dout at `at`, for the lane that owns it. Loops of 8 inside loops of
// KV8 rather than one of D4: small enough for llvmpipe to unroll into constant indices.
fn sg_k_row(at: u32) -> SgRow {
    var x: SgRow;
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            x[c] = k_col(at, c, sg_in_head(c));
        }
    }
    return x;
}

fn sg_v_row(at: u32) -> SgRow {
    var x: SgRow;
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            x[c] = v_col(at, c, sg_in_head(c));
        }
    }
    return x;
}

fn sg_q_row(at: u32) -> SgRow {
    var x: SgRow;
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            x[c] = q_col(at, c, sg_in_head(c));
        }
    }
    return x;
}

fn sg_dout_row(at: u32) -> SgRow {
    var x: SgRow;
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            x[c] = dout_col(at, c, sg_in_head(c));
        }
    }
    return x;
}

// x[8u..8u + 7] · (the lanes' column group y), four partial sums.
fn sg_dot8(x: ptr<function, SgRow>, u: u32, y: vec4<f32>) -> vec4<f32> {
    let c = u * SG_LANES;
    return (*x)[c] * subgroupBroadcast(y, 0u) + (*x)[c + 1u] * subgroupBroadcast(y, 1u)
        + (*x)[c + 2u] * subgroupBroadcast(y, 2u) + (*x)[c + 3u] * subgroupBroadcast(y, 3u)
        + (*x)[c + 4u] * subgroupBroadcast(y, 4u) + (*x)[c + 5u] * subgroupBroadcast(y, 5u)
        + (*x)[c + 6u] * subgroupBroadcast(y, 6u) + (*x)[c + 7u] * subgroupBroadcast(y, 7u);
}

// x[8u..8u + 7] = a x + w (the lanes' column group y).
fn sg_axpy8(x: ptr<function, SgRow>, u: u32, a: f32, w: f32, y: vec4<f32>) {
    let c = u * SG_LANES;
    (*x)[c] = (*x)[c] * a + w * subgroupBroadcast(y, 0u);
    (*x)[c + 1u] = (*x)[c + 1u] * a + w * subgroupBroadcast(y, 1u);
    (*x)[c + 2u] = (*x)[c + 2u] * a + w * subgroupBroadcast(y, 2u);
    (*x)[c + 3u] = (*x)[c + 3u] * a + w * subgroupBroadcast(y, 3u);
    (*x)[c + 4u] = (*x)[c + 4u] * a + w * subgroupBroadcast(y, 4u);
    (*x)[c + 5u] = (*x)[c + 5u] * a + w * subgroupBroadcast(y, 5u);
    (*x)[c + 6u] = (*x)[c + 6u] * a + w * subgroupBroadcast(y, 6u);
    (*x)[c + 7u] = (*x)[c + 7u] * a + w * subgroupBroadcast(y, 7u);
}

// x · y over the whole head, y spread over the lanes. The groups are written out (constant
// indices; KV8 is a constant, so the untaken ones fold away): up to 8, HEAD_DIM 256.
fn sg_dot(x: ptr<function, SgRow>, y: SgCols) -> f32 {
    var s = sg_dot8(x, 0u, y[0]);
    if KV8 > 1u {
        s += sg_dot8(x, 1u, y[min(1u, KV8 - 1u)]);
    }
    if KV8 > 2u {
        s += sg_dot8(x, 2u, y[min(2u, KV8 - 1u)]);
    }
    if KV8 > 3u {
        s += sg_dot8(x, 3u, y[min(3u, KV8 - 1u)]);
    }
    if KV8 > 4u {
        s += sg_dot8(x, 4u, y[min(4u, KV8 - 1u)]);
    }
    if KV8 > 5u {
        s += sg_dot8(x, 5u, y[min(5u, KV8 - 1u)]);
    }
    if KV8 > 6u {
        s += sg_dot8(x, 6u, y[min(6u, KV8 - 1u)]);
    }
    if KV8 > 7u {
        s += sg_dot8(x, 7u, y[min(7u, KV8 - 1u)]);
    }
    return s.x + s.y + s.z + s.w;
}

// x = a x + w y over the whole head, y spread over the lanes (groups written out as in sg_dot).
fn sg_axpy(x: ptr<function, SgRow>, a: f32, w: f32, y: SgCols) {
    sg_axpy8(x, 0u, a, w, y[0]);
    if KV8 > 1u {
        sg_axpy8(x, 1u, a, w, y[min(1u, KV8 - 1u)]);
    }
    if KV8 > 2u {
        sg_axpy8(x, 2u, a, w, y[min(2u, KV8 - 1u)]);
    }
    if KV8 > 3u {
        sg_axpy8(x, 3u, a, w, y[min(3u, KV8 - 1u)]);
    }
    if KV8 > 4u {
        sg_axpy8(x, 4u, a, w, y[min(4u, KV8 - 1u)]);
    }
    if KV8 > 5u {
        sg_axpy8(x, 5u, a, w, y[min(5u, KV8 - 1u)]);
    }
    if KV8 > 6u {
        sg_axpy8(x, 6u, a, w, y[min(6u, KV8 - 1u)]);
    }
    if KV8 > 7u {
        sg_axpy8(x, 7u, a, w, y[min(7u, KV8 - 1u)]);
    }
}

// The query rows of kv head hkv as the rows forward orders them (row f: query i_lo + f / G, head
// hkv G + f % G), 8 per workgroup: y = hkv * row blocks + block, latest (most keys) first.
struct SgQueryRow {
    // This lane's row, clamped to the last one (a lane past the end computes a copy, never stored).
    query: u32,
    head: u32,
    live: bool,
    // The last query of the block: the key loop's end.
    block_last_query: u32,
}

fn sg_query_row(wy: u32, lane: u32) -> SgQueryRow {
    let g = p.hq / p.hkv;
    let nrows = g * (p.i_hi - p.i_lo);
    let hkv = wy / p.row_blocks;
    let block = p.row_blocks - 1u - wy % p.row_blocks;
    let f = block * SG_LANES + lane;
    let fc = min(f, nrows - 1u);
    let last = min(block * SG_LANES + SG_LANES, nrows) - 1u;
    return SgQueryRow(grouped_query(fc, g), grouped_head(fc, g, hkv), f < nrows, grouped_query(last, g));
}

// Forward: as attn_fwd_rows, with one row per lane and the keys and values shared.
@compute @workgroup_size(8)
fn attn_fwd_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = p.b0 + wid.z;
    let hkv = wid.y / p.row_blocks;
    let row = sg_query_row(wid.y, lid);
    let keys = forward_keys(wid.x);
    let shift = key_count(b) - p.tq;
    let pos = shift + row.query;
    let kstop = min(keys.kend, shift + row.block_last_query + 1u);

    var qr = sg_q_row(q_at(p.q_off, b, row.query, row.head));
    let scale2 = p.scale * LOG2E;
    var acc: SgRow;
    var m = NEG;
    var l = 0.0;
    for (var j = keys.kbeg; j < kstop; j++) {
        let kl = sg_k_cols(kv_at(p.k_off, b, j, hkv), lid);
        let vl = sg_v_cols(kv_at(p.v_off, b, j, hkv), lid);
        // Online softmax in base 2, one key at a time (as attn_fwd_rows).
        let s = sg_dot(&qr, kl) * scale2;
        let seen = j <= pos;
        let top = select(m, max(m, s), seen);
        let alpha = exp2(m - top);
        let pr = select(0.0, exp2(s - top), seen);
        l = l * alpha + pr;
        m = top;
        sg_axpy(&acc, alpha, pr, vl);
    }

    if !row.live {
        return;
    }
    let r = b * p.tq + row.query - p.out_row0;
    let la = p.lse_off + keys.split * p.lse_split_stride + r * p.hq + row.head;
    let oa = p.out_off + keys.split * p.out_split_stride + r * (p.hq * HE) + row.head * HE;
    let w = row_weights(m, l, keys.merge, la);
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            var o = acc[c] * w.of_acc;
            if keys.merge {
                o += out_col(oa, c) * w.of_out;
            }
            if sg_in_head(c) {
                out_store(oa, c, o);
            }
        }
    }
    lse[la] = w.lse;
}

// Backward, dq (as attn_bwd_dq): a lane per query row, the keys and values shared; writes dq, or
// adds to it for later k/v chunks (key_lo > 0).
@compute @workgroup_size(8)
fn attn_bwd_dq_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = p.b0 + wid.z;
    let hkv = wid.y / p.row_blocks;
    let row = sg_query_row(wid.y, lid);
    let shift = p.tk - p.tq;
    let pos = shift + row.query;
    let kstop = min(p.key_hi, shift + row.block_last_query + 1u);
    let at = (b * p.tq + row.query - p.q_row0) * p.hq + row.head;
    let lse2 = lse[p.lse_off + at] * LOG2E;
    let dr = drow[p.drow_off + at];
    let scale2 = p.scale * LOG2E;

    var qr = sg_q_row(q_at(p.q_off, b, row.query, row.head));
    var dout_row = sg_dout_row(q_at(p.dout_off, b, row.query, row.head));
    var acc: SgRow;
    for (var j = p.key_lo; j < kstop; j++) {
        let kl = sg_k_cols(kv_at(p.k_off, b, j, hkv), lid);
        let vl = sg_v_cols(kv_at(p.v_off, b, j, hkv), lid);
        let s = sg_dot(&qr, kl) * scale2;
        let dp = sg_dot(&dout_row, vl);
        let ds = select(0.0, exp2(s - lse2) * (dp - dr), j <= pos);
        sg_axpy(&acc, 1.0, ds, kl);
    }

    if !row.live {
        return;
    }
    let oa = q_at(p.dq_off, b, row.query, row.head);
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            var x = acc[c] * p.scale;
            if p.key_lo > 0u {
                x += dq_col(oa, c);
            }
            if sg_in_head(c) {
                dq_store(oa, c, x);
            }
        }
    }
}

// Backward, dk and dv (as attn_bwd_dkv): a lane per key row, one workgroup per 8 keys of a kv
// head (x: key block, earliest, which most queries see, first; y: kv head); the lanes walk the
// G query heads and the queries that see the block, sharing each query's q and dout rows. Writes
// dk / dv, or adds to them for later q chunks (i_lo > 0).
@compute @workgroup_size(8)
fn attn_bwd_dkv_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = p.b0 + wid.z;
    let hkv = wid.y;
    let g = p.hq / p.hkv;
    let shift = p.tk - p.tq;
    let k0 = p.key_lo + wid.x * SG_LANES;
    let key = k0 + lid;
    let keyc = min(key, p.key_hi - 1u);
    // The first query that sees key k0.
    let i_first = max(p.i_lo, select(0u, k0 - shift, k0 > shift));
    let scale2 = p.scale * LOG2E;

    var kr = sg_k_row(kv_at(p.k_off, b, keyc, hkv));
    var vr = sg_v_row(kv_at(p.v_off, b, keyc, hkv));
    var dk_acc: SgRow;
    var dv_acc: SgRow;
    for (var hh = 0u; hh < g; hh++) {
        let head = hkv * g + hh;
        for (var i = i_first; i < p.i_hi; i++) {
            let ql = sg_q_cols(q_at(p.q_off, b, i, head), lid);
            let dl = sg_dout_cols(q_at(p.dout_off, b, i, head), lid);
            let at = (b * p.tq + i - p.q_row0) * p.hq + head;
            let lse2 = lse[p.lse_off + at] * LOG2E;
            let dr = drow[p.drow_off + at];
            let s = sg_dot(&kr, ql) * scale2;
            let pr = select(0.0, exp2(s - lse2), keyc <= shift + i);
            let ds = pr * (sg_dot(&vr, dl) - dr);
            sg_axpy(&dv_acc, 1.0, pr, dl);
            sg_axpy(&dk_acc, 1.0, ds, ql);
        }
    }

    if key >= p.key_hi {
        return;
    }
    let kat = kv_at(p.dk_off, b, key, hkv);
    let vat = kv_at(p.dv_off, b, key, hkv);
    for (var u = 0u; u < KV8; u++) {
        for (var t = 0u; t < SG_LANES; t++) {
            let c = u * SG_LANES + t;
            var xk = dk_acc[c] * p.scale;
            var xv = dv_acc[c];
            if p.i_lo > 0u {
                xk += dk_col(kat, c);
                xv += dv_col(vat, c);
            }
            if sg_in_head(c) {
                dk_store(kat, c, xk);
                dv_store(vat, c, xv);
            }
        }
    }
}
