// RMSNorm (Qwen2): y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), all in f32.
// Forward (plain, or fused with the residual add before it) and dX run a row per workgroup or
// per thread (ROW_PER_THREAD, below) with a reduction over the row. The weight is bf16 (two per
// word) or f32 (bit patterns) as W_BF16 says. dW = sum_t dy * (x * rstd) over rows is deterministic in two
// passes: rmsnorm_dw_partial writes one row of column sums per block of
// rows into a scratch tensor, and elementwise.wgsl's sum_rows adds those rows in order.
// Offsets are element offsets inside the bound chunks; rstd is one chunk indexed by row.

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    // dX = computed + beta * dX; beta = 0 never reads dX (it may hold garbage).
    beta: f32,
    x_off: u32,
    dy_off: u32,
    out_off: u32,
    rstd_off: u32,
    block_rows: u32,
    sum_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
// y (forward), dX (backward) or the dW partial sums.
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// add_rmsnorm_forward: the residual sum x + dy that it normalises.
@group(0) @binding(6) var<storage, read_write> sum: array<f32>;

// A row per workgroup of WG = 64 threads reducing across them with two barriers (8 * 8, see
// workgroup_sum: GPUs), or (variant constant ROWS_PER_GROUP > 1) a row per thread and
// ROWS_PER_GROUP rows per workgroup with no barrier (CPU adapters, where barriers and
// per-workgroup costs outweigh a row's work). The sums run in different orders, so the two differ
// in the last bits.
const WG: u32 = 64u;
const ROW_PER_THREAD: bool = ROWS_PER_GROUP > 1u;
const ROW_LANES: u32 = select(WG, 1u, ROW_PER_THREAD);
const GROUP: u32 = select(WG, ROWS_PER_GROUP, ROW_PER_THREAD);

fn weight(i: u32) -> f32 {
    if W_BF16 {
        return bf16_unpack(w[i >> 1u], (i & 1u) == 1u);
    }
    return bitcast<f32>(w[i]);
}

// The row a thread works on (clamped to the last: a thread past the end computes a copy of it and
// stores nothing), its first column, and whether it stores.
struct RowThread {
    row: u32,
    lane: u32,
    live: bool,
}

fn row_thread(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> RowThread {
    let row = linear_group(wid, nwg) * (GROUP / ROW_LANES) + lid / ROW_LANES;
    return RowThread(min(row, p.rows - 1u), lid % ROW_LANES, row < p.rows);
}

// The sum of `v` over a row's threads. Workgroup-uniform control flow (the barriers).
fn row_sum(lid: u32, v: f32) -> f32 {
    if ROW_PER_THREAD {
        return v;
    }
    return workgroup_sum(lid, v);
}

@compute @workgroup_size(GROUP)
fn rmsnorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = row_thread(wid, nwg, lid);
    let xr = p.x_off + t.row * p.cols;
    var squares = 0.0;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        let v = x[xr + c];
        squares += v * v;
    }
    let r = 1.0 / sqrt(row_sum(lid, squares) / f32(p.cols) + p.eps);
    if !t.live {
        return;
    }
    if t.lane == 0u {
        rstd[p.rstd_off + t.row] = r;
    }
    let yr = p.out_off + t.row * p.cols;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        out[yr + c] = weight(c) * (x[xr + c] * r);
    }
}

// sum = x + dy (the residual add that precedes each of Qwen2's norms), then y = rmsnorm(sum) as
// rmsnorm_forward computes it, bit for bit: one launch instead of two. Each thread reads back only
// the sums it wrote itself, so no barrier is needed between the passes.
@compute @workgroup_size(GROUP)
fn add_rmsnorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = row_thread(wid, nwg, lid);
    let xr = p.x_off + t.row * p.cols;
    let dr = p.dy_off + t.row * p.cols;
    let sr = p.sum_off + t.row * p.cols;
    var squares = 0.0;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        let v = x[xr + c] + dy[dr + c];
        if t.live {
            sum[sr + c] = v;
        }
        squares += v * v;
    }
    let r = 1.0 / sqrt(row_sum(lid, squares) / f32(p.cols) + p.eps);
    if !t.live {
        return;
    }
    if t.lane == 0u {
        rstd[p.rstd_off + t.row] = r;
    }
    let yr = p.out_off + t.row * p.cols;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        out[yr + c] = weight(c) * (sum[sr + c] * r);
    }
}

// dx_i = rstd * (w_i dy_i - x_i * rstd^2 * mean_j(w_j dy_j x_j)).
@compute @workgroup_size(GROUP)
fn rmsnorm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = row_thread(wid, nwg, lid);
    let xr = p.x_off + t.row * p.cols;
    let dyr = p.dy_off + t.row * p.cols;
    let r = rstd[p.rstd_off + t.row];
    var wdx = 0.0;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        wdx += weight(c) * dy[dyr + c] * x[xr + c];
    }
    let k = r * r * (row_sum(lid, wdx) / f32(p.cols));
    if !t.live {
        return;
    }
    let dxr = p.out_off + t.row * p.cols;
    for (var c = t.lane; c < p.cols; c += ROW_LANES) {
        let g = r * (weight(c) * dy[dyr + c] - x[xr + c] * k);
        if p.beta == 0.0 {
            out[dxr + c] = g;
        } else {
            out[dxr + c] = g + p.beta * out[dxr + c];
        }
    }
}

// 256 columns per workgroup (x), one workgroup row (y) per block of `block_rows` rows: writes
// the sum over the block of dy * (x * rstd) to row `wid.y` of the partial sums. No barriers, so
// the wider workgroup costs nothing.
@compute @workgroup_size(256)
fn rmsnorm_dw_partial(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let c = gid.x;
    if c >= p.cols {
        return;
    }
    let first = wid.y * p.block_rows;
    let last = min(first + p.block_rows, p.rows);
    var acc = 0.0;
    for (var t = first; t < last; t++) {
        acc += dy[p.dy_off + t * p.cols + c] * (x[p.x_off + t * p.cols + c] * rstd[p.rstd_off + t]);
    }
    out[p.out_off + wid.y * p.cols + c] = acc;
}
