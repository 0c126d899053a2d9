//! One optimizer step on the device, shared by the trainer (and its `--dry-run`), the training
//! benchmark and the memory tests: clear the gradients, forward + backward of every micro-batch
//! ([`Qwen2::forward_backward`], gradients of the mean loss over the step's supervised tokens), the
//! global gradient norm read back ([`gradients`]; [`gradients_across`] when the step's micro-batches
//! are shared among data-parallel ranks); then, once the caller has checked that loss and
//! norm are finite, the clipped SGD / AdamW update of every parameter ([`update`]). A
//! [`MemoryReport`] sums up the device memory of such a step.
use std::fmt;

use anyhow::Result;
use wgtrain_kernels::ops::optim::{self, grad_norm_sq, AdamW, Optimizer, Trainable};
use wgtrain_kernels::{DType, Gpu, Tensor};

use super::config::{OptimizerKind, OptimizerSettings};
use super::ranks::{all_gather_ok, share, Ranks, Single};
use crate::model::backward::micro_batch_bytes;
use crate::model::residency::{activations_line, lora_bytes, size, Working};
use crate::model::{Grads, LoraDropout, MemoryPlan, Param, PerProj, Qwen2, Qwen2Config, IGNORE};

/// AdamW's moments of one parameter.
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

/// Fresh AdamW moments (zeros), each packed like the parameters ([`Tensor::packed`]: one
/// optimizer launch for all), or, for SGD, none.
pub fn new_moments(
    gpu: &Gpu,
    params: &[Param],
    kind: OptimizerKind,
) -> Result<Vec<Option<Moments>>> {
    match kind {
        OptimizerKind::Adamw => {
            let shapes: Vec<Vec<usize>> = params.iter().map(|p| p.value.shape().to_vec()).collect();
            let m = Tensor::packed(gpu, &shapes, DType::F32)?;
            let v = Tensor::packed(gpu, &shapes, DType::F32)?;
            Ok(m.into_iter()
                .zip(v)
                .map(|(m, v)| Some(Moments { m, v }))
                .collect())
        }
        OptimizerKind::Sgd => Ok(params.iter().map(|_| None).collect()),
    }
}

/// One micro-batch of a step: (token ids, next-token targets) rows
/// ([`crate::model::next_token_targets`]), and the LoRA dropout of its forward and backward.
pub struct MicroBatch<'a> {
    pub rows: Vec<(&'a [u32], &'a [u32])>,
    pub dropout: Option<LoraDropout>,
}

/// What the backward half of a step found.
#[derive(Clone, Copy, Debug)]
pub struct Gradients {
    /// Mean loss over the step's supervised tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised tokens (targets of the loss) in the step.
    pub supervised: usize,
}

/// Clears `grads` and accumulates the gradient of the step's mean loss over `micro_batches`,
/// then writes the squared global norm into `norm_sq` ([1] f32) and reads it back.
pub fn gradients(
    gpu: &Gpu,
    model: &Qwen2,
    grads: &Grads,
    micro_batches: &[MicroBatch],
    norm_sq: &Tensor,
) -> Result<Gradients> {
    gradients_across(&Single, gpu, model, grads, micro_batches, norm_sq)
}

