// Elementwise and small reduction kernels: residual add, axpy, scale, bf16 <-> f32, bias-grad sums,
// seeded dropout, row copies and scatters.
// Flat kernels see one chunk of each tensor; `*_off` are element offsets inside the bound chunk.

struct Params {
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
    alpha: f32,
    beta: f32,
    cols: u32,
    rows: u32,
    // dropout: the mask's seed, its drop threshold (p·2³²) and the tensor-wide element index of
    // element 0 of this launch. scatter_rows: first is the global row of the bound out chunk's row
    // 0 (and rows its row count).
    seed: u32,
    threshold: u32,
    first: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> a_bf16: array<u32>;
@group(0) @binding(5) var<storage, read_write> out_bf16: array<u32>;
@group(0) @binding(6) var<storage, read> row_index: array<u32>;

const WG: u32 = 256u;

// out = alpha * a + beta * b (residual add: alpha = beta = 1).
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    out[p.out_off + i] = p.alpha * a[p.a_off + i] + p.beta * b[p.b_off + i];
}

// out = alpha * a + beta * out, in place (gradient accumulation, scaling with alpha = 0).
@compute @workgroup_size(256)
fn axpby(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    let o = p.out_off + i;
    out[o] = p.alpha * a[p.a_off + i] + p.beta * out[o];
}

// out = bf16 a, widened to f32 (full fine-tuning's f32 master weights from a bf16 checkpoint).
@compute @workgroup_size(256)
fn bf16_to_f32(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    let e = p.a_off + i;
    out[p.out_off + i] = bf16_unpack(a_bf16[e >> 1u], (e & 1u) == 1u);
}

// out_bf16 = round(a): one thread per output word, so no two threads write the same word.
// The launcher requires an even row length, so offsets and n are even.
@compute @workgroup_size(256)
fn f32_to_bf16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = gid.x + gid.y * nwg.x * WG;
    let first = 2u * w;
    if first >= p.n {
        return;
    }
    let lo = bf16_round(a[p.a_off + first]);
    let hi = bf16_round(a[p.a_off + first + 1u]);
    out_bf16[(p.out_off + first) >> 1u] = lo | (hi << 16u);
}

// out[c] = alpha * sum_r a[r, c] + beta * out[c]: bias gradients, one thread per column.
@compute @workgroup_size(256)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.cols {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        acc += a[p.a_off + r * p.cols + c];
    }
    out[p.out_off + c] = p.alpha * acc + p.beta * out[p.out_off + c];
}

// PCG-RXS-M-XS hash (Jarzynski and Olano, "Hash Functions for GPU Rendering", JCGT 2020).
fn pcg_hash(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Inverted dropout: out = (kept ? alpha * a : 0) + beta * out, alpha = 1 / (1 - p). Element e of
// the tensor is kept iff hash(hash(e) ^ seed) >= threshold: a counter-based mask that any launch
// regenerates exactly (forward, recomputation, backward) without storing it.
@compute @workgroup_size(256)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    let o = p.out_off + i;
    var v = 0.0;
    if pcg_hash(pcg_hash(p.first + i) ^ p.seed) >= p.threshold {
        v = p.alpha * a[p.a_off + i];
    }
    // beta = 0 overwrites without reading, so stale NaNs in out cannot leak in.
    if p.beta != 0.0 {
        v += p.beta * out[o];
    }
    out[o] = v;
}

// out[out_off + i] = out[a_off + i]: a copy between two ranges of one chunk that do not overlap
// (moving rows inside a tensor). One binding: a buffer cannot be bound read-only and read-write in
// the same dispatch.
@compute @workgroup_size(256)
fn copy_within(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    out[p.out_off + i] = out[p.a_off + i];
}

// Row t / cols of a (from a_off) goes to global row row_index[b_off + t / cols] of out, written only
// when that row lies in the bound out chunk (rows first .. first + rows): the indices live on the
// device, so each chunk of out gets a launch that writes the rows landing in it.
@compute @workgroup_size(256)
fn scatter_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * WG;
    if t >= p.n {
        return;
    }
    let r = row_index[p.b_off + t / p.cols];
    if r < p.first || r - p.first >= p.rows {
        return;
    }
    out[p.out_off + (r - p.first) * p.cols + t % p.cols] = a[p.a_off + t];
}
