// Rotary position embedding, transformers' rotate-half convention, in place on the query and key
// activations [rows, heads * D] f32 together (their heads share each angle).
// For i < D/2 the pair (x[i], x[i + D/2]) of every head is rotated by angle = pos * inv_freq[i]:
//   x[i] <- x[i] cos - x[i + D/2] sin,   x[i + D/2] <- x[i + D/2] cos + x[i] sin.
// sign = -1 rotates by -angle (the transpose: the backward pass).

struct Params {
    // Threads: rows of this dispatch times D/2.
    n: u32,
    // Global row of the dispatch's first row (positions are looked up by global row).
    row0: u32,
    // Element offsets of that row inside the bound chunks of q and k.
    q_off: u32,
    k_off: u32,
    q_heads: u32,
    k_heads: u32,
    head_dim: u32,
    // Position of global row g: positions[g / period] + g % period. period = 1 reads one position
    // per row; period = T reads per-sequence start offsets of T consecutive rows.
    period: u32,
    sign: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> inv_freq: array<f32>;

// pi/2 split for Cody-Waite reduction: the first three parts have at most 7 significant bits, so
// j * part is exact for quadrant counts j < 2^17 (angles up to ~2e5 rad, i.e. any position a
// 131072-token context reaches); the fourth carries the remaining bits.
const PIO2_1: f32 = 1.5625;
const PIO2_2: f32 = 0.0081787109375;
const PIO2_3: f32 = 0.00011730194091796875;
const PIO2_4: f32 = 3.1391647326017846e-07;
const TWO_OVER_PI: f32 = 0.6366197466850281;

// (sin a, cos a) to about one ulp. The built-ins only promise an absolute error of 2^-11 inside
// [-pi, pi] and nothing outside it, while RoPE angles reach tens of thousands of radians, so reduce
// to [-pi/4, pi/4] here and evaluate Cephes' single-precision minimax polynomials: transformers
// takes cos/sin of the same f32 angle in (correctly rounded) f32.
fn sin_cos(a: f32) -> vec2<f32> {
    let j = round(a * TWO_OVER_PI);
    let r = (((a - j * PIO2_1) - j * PIO2_2) - j * PIO2_3) - j * PIO2_4;
    let z = r * r;
    let s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
    let c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
        - 0.5 * z + 1.0;
    switch u32(j) & 3u {
        case 0u: { return vec2(s, c); }
        case 1u: { return vec2(c, -s); }
        case 2u: { return vec2(-s, -c); }
        default: { return vec2(-c, s); }
    }
}

// One thread per (row, i < D/2); it loops over the heads of q, then of k, which share the angle.
@compute @workgroup_size(256)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_group(wid, nwg) * 256u + lid;
    if t >= p.n {
        return;
    }
    let half = p.head_dim / 2u;
    let r = t / half;
    let i = t % half;
    let g = p.row0 + r;
    let pos = positions[g / p.period] + g % p.period;
    // f32(pos) * inv_freq rounds exactly as transformers' f32 freqs = inv_freq @ position_ids.
    let sc = sin_cos(f32(pos) * inv_freq[i]);
    let s = p.sign * sc.x;
    let c = sc.y;
    var e = p.q_off + r * p.q_heads * p.head_dim + i;
    for (var h = 0u; h < p.q_heads; h++) {
        let lo = q[e];
        let hi = q[e + half];
        q[e] = lo * c - hi * s;
        q[e + half] = hi * c + lo * s;
        e += p.head_dim;
    }
    e = p.k_off + r * p.k_heads * p.head_dim + i;
    for (var h = 0u; h < p.k_heads; h++) {
        let lo = k[e];
        let hi = k[e + half];
        k[e] = lo * c - hi * s;
        k[e + half] = hi * c + lo * s;
        e += p.head_dim;
    }
}