/// [`gradients`] of a step whose `micro_batches` are shared among `ranks`: this rank runs its
/// [`share`], then the ranks sum their gradients and loss sums in rank order, so that every rank
/// holds the step's gradients and norm. Every rank has the whole step's rows, so each counts the
/// step's supervised tokens itself (the scale of its backward) with no exchange. A rank's error
/// stops every rank ([`super::ranks::RankFailed`]).
pub fn gradients_across(
    ranks: &dyn Ranks,
    gpu: &Gpu,
    model: &Qwen2,
    grads: &Grads,
    micro_batches: &[MicroBatch],
    norm_sq: &Tensor,
) -> Result<Gradients> {
    let supervised: usize = micro_batches
        .iter()
        .flat_map(|micro| &micro.rows)
        .map(|(_, targets)| targets.iter().filter(|&&t| t != IGNORE).count())
        .sum();
    let mine = &micro_batches[share(micro_batches.len(), ranks.rank(), ranks.size())];
    grads.zero(gpu, model);
    let local_loss_sum = || -> Result<f64> {
        let mut loss_sum = 0.0;
        for micro in mine {
            let scale = 1.0 / supervised as f32;
            loss_sum += model
                .forward_backward(gpu, grads, &micro.rows, scale, micro.dropout)?
                .sum;
        }
        Ok(loss_sum)
    };
    let loss_sums = all_gather_ok(ranks, local_loss_sum().map(|s| s.to_le_bytes().to_vec()))?;
    let loss_sum = loss_sums
        .iter()
        .map(|bytes| f64::from_le_bytes(bytes[..].try_into().expect("8 bytes of an f64")))
        .reduce(|sum, s| sum + s)
        .unwrap_or(0.0);
    let params = grads.params(model);
    if ranks.size() > 1 {
        sum_gradients(ranks, gpu, &params)?;
    }
    let grad_list: Vec<&Tensor> = params.iter().map(|p| p.grad).collect();
    let mut batch = gpu.batch();
    grad_norm_sq(&mut batch, &grad_list, norm_sq)?;
    batch.submit();
    Ok(Gradients {
        loss: loss_sum / supervised as f64,
        grad_norm: (norm_sq.to_f32(gpu)?[0] as f64).sqrt(),
        supervised,
    })
}

/// f32 values summed across ranks at once, at most (64 MiB; a larger tensor goes alone): bounds
/// the host memory of full fine-tuning's gradients and lets LoRA's hundreds of small ones go in
/// one exchange.
const SUM_BUCKET: usize = 16 << 20;

/// Replaces every rank's gradients by their sum over the ranks ([`Ranks::sum_in_rank_order`]),
/// read back and written back bucket by bucket.
fn sum_gradients(ranks: &dyn Ranks, gpu: &Gpu, params: &[Param]) -> Result<()> {
    let mut rest = params;
    while !rest.is_empty() {
        let mut len = rest[0].grad.numel();
        let mut n = 1;
        while n < rest.len() && len + rest[n].grad.numel() <= SUM_BUCKET {
            len += rest[n].grad.numel();
            n += 1;
        }
        let (bucket, after) = rest.split_at(n);
        let mut values = Vec::with_capacity(len);
        for p in bucket {
            values.extend(p.grad.to_f32(gpu)?);
        }
        ranks.sum_in_rank_order(&mut values);
        let mut at = 0;
        for p in bucket {
            let n = p.grad.numel();
            p.grad.write_f32(gpu, &values[at..at + n])?;
            at += n;
        }
        rest = after;
    }
    Ok(())
}

/// Updates every parameter at learning rate `lr` as step `index` (0-based) of the run with `o`'s
/// optimizer (AdamW needs the `moments` of [`new_moments`]); weight decay where the parameter
/// decays; the gradient clipped to `clip = (norm_sq, max_norm)` if given. Waits for the update
/// to finish.
pub fn update(
    gpu: &Gpu,
    params: &[Param],
    moments: &[Option<Moments>],
    o: &OptimizerSettings,
    lr: f64,
    index: usize,
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    let optimizer = match o.kind {
        OptimizerKind::Adamw => Optimizer::AdamW(AdamW {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step: index as u32 + 1,
        }),
        OptimizerKind::Sgd => Optimizer::Sgd {
            lr,
            weight_decay: o.weight_decay,
        },
    };
    let trainables: Vec<Trainable> = params
        .iter()
        .zip(moments)
        .map(|(p, moments)| Trainable {
            param: p.value,
            grad: p.grad,
            moments: moments.as_ref().map(|m| (&m.m, &m.v)),
            decays: p.decays(),
        })
        .collect();
    let mut batch = gpu.batch();
    optim::update(&mut batch, &trainables, &optimizer, clip)?;
    batch.submit();
    gpu.wait()
}

