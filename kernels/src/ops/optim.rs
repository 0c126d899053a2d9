//! Optimizer kernels (`shaders/optim.wgsl`): the global gradient norm, AdamW and SGD steps with
//! gradient clipping on the device.
//!
//! The updates follow torch's single-tensor implementations: scalars the host derives (bias
//! corrections, `1 - lr·wd`) are computed in f64 like Python floats and rounded to f32 once; the
//! tensor math is f32. Clipping is `torch.nn.utils.clip_grad_norm_`: the update kernels read the
//! squared norm that [`grad_norm_sq`] left on the device and scale the gradient by
//! `min(1, max_norm / (norm + 1e-6))`, so a step needs no round trip to the host. A NaN or
//! infinite gradient makes the norm NaN or infinite; the trainer reads it to stop (the clip scale
//! of a NaN norm is not defined).
//!
//! Each launch walks a table of per-workgroup items (a run of one tensor's elements, at word
//! offsets in the bound buffers), so the tensors of a role packed into shared buffers
//! ([`Tensor::packed`], as the trainer allocates them) take one launch per kernel, however many
//! they are; the norm's partial sums keep the order and extent they would have tensor by tensor.
use anyhow::{bail, Result};

use super::check::{max_error, random, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult, ModelShape};
use crate::gpu::{linear_groups, Gpu};
use crate::shader::{params, Kernel, OPTIM};
use crate::tensor::{row_segments, Chunk, DType, Tensor};

params!(
    OPTIM,
    #[derive(Default)]
    struct Params {
        n: u32,
        slot: u32,
        lr: f32,
        weight_decay: f32,
        decay: f32,
        m_weight: f32,
        beta2: f32,
        v_weight: f32,
        bc2_sqrt: f32,
        step_size: f32,
        eps: f32,
        max_norm: f32,
    }
);

/// At most this many partial sums for the norm: `sum_partials` runs in one 64-thread workgroup,
/// so each of its threads adds at most 64 of them.
const MAX_PARTIALS: usize = 4096;
/// Fewest gradient elements per 64-thread `sum_squares` workgroup (32 per thread).
const MIN_PER_GROUP: usize = 2048;
/// Elements per 256-thread update workgroup (16 per thread).
const UPDATE_PER_GROUP: usize = 4096;

/// torch.optim.AdamW hyperparameters for one step (Python floats, hence f64).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 for the first step (bias corrections).
    pub step: u32,
}

/// The update rule of an optimizer step.
#[derive(Clone, Copy, Debug)]
pub enum Optimizer {
    AdamW(AdamW),
    /// torch.optim.SGD without momentum.
    Sgd {
        lr: f64,
        weight_decay: f64,
    },
}

/// One trainable tensor for [`update`]: its values, its gradient and (AdamW) its two moments, all
/// f32 of one shape, and whether weight decay applies to it.
#[derive(Clone, Copy)]
pub struct Trainable<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    /// exp_avg and exp_avg_sq under AdamW; None under SGD.
    pub moments: Option<(&'a Tensor, &'a Tensor)>,
    pub decays: bool,
}

pub fn variants() -> Vec<Kernel> {
    [
        "sum_squares",
        "sum_partials",
        "adamw",
        "adamw_clipped",
        "sgd",
        "sgd_clipped",
    ]
    .into_iter()
    .map(|entry| Kernel::new(&OPTIM, entry))
    .collect()
}

/// A run of `len` elements at the same place in each of N f32 tensors of one shape (bound in the
/// order of the shader's bindings: grad, param, exp_avg, exp_avg_sq): each tensor's chunk and the
/// word offset of the run in the chunk's buffer.
struct Span<'t, const N: usize> {
    chunks: [&'t Chunk; N],
    offsets: [u32; N],
    len: usize,
    decays: bool,
}

/// The spans of `tensors` (one per row segment, see [`row_segments`]).
fn spans<'t, const N: usize>(tensors: [&'t Tensor; N], decays: bool) -> Vec<Span<'t, N>> {
    let row_len = tensors[0].row_len();
    row_segments(tensors[0].rows(), &tensors)
        .into_iter()
        .map(|rows| {
            let at = tensors.map(|t| t.row(rows.start));
            Span {
                chunks: at.map(|r| r.buffer),
                offsets: at.map(|r| r.buffer.first_word() + r.offset),
                len: rows.len() * row_len,
                decays,
            }
        })
        .collect()
}

