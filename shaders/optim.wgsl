// Optimizer kernels: the global gradient norm and the AdamW / SGD updates, with torch's formulas
// in f32 (host scalars computed in f64 like Python floats, then rounded once).
//
// One launch covers many tensors: workgroup `group` of a launch (`p.n` of them) works on
// `items[group]`, a run of one tensor's elements at word offsets in the bound buffers (each role's
// tensors packed into shared buffers).
//
// The norm is deterministic in two passes: sum_squares writes one partial sum per workgroup
// (its item's elements) to `partials[slot + group]`, and sum_partials adds them up in one
// workgroup. Every reduction is a fixed tree or a fixed loop.
//
// Gradient clipping happens inside the update (`*_clipped`): the scale comes from the norm on the
// device, so the host never waits for it.

struct Params {
    n: u32,
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

// `n` elements at these word offsets; weight decay applies where `decays` is 1 (with the
// hyperparameters in `p`). Offsets of roles a kernel does not bind are 0.
struct Item {
    n: u32,
    decays: u32,
    grad: u32,
    param: u32,
    exp_avg: u32,
    exp_avg_sq: u32,
}
@group(0) @binding(8) var<storage, read> items: array<Item>;

const UPDATE_THREADS: u32 = 256u;

@compute @workgroup_size(64)
fn sum_squares(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_group(wid, nwg);
    if group >= p.n {
        return;
    }
    let item = items[group];
    var acc = 0.0;
    for (var i = lid; i < item.n; i += SUM_THREADS) {
        let g = grad[item.grad + i];
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
fn adamw_update(item: Item, i: u32, scale: f32) {
    let g = grad[item.grad + i] * scale;
    let w = param[item.param + i] * select(1.0, p.decay, item.decays == 1u);
    // exp_avg.lerp_(g, 1 - beta1), with torch's lerp formula for either side of 0.5.
    let m0 = exp_avg[item.exp_avg + i];
    var m: f32;
    if p.m_weight < 0.5 {
        m = m0 + p.m_weight * (g - m0);
    } else {
        m = g - (g - m0) * (1.0 - p.m_weight);
    }
    // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    let v = exp_avg_sq[item.exp_avg_sq + i] * p.beta2 + p.v_weight * g * g;
    exp_avg[item.exp_avg + i] = m;
    exp_avg_sq[item.exp_avg_sq + i] = v;
    let denom = sqrt(v) / p.bc2_sqrt + p.eps;
    param[item.param + i] = w - p.step_size * (m / denom);
}

// torch.optim.SGD without momentum: coupled (L2) weight decay, g += wd * p; p -= lr * g.
fn sgd_update(item: Item, i: u32, scale: f32) {
    let w = param[item.param + i];
    var g = grad[item.grad + i] * scale;
    if item.decays == 1u && p.weight_decay != 0.0 {
        g += p.weight_decay * w;
    }
    param[item.param + i] = w - p.lr * g;
}

// The adamw update of this workgroup's item, gradients scaled by `scale` (its own function per
// rule, so that an entry point binds only what its rule reads).
fn adamw_item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, scale: f32) {
    let group = linear_group(wid, nwg);
    if group < p.n {
        let item = items[group];
        for (var i = lid; i < item.n; i += UPDATE_THREADS) {
            adamw_update(item, i, scale);
        }
    }
}

@compute @workgroup_size(256)
fn adamw(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    adamw_item(wid, nwg, lid, 1.0);
}

@compute @workgroup_size(256)
fn adamw_clipped(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    adamw_item(wid, nwg, lid, clip_scale());
}

// The sgd update of this workgroup's item, gradients scaled by `scale` (its own function per
// rule, so that an entry point binds only what its rule reads).
fn sgd_item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, scale: f32) {
    let group = linear_group(wid, nwg);
    if group < p.n {
        let item = items[group];
        for (var i = lid; i < item.n; i += UPDATE_THREADS) {
            sgd_update(item, i, scale);
        }
    }
}

@compute @workgroup_size(256)
fn sgd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    sgd_item(wid, nwg, lid, 1.0);
}

@compute @workgroup_size(256)
fn sgd_clipped(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    sgd_item(wid, nwg, lid, clip_scale());
}