/// What a LoRA optimizer step on a micro-batch of `tokens` tokens holds on the device besides the
/// frozen weights (the memory plan's working set): the micro-batch's activations and the LoRA
/// factors of `ranks` with their gradients and (AdamW) two moments.
pub fn lora_step_working(
    config: &Qwen2Config,
    ranks: &PerProj<Option<usize>>,
    adamw: bool,
    dropout: bool,
    tokens: usize,
) -> Working {
    let state = lora_bytes(config, ranks) * if adamw { 4 } else { 2 };
    micro_batch_bytes(config, ranks, dropout, tokens).plus(state)
}

/// The device memory of one optimizer step on a run's largest micro-batch (`--dry-run`).
#[derive(Clone, Debug)]
pub struct MemoryReport {
    /// The micro-batch: rows of `tokens` tokens (the run's longest row).
    pub rows: usize,
    pub tokens: usize,
    /// Device bytes of the weights that are not trained (the base model under LoRA; none under
    /// full fine-tuning, whose weights are the trainable parameters).
    pub frozen: u64,
    pub trainable: u64,
    pub gradients: u64,
    /// AdamW's moments (none for SGD).
    pub optimizer: u64,
    /// The most device memory held at once during the step: all of the above, the activations and
    /// the kernels' temporaries.
    pub peak: u64,
    /// The memory plan when decoder layers stream (`--device-memory`); None: all resident.
    pub plan: Option<MemoryPlan>,
    /// The bytes the step kept from the forward for the backward instead of recomputing each
    /// layer ([`Qwen2::kept_activations`]); None: it recomputed.
    pub kept: Option<u64>,
    /// Bytes of streamed weights uploaded host -> device so far (in a dry run: by its one step).
    pub streamed: u64,
}

impl MemoryReport {
    /// The report of a step of `model` on `gpu` on a micro-batch of `(rows, tokens)` that
    /// peaked at `peak` bytes.
    pub fn new(
        gpu: &Gpu,
        model: &Qwen2,
        params: &[Param],
        moments: &[Option<Moments>],
        (rows, tokens): (usize, usize),
        peak: u64,
    ) -> Result<MemoryReport> {
        let trainable: u64 = params.iter().map(|p| p.value.device_bytes()).sum();
        Ok(MemoryReport {
            rows,
            tokens,
            frozen: model.device_bytes() - trainable,
            trainable,
            gradients: params.iter().map(|p| p.grad.device_bytes()).sum(),
            optimizer: moments
                .iter()
                .flatten()
                .map(|m| m.m.device_bytes() + m.v.device_bytes())
                .sum(),
            peak,
            plan: model.memory_plan().cloned(),
            kept: model.kept_activations(gpu, rows * tokens)?,
            streamed: model.streamed_bytes(),
        })
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
        let state = self.trainable + self.gradients + self.optimizer;
        match &self.plan {
            Some(plan) => writeln!(f, "{plan}")?,
            None => writeln!(f, "memory plan: every weight resident, nothing streams")?,
        }
        // The plan shows what it keeps; the step's choice where it shows nothing or another.
        let planned = self
            .plan
            .as_ref()
            .map(|p| p.kept)
            .filter(|&bytes| bytes > 0);
        if planned.is_none() || planned != self.kept {
            writeln!(f, "{}", activations_line(self.kept))?;
        }
        writeln!(
            f,
            "device memory of one optimizer step on {} row(s) x {} tokens:",
            self.rows, self.tokens
        )?;
        writeln!(
            f,
            "  frozen weights                        {}",
            size(self.frozen)
        )?;
        writeln!(
            f,
            "  trainable + gradients + optimizer     {}   ({:.1} + {:.1} + {:.1} MiB)",
            size(state),
            mib(self.trainable),
            mib(self.gradients),
            mib(self.optimizer)
        )?;
        writeln!(
            f,
            "  streamed host -> device in the step   {}",
            size(self.streamed)
        )?;
        write!(
            f,
            "  peak device memory during the step    {}",
            size(self.peak)
        )?;
        match self.plan.as_ref().and_then(|p| p.budget) {
            Some(budget) if self.peak > budget => write!(
                f,
                "\n  over --device-memory by {:.1} MiB: the plan's estimate leaves out the kernels' \
                 temporaries; give {:.0} MiB or more",
                mib(self.peak - budget),
                mib(self.peak).ceil()
            ),
            _ => Ok(()),
        }
    }
}
