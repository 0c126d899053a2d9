// Optimizer kernels: the global gradient norm and the AdamW / SGD updates, with torch's formulas
// in f32 (host scalars computed in f64 like Python floats, then rounded once).
//
// The norm is deterministic in two passes: sum_squares writes one partial sum per workgroup
// (a contiguous range of `per_group` elements of one chunk) to `partials[slot + group]`, and
// sum_partials adds them up in one workgroup. Every reduction is a fixed tree or a fixed loop.
//
// Gradient clipping happens inside the update (`*_clipped`): the scale comes from the norm on the
// device, so the host never waits for it. Offsets are element offsets inside the bound chunks.

struct Params {
    n: u32,
    param_off: u32,
    grad_off: u32,
    m_off: u32,
    v_off: u32,
    per_group: u32,
    slot: u32,
    lr: f32,
    weight_decay: f32,
    // AdamW: 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^step),
    // lr / (1 - beta1^step).
    decay: f32,
    m_weight: f32,
    beta2: f32,
    v_weight: f32,
    bc2_sqrt: f32,
    step_size: f32,
    eps: f32,
    max_norm: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<f32>;
// The squared global norm that clipping reads.
@group(0) @binding(5) var<storage, read> norm_sq: array<f32>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
// sum_partials' output: the squared norm.
@group(0) @binding(7) var<storage, read_write> total: array<f32>;

const WG: u32 = 256u;


@compute @workgroup_size(64)
fn sum_squares(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_group(wid, nwg);
    let first = group * p.per_group;
    if first >= p.n {
        return;
    }
    let last = min(first + p.per_group, p.n);
    var acc = 0.0;
    for (var i = first + lid; i < last; i += SUM_THREADS) {
        let g = grad[p.grad_off + i];
        acc += g * g;
    }
    let sum = workgroup_sum(lid, acc);
    if lid == 0u {
        partials[p.slot + group] = sum;
    }
}

// One workgroup: total[0] = sum of partials[0..n].
@compute @workgroup_size(64)
fn sum_partials(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i += SUM_THREADS) {
        acc += partials[i];
    }
    let sum = workgroup_sum(lid, acc);
    if lid == 0u {
        total[0] = sum;
    }
}

// torch.nn.utils.clip_grad_norm_: grads *= min(1, max_norm / (norm + 1e-6)).
fn clip_scale() -> f32 {
    return min(1.0, p.max_norm / (sqrt(norm_sq[0]) + 1e-6));
}

// torch.optim.AdamW (single-tensor): decoupled decay, then Adam with bias corrections.
fn adamw_update(i: u32, scale: f32) {
    let g = grad[p.grad_off + i] * scale;
    let w = param[p.param_off + i] * p.decay;
    // exp_avg.lerp_(g, 1 - beta1), with torch's lerp formula for either side of 0.5.
    let m0 = exp_avg[p.m_off + i];
    var m: f32;
    if p.m_weight < 0.5 {
        m = m0 + p.m_weight * (g - m0);
    } else {
        m = g - (g - m0) * (1.0 - p.m_weight);
    }
    // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    let v = exp_avg_sq[p.v_off + i] * p.beta2 + p.v_weight * g * g;
    exp_avg[p.m_off + i] = m;
    exp_avg_sq[p.v_off + i] = v;
    let denom = sqrt(v) / p.bc2_sqrt + p.eps;
    param[p.param_off + i] = w - p.step_size * (m / denom);
}

// torch.optim.SGD without momentum: coupled (L2) weight decay, g += wd * p; p -= lr * g.
fn sgd_update(i: u32, scale: f32) {
    let w = param[p.param_off + i];
    var g = grad[p.grad_off + i] * scale;
    if p.weight_decay != 0.0 {
        g += p.weight_decay * w;
    }
    param[p.param_off + i] = w - p.lr * g;
}

fn element(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element(gid, nwg);
    if i < p.n {
        adamw_update(i, 1.0);
    }
}

@compute @workgroup_size(256)
fn adamw_clipped(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element(gid, nwg);
    if i < p.n {
        adamw_update(i, clip_scale());
    }
}

@compute @workgroup_size(256)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element(gid, nwg);
    if i < p.n {
        sgd_update(i, 1.0);
    }
}

@compute @workgroup_size(256)
fn sgd_clipped(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element(gid, nwg);
    if i < p.n {
        sgd_update(i, clip_scale());
    }
}