/// One workgroup's work, as the shader's `Item`: `n` elements at these word offsets, and whether
/// weight decay applies.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Item {
    n: u32,
    decays: u32,
    offsets: [u32; 4],
}

/// Records `kernel` over `spans` in `per_group` elements or fewer per workgroup, one launch per
/// run of consecutive spans that lie in the same buffers (one launch for tensors packed
/// together, [`Tensor::packed`]). Workgroup `g` of a launch reads its [`Item`] from a table
/// (the last binding, after the spans' chunks and `extra`) and, for a reduction, owns slot
/// `slot + g`, `slot` counting the workgroups of the launches before it.
fn launch_spans<const N: usize>(
    batch: &mut Batch,
    kernel: &Kernel,
    base: Params,
    spans: &[Span<N>],
    per_group: usize,
    extra: &[&Chunk],
) -> Result<()> {
    let mut slot = 0;
    for run in spans.chunk_by(|a, b| (0..N).all(|i| a.chunks[i].buffer == b.chunks[i].buffer)) {
        let mut items = Vec::new();
        for span in run {
            for first in (0..span.len).step_by(per_group) {
                let mut offsets = [0; 4];
                for (o, &at) in offsets.iter_mut().zip(&span.offsets) {
                    *o = at + first as u32;
                }
                items.push(Item {
                    n: per_group.min(span.len - first) as u32,
                    decays: span.decays as u32,
                    offsets,
                });
            }
        }
        let table = Tensor::table(batch.gpu, bytemuck::cast_slice(&items))?;
        let whole = run[0].chunks.map(Chunk::buffer_binding);
        let mut buffers: Vec<&Chunk> = whole.iter().collect();
        buffers.extend_from_slice(extra);
        buffers.push(&table.chunks()[0]);
        let params = Params {
            n: items.len() as u32,
            slot: slot as u32,
            ..base
        };
        let groups = linear_groups(batch.gpu, items.len() as u32);
        batch.dispatch(kernel, &params, &buffers, groups)?;
        batch.keep(table);
        slot += items.len();
    }
    Ok(())
}

/// `out[0] = Σ g²` over every element of every tensor in `grads` (f32; `out` [1] f32), the
/// squared global L2 norm. Deterministic: per-workgroup partial sums of each tensor in order in
/// a scratch tensor, then one workgroup adds them in a fixed order. Tensors packed together
/// ([`Tensor::packed`]) are summed by one launch.
pub fn grad_norm_sq(batch: &mut Batch, grads: &[&Tensor], out: &Tensor) -> Result<()> {
    out.expect("grad_norm_sq out", &[1], Some(DType::F32))?;
    if grads.is_empty() {
        bail!("grad_norm_sq: no gradients given");
    }
    let mut pieces = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        if g.dtype() != DType::F32 {
            bail!("grad_norm_sq: grads[{i}] is {:?}, expected F32", g.dtype());
        }
        pieces.extend(spans([*g], false));
    }
    // Each piece rounds its last workgroup up: size the groups so that the partials fit the
    // budget even then (and the scratch fits one binding).
    let budget = MAX_PARTIALS.min(batch.gpu.max_binding_bytes as usize / 4);
    if pieces.len() >= budget {
        bail!(
            "grad_norm_sq: {} gradient chunks exceed the {budget} partial sums available",
            pieces.len()
        );
    }
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let per_group = total.div_ceil(budget - pieces.len()).max(MIN_PER_GROUP);
    let slots: usize = pieces.iter().map(|p| p.len.div_ceil(per_group)).sum();
    let partials = Tensor::zeros(batch.gpu, &[slots], DType::F32)?;
    let kernel = Kernel::new(&OPTIM, "sum_squares");
    let extra = [&partials.chunks()[0]];
    launch_spans(
        batch,
        &kernel,
        Params::default(),
        &pieces,
        per_group,
        &extra,
    )?;
    let params = Params {
        n: slots as u32,
        ..Params::default()
    };
    batch.dispatch(
        &Kernel::new(&OPTIM, "sum_partials"),
        &params,
        &[&partials.chunks()[0], &out.chunks()[0]],
        [1, 1, 1],
    )?;
    batch.keep(partials);
    Ok(())
}

