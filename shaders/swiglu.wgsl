// SwiGLU of Qwen2's MLP: h = silu(g) * u elementwise over [T, I], silu(g) = g * sigmoid(g); the
// backward gives dg and du from dh. Flat kernels over one chunk of each tensor; `*_off` are
// element offsets inside the bound chunks.

struct Params {
    n: u32,
    g_off: u32,
    u_off: u32,
    dh_off: u32,
    // h (forward) or dg (backward).
    out_off: u32,
    du_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> dh: array<f32>;
// h (forward) or dg (backward).
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> du: array<f32>;

const WG: u32 = 256u;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

@compute @workgroup_size(256)
fn swiglu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    let gate = g[p.g_off + i];
    out[p.out_off + i] = gate * sigmoid(gate) * u[p.u_off + i];
}

// dg = dh * u * s * (1 + g * (1 - s)) with s = sigmoid(g) (torch's silu backward); du = dh * silu(g).
@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n {
        return;
    }
    let gate = g[p.g_off + i];
    let grad = dh[p.dh_off + i];
    let s = sigmoid(gate);
    out[p.out_off + i] = grad * u[p.u_off + i] * s * (1.0 + gate * (1.0 - s));
    du[p.du_off + i] = grad * (gate * s);
}
