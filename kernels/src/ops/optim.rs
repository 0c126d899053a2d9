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
use anyhow::{bail, Result};

use super::check::{max_error, random, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult, ModelShape};
use crate::gpu::{linear_groups, Gpu};
use crate::shader::{params, Kernel, OPTIM};
use crate::tensor::{row_segments, DType, Tensor};

params!(
    OPTIM,
    #[derive(Default)]
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

/// `out[0] = Σ g²` over every element of every tensor in `grads` (f32; `out` [1] f32), the
/// squared global L2 norm. Deterministic: per-workgroup partial sums in a scratch tensor, then
/// one workgroup adds them in a fixed order.
pub fn grad_norm_sq(batch: &mut Batch, grads: &[&Tensor], out: &Tensor) -> Result<()> {
    out.expect("grad_norm_sq out", &[1], Some(DType::F32))?;
    if grads.is_empty() {
        bail!("grad_norm_sq: no gradients given");
    }
    // (chunk, element offset, elements) for every chunk of every gradient.
    let mut pieces = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        if g.dtype() != DType::F32 {
            bail!("grad_norm_sq: grads[{i}] is {:?}, expected F32", g.dtype());
        }
        for seg in row_segments(g.rows(), &[g]) {
            let at = g.row(seg.start);
            pieces.push((at.buffer, at.offset, seg.len() * g.row_len()));
        }
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
    let total: usize = pieces.iter().map(|p| p.2).sum();
    let per_group = total.div_ceil(budget - pieces.len()).max(MIN_PER_GROUP);
    let slots: usize = pieces.iter().map(|p| p.2.div_ceil(per_group)).sum();
    let partials = Tensor::zeros(batch.gpu, &[slots], DType::F32)?;
    let kernel = Kernel::new(&OPTIM, "sum_squares");
    let mut slot = 0;
    for (buffer, offset, n) in pieces {
        let groups = n.div_ceil(per_group);
        let params = Params {
            n: n as u32,
            grad_off: offset,
            per_group: per_group as u32,
            slot: slot as u32,
            ..Params::default()
        };
        batch.dispatch(
            &kernel,
            &params,
            &[buffer, &partials.chunks()[0]],
            linear_groups(batch.gpu, groups as u32),
        )?;
        slot += groups;
    }
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

/// Checks the shapes of an update and the clip input; returns the norm tensor and max_norm.
fn check_update<'a>(
    tensors: &[(&str, &Tensor)],
    clip: Option<(&'a Tensor, f64)>,
) -> Result<Option<(&'a Tensor, f32)>> {
    let (_, param) = tensors[0];
    for (role, t) in tensors {
        t.expect(role, param.shape(), Some(DType::F32))?;
    }
    let Some((norm_sq, max_norm)) = clip else {
        return Ok(None);
    };
    norm_sq.expect("clip norm_sq", &[1], Some(DType::F32))?;
    if max_norm.is_nan() || max_norm <= 0.0 {
        bail!("clip: max_norm must be positive, got {max_norm}");
    }
    Ok(Some((norm_sq, max_norm as f32)))
}

/// One torch.optim.AdamW step on `param` with its gradient and moments (all f32, same shape):
/// `p *= 1 - lr·wd`, then Adam with bias corrections. With `clip = Some((norm_sq, max_norm))`,
/// the gradient is first scaled as `clip_grad_norm_(max_norm)` would, from the squared global
/// norm on the device (see [`grad_norm_sq`]). The gradient itself is left unchanged.
pub fn adamw_step(
    batch: &mut Batch,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hyper: &AdamW,
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    let clip = check_update(
        &[
            ("adamw param", param),
            ("adamw grad", grad),
            ("adamw exp_avg", m),
            ("adamw exp_avg_sq", v),
        ],
        clip,
    )?;
    if hyper.step == 0 {
        bail!("adamw: step counts from 1");
    }
    let step = hyper.step as i32;
    let base = Params {
        lr: hyper.lr as f32,
        weight_decay: hyper.weight_decay as f32,
        decay: (1.0 - hyper.lr * hyper.weight_decay) as f32,
        m_weight: (1.0 - hyper.beta1) as f32,
        beta2: hyper.beta2 as f32,
        v_weight: (1.0 - hyper.beta2) as f32,
        bc2_sqrt: (1.0 - hyper.beta2.powi(step)).sqrt() as f32,
        step_size: (hyper.lr / (1.0 - hyper.beta1.powi(step))) as f32,
        eps: hyper.eps as f32,
        max_norm: clip.map_or(0.0, |c| c.1),
        ..Params::default()
    };
    let kernel = Kernel::new(
        &OPTIM,
        if clip.is_some() {
            "adamw_clipped"
        } else {
            "adamw"
        },
    );
    let extra: Vec<&wgpu::Buffer> = clip.iter().map(|c| &c.0.chunks()[0]).collect();
    batch.launch_rows(
        &kernel,
        [grad, param, m, v],
        &extra,
        param.row_len(),
        |seg| {
            let [grad_off, param_off, m_off, v_off] = seg.offsets;
            Params {
                n: (seg.count * param.row_len()) as u32,
                param_off,
                grad_off,
                m_off,
                v_off,
                ..base
            }
        },
    )
}

/// One torch.optim.SGD step without momentum (f32 param and grad): `g += wd·p` (torch's coupled
/// decay), `p -= lr·g`, with optional clipping as in [`adamw_step`].
pub fn sgd_step(
    batch: &mut Batch,
    param: &Tensor,
    grad: &Tensor,
    lr: f64,
    weight_decay: f64,
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    let clip = check_update(&[("sgd param", param), ("sgd grad", grad)], clip)?;
    let kernel = Kernel::new(&OPTIM, if clip.is_some() { "sgd_clipped" } else { "sgd" });
    let extra: Vec<&wgpu::Buffer> = clip.iter().map(|c| &c.0.chunks()[0]).collect();
    batch.launch_rows(&kernel, [grad, param], &extra, param.row_len(), |seg| {
        let [grad_off, param_off] = seg.offsets;
        Params {
            n: (seg.count * param.row_len()) as u32,
            param_off,
            grad_off,
            lr: lr as f32,
            weight_decay: weight_decay as f32,
            max_norm: clip.map_or(0.0, |c| c.1),
            ..Params::default()
        }
    })
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

/// Which optimizer a [`check_steps`] run uses.
#[derive(Clone, Copy, Debug)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd { lr: f64, weight_decay: f64 },
}

/// The squared global norm over random gradients of the given shapes against [`cpu::norm_sq`].
pub fn check_grad_norm(gpu: &Gpu, shapes: &[&[usize]], seed: u64) -> Result<Check> {
    let grads = random_tensors(shapes, seed);
    let tensors = upload(gpu, shapes, &grads)?;
    let out = Tensor::zeros(gpu, &[1], DType::F32)?;
    let mut batch = gpu.batch();
    grad_norm_sq(&mut batch, &tensors.iter().collect::<Vec<_>>(), &out)?;
    batch.submit();
    let elements: usize = grads.iter().map(Vec::len).sum();
    Ok(Check {
        kernel: "grad_norm_sq".into(),
        shape: format!("{} tensors, {elements} el", shapes.len()),
        max_err: max_error(&out.to_f32(gpu)?, &[cpu::norm_sq(&grads)]),
        tolerance: 1e-6,
    })
}

/// `steps` optimizer steps (fresh random gradients each step, the global norm, the update with
/// clipping at `max_norm` if given) over parameters of the given shapes, against [`cpu`]:
/// the final parameters (and for AdamW the moments) of all tensors together.
pub fn check_steps(
    gpu: &Gpu,
    shapes: &[&[usize]],
    optimizer: Optimizer,
    max_norm: Option<f64>,
    steps: u32,
    seed: u64,
) -> Result<Vec<Check>> {
    let mut params_cpu = random_tensors(shapes, seed);
    let zeros: Vec<Vec<f64>> = params_cpu.iter().map(|p| vec![0.0; p.len()]).collect();
    let (mut m_cpu, mut v_cpu) = (zeros.clone(), zeros);
    let params = upload(gpu, shapes, &params_cpu)?;
    let zero_tensors = || {
        shapes
            .iter()
            .map(|s| Tensor::zeros(gpu, s, DType::F32))
            .collect::<Result<Vec<_>>>()
    };
    let (m, v) = (zero_tensors()?, zero_tensors()?);
    let norm = Tensor::zeros(gpu, &[1], DType::F32)?;
    for step in 1..=steps {
        let grads_cpu = random_tensors(shapes, seed + 100 * step as u64);
        let grads = upload(gpu, shapes, &grads_cpu)?;
        let scale = max_norm.map_or(1.0, |max| cpu::clip_scale(cpu::norm_sq(&grads_cpu), max));
        let clip = max_norm.map(|max| (&norm, max));
        let mut batch = gpu.batch();
        grad_norm_sq(&mut batch, &grads.iter().collect::<Vec<_>>(), &norm)?;
        for i in 0..shapes.len() {
            match optimizer {
                Optimizer::AdamW(hyper) => {
                    let hyper = AdamW { step, ..hyper };
                    adamw_step(
                        &mut batch, &params[i], &grads[i], &m[i], &v[i], &hyper, clip,
                    )?;
                    cpu::adamw(
                        &mut params_cpu[i],
                        &grads_cpu[i],
                        &mut m_cpu[i],
                        &mut v_cpu[i],
                        &hyper,
                        scale,
                    );
                }
                Optimizer::Sgd { lr, weight_decay } => {
                    sgd_step(&mut batch, &params[i], &grads[i], lr, weight_decay, clip)?;
                    cpu::sgd(&mut params_cpu[i], &grads_cpu[i], lr, weight_decay, scale);
                }
            }
        }
        batch.submit();
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
    let label = format!("{elements} el, {steps} steps, {clip}");
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

fn upload(gpu: &Gpu, shapes: &[&[usize]], values: &[Vec<f64>]) -> Result<Vec<Tensor>> {
    shapes
        .iter()
        .zip(values)
        .map(|(s, v)| Tensor::from_f32(gpu, s, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()))
        .collect()
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
    let mut checks = vec![check_grad_norm(gpu, shapes, 1)?];
    checks.extend(check_steps(
        gpu,
        shapes,
        Optimizer::AdamW(TEST_ADAMW),
        Some(1.0),
        3,
        2,
    )?);
    checks.extend(check_steps(
        gpu,
        shapes,
        Optimizer::Sgd {
            lr: 0.1,
            weight_decay: 0.01,
        },
        Some(1.0),
        2,
        3,
    )?);
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
        let zeros = || {
            shapes
                .iter()
                .map(|s| Tensor::zeros(gpu, s, DType::F32))
                .collect::<Result<Vec<_>>>()
        };
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
        let hyper = AdamW {
            step: 10,
            ..TEST_ADAMW
        };
        let step_time = time(gpu, config.reps, |b| {
            for i in 0..shapes.len() {
                adamw_step(
                    b,
                    &params[i],
                    &grads[i],
                    &m[i],
                    &v[i],
                    &hyper,
                    Some((&norm, 1.0)),
                )?;
            }
            Ok(())
        })?;
        results.push(BenchResult {
            kernel: "adamw_step clipped".into(),
            shape: label,
            time: step_time,
            flops: 0.0,
            bytes: 28.0 * elements as f64,
        });
    }
    Ok(results)
}