/// Checks the clip input; returns the norm tensor and max_norm.
fn check_clip(clip: Option<(&Tensor, f64)>) -> Result<Option<(&Tensor, f32)>> {
    let Some((norm_sq, max_norm)) = clip else {
        return Ok(None);
    };
    norm_sq.expect("clip norm_sq", &[1], Some(DType::F32))?;
    if max_norm.is_nan() || max_norm <= 0.0 {
        bail!("clip: max_norm must be positive, got {max_norm}");
    }
    Ok(Some((norm_sq, max_norm as f32)))
}

/// One optimizer step on every tensor of `tensors`, as torch's single-tensor implementations do
/// it tensor by tensor: AdamW (`p *= 1 - lr·wd`, then Adam with bias corrections) or SGD without
/// momentum (`g += wd·p`, `p -= lr·g`), weight decay only where the tensor decays. With `clip =
/// Some((norm_sq, max_norm))`, each gradient is first scaled as `clip_grad_norm_(max_norm)`
/// would, from the squared global norm on the device (see [`grad_norm_sq`]); the gradients
/// themselves are left unchanged. Tensors packed together ([`Tensor::packed`], each role in its
/// own buffers) are updated by one launch.
pub fn update(
    batch: &mut Batch,
    tensors: &[Trainable],
    optimizer: &Optimizer,
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    let clip = check_clip(clip)?;
    let extra: Vec<&Chunk> = clip.iter().map(|c| &c.0.chunks()[0]).collect();
    let base = Params {
        max_norm: clip.map_or(0.0, |c| c.1),
        ..Params::default()
    };
    match *optimizer {
        Optimizer::AdamW(hyper) => {
            if hyper.step == 0 {
                bail!("adamw: step counts from 1");
            }
            let mut pieces = Vec::new();
            for (i, t) in tensors.iter().enumerate() {
                let Some((m, v)) = t.moments else {
                    bail!("adamw: tensor {i} has no moments");
                };
                let roles = [("grad", t.grad), ("exp_avg", m), ("exp_avg_sq", v)];
                check_roles(i, t.param, &roles)?;
                pieces.extend(spans([t.grad, t.param, m, v], t.decays));
            }
            let step = hyper.step as i32;
            let params = Params {
                lr: hyper.lr as f32,
                decay: (1.0 - hyper.lr * hyper.weight_decay) as f32,
                m_weight: (1.0 - hyper.beta1) as f32,
                beta2: hyper.beta2 as f32,
                v_weight: (1.0 - hyper.beta2) as f32,
                bc2_sqrt: (1.0 - hyper.beta2.powi(step)).sqrt() as f32,
                step_size: (hyper.lr / (1.0 - hyper.beta1.powi(step))) as f32,
                eps: hyper.eps as f32,
                ..base
            };
            let entry = if clip.is_some() {
                "adamw_clipped"
            } else {
                "adamw"
            };
            let kernel = Kernel::new(&OPTIM, entry);
            launch_spans(batch, &kernel, params, &pieces, UPDATE_PER_GROUP, &extra)?;
        }
        Optimizer::Sgd { lr, weight_decay } => {
            let mut pieces = Vec::new();
            for (i, t) in tensors.iter().enumerate() {
                if t.moments.is_some() {
                    bail!("sgd: tensor {i} has moments; SGD without momentum keeps none");
                }
                check_roles(i, t.param, &[("grad", t.grad)])?;
                pieces.extend(spans([t.grad, t.param], t.decays));
            }
            let params = Params {
                lr: lr as f32,
                weight_decay: weight_decay as f32,
                ..base
            };
            let entry = if clip.is_some() { "sgd_clipped" } else { "sgd" };
            let kernel = Kernel::new(&OPTIM, entry);
            launch_spans(batch, &kernel, params, &pieces, UPDATE_PER_GROUP, &extra)?;
        }
    }
    Ok(())
}

