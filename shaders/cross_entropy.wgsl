// Cross-entropy over vocabulary chunks of LM-head logits (the logits themselves come from the GEMM in
// matmul.wgsl, one [rows, chunk] block at a time). Per-token vectors (targets, lse, sumexp,
// target_logit) are single-chunk [T] tensors indexed by the global row t = t0 + r; the logits block
// is indexed from l_off with row stride ld. Targets >= vocab (u32::MAX by convention) are ignored.

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

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
// The running max of each row while chunks stream by; its logsumexp after `finalize`.
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// The running sum of exp(logit - running max).
@group(0) @binding(4) var<storage, read_write> sumexp: array<f32>;
@group(0) @binding(5) var<storage, read_write> target_logit: array<f32>;
@group(0) @binding(6) var<storage, read_write> loss: array<f32>;
@group(0) @binding(7) var<storage, read_write> count: array<u32>;

const WG: u32 = 256u;
// A finite "minus infinity": exp(NEG_BIG - m) is 0 without inf - inf = NaN.
const NEG_BIG: f32 = -3.0e38;

var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;
var<workgroup> red_n: array<u32, 256>;

// (m, s) ⊕ (m2, s2) for sums of exponentials kept relative to their maxima.
fn merge(m: f32, s: f32, m2: f32, s2: f32) -> vec2<f32> {
    let mx = max(m, m2);
    return vec2<f32>(mx, s * exp(m - mx) + s2 * exp(m2 - mx));
}

// chunk_stats takes a row per workgroup of WG threads, reducing across them with barriers (GPUs),
// or (variant constant ROWS_PER_GROUP > 1) a row per thread and ROWS_PER_GROUP rows per workgroup
// with no barrier (CPU adapters, where barriers and per-workgroup costs outweigh a row's work).
const ROW_PER_THREAD: bool = ROWS_PER_GROUP > 1u;
const ROW_LANES: u32 = select(WG, 1u, ROW_PER_THREAD);
const STATS_GROUP: u32 = select(WG, ROWS_PER_GROUP, ROW_PER_THREAD);

// A row of the block per workgroup or thread: the chunk's max and sum of exponentials (online, one
// pass), merged into the row's running (lse, sumexp); the target's logit is kept when it lies
// here. Branch-free (a new maximum rescales by exp(m - x) and adds exp(0) = 1, as a branch would).
@compute @workgroup_size(STATS_GROUP)
fn chunk_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = linear_group(wid, nwg) * (STATS_GROUP / ROW_LANES) + lid / ROW_LANES;
    // A thread past the last row computes a copy of it and stores nothing.
    let live = row < p.rows;
    let r = min(row, p.rows - 1u);
    let lane = lid % ROW_LANES;
    let t = p.t0 + r;
    let base = p.l_off + r * p.ld;
    let tgt = targets[t];
    var m = NEG_BIG;
    var s = 0.0;
    var target_here = false;
    var target_x = 0.0;
    for (var c = lane; c < p.cols; c += ROW_LANES) {
        let x = logits[base + c];
        let top = max(m, x);
        s = s * exp(m - top) + exp(x - top);
        m = top;
        let hit = p.v0 + c == tgt;
        target_x = select(target_x, x, hit);
        target_here = target_here || hit;
    }
    if live && target_here {
        target_logit[t] = target_x;
    }
    var total = vec2<f32>(m, s);
    if !ROW_PER_THREAD {
        red_m[lid] = m;
        red_s[lid] = s;
        workgroupBarrier();
        for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
            if lid < stride {
                let merged = merge(red_m[lid], red_s[lid], red_m[lid + stride], red_s[lid + stride]);
                red_m[lid] = merged.x;
                red_s[lid] = merged.y;
            }
            workgroupBarrier();
        }
        total = vec2<f32>(red_m[0], red_s[0]);
    }
    if live && lane == 0u {
        if p.first == 0u {
            total = merge(lse[t], sumexp[t], total.x, total.y);
        }
        lse[t] = total.x;
        sumexp[t] = total.y;
    }
}

// One workgroup over all p.rows tokens: lse = max + log(sumexp), and the loss sum and supervised
// count added to loss[0] and count[0] (so calls accumulate until the caller clears them).
@compute @workgroup_size(256)
fn finalize(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    var n = 0u;
    for (var t = lid; t < p.rows; t += WG) {
        let l = lse[t] + log(sumexp[t]);
        lse[t] = l;
        if targets[t] < p.vocab {
            sum += l - target_logit[t];
            n += 1u;
        }
    }
    red_s[lid] = sum;
    red_n[lid] = n;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            red_s[lid] += red_s[lid + stride];
            red_n[lid] += red_n[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        loss[0] += red_s[0];
        count[0] += red_n[0];
    }
}

// In place over a logits block: d loss / d logit = grad_scale · (softmax - onehot(target)), and 0
// on ignored rows.
@compute @workgroup_size(256)
fn softmax_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_group(wid, nwg) * WG + lid;
    if idx >= p.rows * p.cols {
        return;
    }
    let r = idx / p.cols;
    let c = idx % p.cols;
    let t = p.t0 + r;
    let e = p.l_off + r * p.ld + c;
    let tgt = targets[t];
    var g = 0.0;
    if tgt < p.vocab {
        g = exp(logits[e] - lse[t]);
        if p.v0 + c == tgt {
            g -= 1.0;
        }
        g *= p.grad_scale;
    }
    logits[e] = g;
}