/// Checks that tensor `i`'s param is f32 and each of its other roles has the param's shape.
fn check_roles(i: usize, param: &Tensor, roles: &[(&str, &Tensor)]) -> Result<()> {
    param.expect(
        &format!("tensor {i} param"),
        param.shape(),
        Some(DType::F32),
    )?;
    for (role, t) in roles {
        t.expect(
            &format!("tensor {i} {role}"),
            param.shape(),
            Some(DType::F32),
        )?;
    }
    Ok(())
}

/// f64 references of the same formulas.
pub mod cpu {
    use super::AdamW;

    pub fn norm_sq(grads: &[Vec<f64>]) -> f64 {
        grads.iter().flatten().map(|g| g * g).sum()
    }

    /// The factor `clip_grad_norm_` multiplies the gradients by.
    pub fn clip_scale(norm_sq: f64, max_norm: f64) -> f64 {
        (max_norm / (norm_sq.sqrt() + 1e-6)).min(1.0)
    }

    pub fn adamw(
        param: &mut [f64],
        grad: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        hyper: &AdamW,
        scale: f64,
    ) {
        let step = hyper.step as i32;
        let bc1 = 1.0 - hyper.beta1.powi(step);
        let bc2 = 1.0 - hyper.beta2.powi(step);
        for i in 0..param.len() {
            let g = grad[i] * scale;
            param[i] *= 1.0 - hyper.lr * hyper.weight_decay;
            m[i] = hyper.beta1 * m[i] + (1.0 - hyper.beta1) * g;
            v[i] = hyper.beta2 * v[i] + (1.0 - hyper.beta2) * g * g;
            param[i] -= hyper.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + hyper.eps);
        }
    }

    pub fn sgd(param: &mut [f64], grad: &[f64], lr: f64, weight_decay: f64, scale: f64) {
        for (p, g) in param.iter_mut().zip(grad) {
            *p -= lr * (g * scale + weight_decay * *p);
        }
    }
}

/// How a check allocates its tensors: each in its own buffers, or each role's tensors packed
/// together ([`Tensor::packed`]), so that one launch covers them all.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    Separate,
    Packed,
}

/// The squared global norm over random gradients of the given shapes against [`cpu::norm_sq`].
pub fn check_grad_norm(gpu: &Gpu, shapes: &[&[usize]], layout: Layout, seed: u64) -> Result<Check> {
    let grads = random_tensors(shapes, seed);
    let tensors = upload(gpu, shapes, &grads, layout)?;
    let out = Tensor::zeros(gpu, &[1], DType::F32)?;
    let mut batch = gpu.batch();
    grad_norm_sq(&mut batch, &tensors.iter().collect::<Vec<_>>(), &out)?;
    batch.submit();
    let elements: usize = grads.iter().map(Vec::len).sum();
    Ok(Check {
        kernel: "grad_norm_sq".into(),
        shape: format!("{} tensors {layout:?}, {elements} el", shapes.len()),
        max_err: max_error(&out.to_f32(gpu)?, &[cpu::norm_sq(&grads)]),
        tolerance: 1e-6,
    })
}

/// `steps` optimizer steps (fresh random gradients each step, the global norm, the update with
/// clipping at `max_norm` if given) over parameters of the given shapes, every third one exempt
/// from weight decay, against [`cpu`]: the final parameters (and for AdamW the moments) of all
/// tensors together.
pub fn check_steps(
    gpu: &Gpu,
    shapes: &[&[usize]],
    layout: Layout,
    optimizer: Optimizer,
    max_norm: Option<f64>,
    (steps, seed): (u32, u64),
) -> Result<Vec<Check>> {
    let mut params_cpu = random_tensors(shapes, seed);
    let zeros: Vec<Vec<f64>> = params_cpu.iter().map(|p| vec![0.0; p.len()]).collect();
    let (mut m_cpu, mut v_cpu) = (zeros.clone(), zeros.clone());
    let params = upload(gpu, shapes, &params_cpu, layout)?;
    let (m, v) = (
        upload(gpu, shapes, &zeros, layout)?,
        upload(gpu, shapes, &zeros, layout)?,
    );
    let decays = |i: usize| i % 3 != 2;
    let norm = Tensor::zeros(gpu, &[1], DType::F32)?;
    for step in 1..=steps {
        let grads_cpu = random_tensors(shapes, seed + 100 * step as u64);
        let grads = upload(gpu, shapes, &grads_cpu, layout)?;
        let scale = max_norm.map_or(1.0, |max| cpu::clip_scale(cpu::norm_sq(&grads_cpu), max));
        let optimizer = match optimizer {
            Optimizer::AdamW(hyper) => Optimizer::AdamW(AdamW { step, ..hyper }),
            sgd => sgd,
        };
        let trainables: Vec<Trainable> = (0..shapes.len())
            .map(|i| Trainable {
                param: &params[i],
                grad: &grads[i],
                moments: matches!(optimizer, Optimizer::AdamW(_)).then(|| (&m[i], &v[i])),
                decays: decays(i),
            })
            .collect();
        let mut batch = gpu.batch();
        grad_norm_sq(&mut batch, &grads.iter().collect::<Vec<_>>(), &norm)?;
        update(
            &mut batch,
            &trainables,
            &optimizer,
            max_norm.map(|max| (&norm, max)),
        )?;
        batch.submit();
        for i in 0..shapes.len() {
            match optimizer {
                Optimizer::AdamW(hyper) => {
                    let weight_decay = if decays(i) { hyper.weight_decay } else { 0.0 };
                    cpu::adamw(
                        &mut params_cpu[i],
                        &grads_cpu[i],
                        &mut m_cpu[i],
                        &mut v_cpu[i],
                        &AdamW {
                            weight_decay,
                            ..hyper
                        },
                        scale,
                    );
                }
                Optimizer::Sgd { lr, weight_decay } => {
                    let weight_decay = if decays(i) { weight_decay } else { 0.0 };
                    cpu::sgd(&mut params_cpu[i], &grads_cpu[i], lr, weight_decay, scale);
                }
            }
        }
    }
    let download = |tensors: &[Tensor]| -> Result<Vec<f32>> {
        Ok(tensors
            .iter()
            .map(|t| t.to_f32(gpu))
            .collect::<Result<Vec<_>>>()?
            .concat())
    };
    let (name, moments) = match optimizer {
        Optimizer::AdamW(_) => ("adamw", true),
        Optimizer::Sgd { .. } => ("sgd", false),
    };
    let elements: usize = params_cpu.iter().map(Vec::len).sum();
    let clip = max_norm.map_or("no clip".to_string(), |m| format!("clip {m}"));
    let label = format!("{elements} el {layout:?}, {steps} steps, {clip}");
    let check = |what: &str, gpu_values: Vec<f32>, cpu_values: &[Vec<f64>]| Check {
        kernel: format!("{name} {what}"),
        shape: label.clone(),
        max_err: max_error(&gpu_values, &cpu_values.concat()),
        tolerance: 2e-6,
    };
    let mut checks = vec![check("param", download(&params)?, &params_cpu)];
    if moments {
        checks.push(check("exp_avg", download(&m)?, &m_cpu));
        checks.push(check("exp_avg_sq", download(&v)?, &v_cpu));
    }
    Ok(checks)
}

/// Values in [-1, 1) for each shape.
fn random_tensors(shapes: &[&[usize]], seed: u64) -> Vec<Vec<f64>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| to_f64(&random(seed + i as u64, s.iter().product(), 1.0)))
        .collect()
}

/// f32 tensors of `shapes` holding `values`, allocated as `layout` says.
fn upload(
    gpu: &Gpu,
    shapes: &[&[usize]],
    values: &[Vec<f64>],
    layout: Layout,
) -> Result<Vec<Tensor>> {
    let tensors = match layout {
        Layout::Separate => shapes
            .iter()
            .map(|s| Tensor::zeros(gpu, s, DType::F32))
            .collect::<Result<Vec<_>>>()?,
        Layout::Packed => {
            let shapes: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
            Tensor::packed(gpu, &shapes, DType::F32)?
        }
    };
    for (t, v) in tensors.iter().zip(values) {
        t.write_f32(gpu, &v.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
    }
    Ok(tensors)
}

/// torch.optim.AdamW's defaults, at a learning rate that moves parameters visibly.
pub const TEST_ADAMW: AdamW = AdamW {
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
    step: 1,
};

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let shapes: &[&[usize]] = &[&[37, 130], &[5000], &[3, 1]];
    let sgd = Optimizer::Sgd {
        lr: 0.1,
        weight_decay: 0.01,
    };
    let mut checks = Vec::new();
    for layout in [Layout::Separate, Layout::Packed] {
        checks.push(check_grad_norm(gpu, shapes, layout, 1)?);
        let adamw = Optimizer::AdamW(TEST_ADAMW);
        checks.extend(check_steps(gpu, shapes, layout, adamw, Some(1.0), (3, 2))?);
        checks.extend(check_steps(gpu, shapes, layout, sgd, Some(1.0), (2, 3))?);
    }
    Ok(checks)
}

/// The parameter shapes of one decoder layer of `m`: LoRA r = 16 on all seven projections
/// (A [r, in], B [out, r]), or the full layer (weights, q/k/v biases, two norms).
fn layer_shapes(m: &ModelShape, lora: bool) -> Vec<Vec<usize>> {
    let (q, kv) = (m.heads * m.head_dim, m.kv_heads * m.head_dim);
    let linears = [
        (q, m.hidden),
        (kv, m.hidden),
        (kv, m.hidden),
        (m.hidden, q),
        (m.intermediate, m.hidden),
        (m.intermediate, m.hidden),
        (m.hidden, m.intermediate),
    ];
    if lora {
        return linears
            .iter()
            .flat_map(|&(out, inp)| [vec![16, inp], vec![out, 16]])
            .collect();
    }
    let mut shapes: Vec<Vec<usize>> = linears.iter().map(|&(out, inp)| vec![out, inp]).collect();
    shapes.extend([vec![q], vec![kv], vec![kv], vec![m.hidden], vec![m.hidden]]);
    shapes
}

/// The global norm and a clipped AdamW step over a LoRA-sized and a full layer-sized parameter
/// set of the first (smallest) shape. Minimal bytes: the norm reads each gradient once; AdamW reads param, grad and
/// both moments and writes param and both moments.
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let model = &config.shapes[0];
    for (lora, name) in [(true, "LoRA r=16"), (false, "full")] {
        let shapes = layer_shapes(model, lora);
        // Each role packed, as the trainer allocates them.
        let zeros = || Tensor::packed(gpu, &shapes, DType::F32);
        let (params, grads, m, v) = (zeros()?, zeros()?, zeros()?, zeros()?);
        let norm = Tensor::zeros(gpu, &[1], DType::F32)?;
        let elements: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let label = format!(
            "{} layer {name}: {} tensors, {:.2}M",
            model.name,
            shapes.len(),
            elements as f64 / 1e6
        );
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        let norm_time = time(gpu, config.reps, |b| grad_norm_sq(b, &grad_refs, &norm))?;
        results.push(BenchResult {
            kernel: "grad_norm_sq".into(),
            shape: label.clone(),
            time: norm_time,
            flops: 0.0,
            bytes: 4.0 * elements as f64,
        });
        let adamw = Optimizer::AdamW(AdamW {
            step: 10,
            ..TEST_ADAMW
        });
        let trainables: Vec<Trainable> = (0..shapes.len())
            .map(|i| Trainable {
                param: &params[i],
                grad: &grads[i],
                moments: Some((&m[i], &v[i])),
                decays: true,
            })
            .collect();
        let step_time = time(gpu, config.reps, |b| {
            update(b, &trainables, &adamw, Some((&norm, 1.0)))
        })?;
        results.push(BenchResult {
            kernel: "adamw clipped".into(),
            shape: label,
            time: step_time,
            flops: 0.0,
            bytes: 28.0 * elements as f64,
        });
    }
    Ok(results)
}
