//! The Qwen2 backward pass, written out per layer like the forward (llm.c style, no autograd).
//!
//! One micro-batch: embed, run every layer keeping its input (the residual stream), final norm,
//! chunked LM-head cross-entropy forward and backward, then for each layer from the last: its
//! backward, which turns `dres` — dL/d(layer output) — into dL/d(layer input) in place. The
//! backward of a layer reads its activations ([`LayerActs`]) either kept from the forward, one set
//! per layer, or recomputed from its saved input into one set shared by every layer (per-layer
//! activation recomputation), as [`Qwen2::kept_activations`] decides; keeping also keeps the LM
//! head's logits for the loss's backward ([`KeptLogits`]). The same kernels run on the same
//! inputs either way, so both give the same bits.
//!
//! Gradients accumulate (`beta = 1`) into [`Grads`], zeroed once per optimizer step, so the
//! micro-batches of a step add up; the loss gradient is scaled by 1 / (supervised tokens of the
//! whole step) so the sum is the gradient of the step's mean loss.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use wgtrain_kernels::ops::attention::{attention_backward, AttentionDims, Qkv};
use wgtrain_kernels::ops::cross_entropy::{
    self, cross_entropy_backward, cross_entropy_forward, Chunking, KeptLogits, LmHead,
};
use wgtrain_kernels::ops::elementwise::{copy_rows, sum_rows};
use wgtrain_kernels::ops::embedding::{embedding_backward, TokenIds};
use wgtrain_kernels::ops::lora::{lora_backward, InputGrad, Lora, LoraGrads};
use wgtrain_kernels::ops::matmul::{matmul_backward_input, matmul_backward_weight};
use wgtrain_kernels::ops::rmsnorm::rmsnorm_backward;
use wgtrain_kernels::ops::rope::{rope_backward, Positions, QueryKey};
use wgtrain_kernels::ops::swiglu::swiglu_backward;
use wgtrain_kernels::{Batch, DType, Gpu, Out, Tensor};

use super::adapter::tensor_name;
use super::config::Qwen2Config;
use super::params::{names, qwen2_tensors, PerProj, Proj, TensorSpec};
use super::qwen2::{
    pad_rows, token_local, LayerActs, LayerIo, LocalRows, LoraDropout, LossSum, Qwen2, Step,
};
use super::residency::{Chunked, Kept, MemoryPlan, Working};
use super::weights::{write_to_device, Weights};

/// What the backward of one layer reads besides its input and scratch: which layer, its
/// activations (kept or recomputed), the micro-batch and the gradients it accumulates into.
#[derive(Clone, Copy)]
struct LayerPass<'a> {
    l: usize,
    acts: &'a LayerActs,
    step: &'a Step<'a>,
    grads: &'a Grads,
}

/// The rows a projection's backward runs over: its LoRA's saved `x·Aᵀ` (in `u`) and the index
/// of the first row in the layer (where its LoRA dropout mask starts).
#[derive(Clone, Copy)]
struct ProjRows<'a> {
    u: &'a PerProj<Option<Tensor>>,
    first: usize,
}

/// Gradients of one layer's weights under full fine-tuning.
pub struct LayerGrads {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub weight: PerProj<Tensor>,
    pub bias: PerProj<Option<Tensor>>,
}

/// Gradients of every weight (full fine-tuning; the tied LM head's lands in `embed`).
pub struct FullGrads {
    pub embed: Tensor,
    pub layers: Vec<LayerGrads>,
    pub norm: Tensor,
    pub lm_head: Option<Tensor>,
}

/// Gradient buffers shaped like the trainable parameters: LoRA factors, or every weight.
pub enum Grads {
    /// (dA, dB) per layer, where the projection has a LoRA.
    Lora(Vec<PerProj<Option<(Tensor, Tensor)>>>),
    Full(Box<FullGrads>),
}

/// A trainable tensor, its gradient and its name (PEFT key for LoRA, HF name for full).
pub struct Param<'a> {
    pub name: String,
    pub value: &'a Tensor,
    pub grad: &'a Tensor,
}

impl Param<'_> {
    /// transformers' Trainer (4.46) exempts biases from weight decay.
    pub fn decays(&self) -> bool {
        !self.name.ends_with(".bias")
    }
}

/// Zero f32 tensors shaped like the tensors `build` asks `like` for, packed together
/// ([`Tensor::packed`]: one optimizer launch covers them all). `build` runs twice: first to learn
/// the shapes (`like` hands out aliases of the tensors asked about, which own nothing), then to
/// take the packed tensors in the same order.
fn packed_like<R>(
    gpu: &Gpu,
    build: impl Fn(&mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<R>,
) -> Result<R> {
    let mut shapes = Vec::new();
    build(&mut |t| {
        shapes.push(t.shape().to_vec());
        Ok(t.alias(gpu))
    })?;
    let mut packed = Tensor::packed(gpu, &shapes, DType::F32)?.into_iter();
    build(&mut |_| Ok(packed.next().expect("one packed tensor per shape")))
}

/// f32 tensors of every weight of `config` by checkpoint name, packed together (the master
/// weights of full fine-tuning, which the optimizer updates in one launch).
fn packed_weights(gpu: &Gpu, config: &Qwen2Config) -> Result<HashMap<String, Tensor>> {
    let specs = qwen2_tensors(config);
    let shapes: Vec<Vec<usize>> = specs.iter().map(|s| s.shape.clone()).collect();
    let packed = Tensor::packed(gpu, &shapes, DType::F32)?;
    Ok(specs.into_iter().map(|s| s.name).zip(packed).collect())
}

impl Grads {
    /// LoRA gradients when any projection has a LoRA applied, else gradients of every weight
    /// (the model must then hold f32 weights, see [`Qwen2::load_f32`]).
    pub fn new(gpu: &Gpu, model: &Qwen2) -> Result<Grads> {
        model.config.check_trainable()?;
        let has_lora = model
            .layers
            .iter()
            .any(|l| l.proj.values().any(|p| p.lora.is_some()));
        if has_lora {
            let layers = packed_like(gpu, |like| {
                model
                    .layers
                    .iter()
                    .map(|layer| {
                        PerProj::try_from_fn(|p| {
                            layer.proj[p]
                                .lora
                                .as_ref()
                                .map(|l| Ok((like(&l.a)?, like(&l.b)?)))
                                .transpose()
                        })
                    })
                    .collect()
            })?;
            return Ok(Grads::Lora(layers));
        }
        let embed = model
            .embed
            .as_ref()
            .context("full fine-tuning keeps the embedding on the device; this model pages it")?;
        ensure!(
            embed.dtype() == DType::F32,
            "full fine-tuning needs f32 master weights (Qwen2::load_f32)"
        );
        let full = packed_like(gpu, |like| {
            let embed = like(embed)?;
            let layers = model
                .layers
                .iter()
                .map(|layer| {
                    Ok(LayerGrads {
                        input_norm: like(&layer.input_norm)?,
                        post_norm: like(&layer.post_norm)?,
                        weight: PerProj::try_from_fn(|p| like(&layer.proj[p].weight))?,
                        bias: PerProj::try_from_fn(|p| {
                            layer.proj[p].bias.as_ref().map(&mut *like).transpose()
                        })?,
                    })
                })
                .collect::<Result<_>>()?;
            Ok(FullGrads {
                embed,
                layers,
                norm: like(&model.norm)?,
                lm_head: model.lm_head.as_ref().map(&mut *like).transpose()?,
            })
        })?;
        Ok(Grads::Full(Box::new(full)))
    }

    /// Every trainable parameter of `model` with its gradient, in a fixed order.
    pub fn params<'a>(&'a self, model: &'a Qwen2) -> Vec<Param<'a>> {
        let mut out = Vec::new();
        match self {
            Grads::Lora(layers) => {
                for (l, (g, layer)) in layers.iter().zip(&model.layers).enumerate() {
                    for (proj, g) in g.iter() {
                        if let (Some((da, db)), Some(lora)) = (g, &layer.proj[proj].lora) {
                            out.push(Param {
                                name: tensor_name(l, proj, "A"),
                                value: &lora.a,
                                grad: da,
                            });
                            out.push(Param {
                                name: tensor_name(l, proj, "B"),
                                value: &lora.b,
                                grad: db,
                            });
                        }
                    }
                }
            }
            Grads::Full(g) => {
                let mut push = |name: String, value: &'a Tensor, grad: &'a Tensor| {
                    out.push(Param { name, value, grad })
                };
                if let Some(embed) = &model.embed {
                    push(names::EMBED.into(), embed, &g.embed);
                }
                for (l, (lg, layer)) in g.layers.iter().zip(&model.layers).enumerate() {
                    push(names::input_norm(l), &layer.input_norm, &lg.input_norm);
                    push(names::post_norm(l), &layer.post_norm, &lg.post_norm);
                    for (p, linear) in layer.proj.iter() {
                        push(names::weight(l, p), &linear.weight, &lg.weight[p]);
                        if let (Some(b), Some(gb)) = (&linear.bias, &lg.bias[p]) {
                            push(names::bias(l, p), b, gb);
                        }
                    }
                }
                push(names::FINAL_NORM.into(), &model.norm, &g.norm);
                if let (Some(w), Some(gw)) = (&model.lm_head, &g.lm_head) {
                    push(names::LM_HEAD.into(), w, gw);
                }
            }
        }
        out
    }

    /// Zeroes every gradient (start of an optimizer step).
    pub fn zero(&self, gpu: &Gpu, model: &Qwen2) {
        for p in self.params(model) {
            p.grad.clear(gpu);
        }
    }

    fn lora(&self, l: usize, p: Proj) -> Option<&(Tensor, Tensor)> {
        match self {
            Grads::Lora(layers) => layers[l][p].as_ref(),
            Grads::Full(_) => None,
        }
    }

    fn full(&self) -> Option<&FullGrads> {
        match self {
            Grads::Full(g) => Some(g),
            Grads::Lora(_) => None,
        }
    }
}

/// Activation gradients of one layer, reused by every layer of a micro-batch: the attention's
/// over all rows, the token-local part's over one token chunk (or all rows). (`T` is a device
/// tensor but for counting their bytes.)
struct Scratch<T = Tensor> {
    /// Chunked only: dL/d(normed input) of all rows (a whole layer shares `local.d_xn`).
    d_xn: Option<T>,
    d_attn: T,
    dq: T,
    dk: T,
    dv: T,
    local: LocalGrads<T>,
}

/// Activation gradients of a layer's token-local part over `rows` tokens.
struct LocalGrads<T = Tensor> {
    d_act: T,
    d_gate: T,
    d_up: T,
    d_xn: T,
    /// Chunked only: the chunk's rows of dL/d(layer output) and dL/d(attention output).
    d_out: Option<T>,
    d_attn: Option<T>,
}

impl<T> Scratch<T> {
    /// The gradients of `(rows, chunk)` ([`LayerActs`]), each made by `make(shape)`.
    fn build(
        c: &Qwen2Config,
        (rows, chunk): (usize, usize),
        mut make: impl FnMut(&[usize]) -> Result<T>,
    ) -> Result<Scratch<T>> {
        let (i, h, q, kv) = (c.intermediate_size, c.hidden_size, c.q_dim(), c.kv_dim());
        let chunked = chunk < rows;
        Ok(Scratch {
            d_xn: chunked.then(|| make(&[rows, h])).transpose()?,
            d_attn: make(&[rows, q])?,
            dq: make(&[rows, q])?,
            dk: make(&[rows, kv])?,
            dv: make(&[rows, kv])?,
            local: LocalGrads {
                d_act: make(&[chunk, i])?,
                d_gate: make(&[chunk, i])?,
                d_up: make(&[chunk, i])?,
                d_xn: make(&[chunk, h])?,
                d_out: chunked.then(|| make(&[chunk, h])).transpose()?,
                d_attn: chunked.then(|| make(&[chunk, q])).transpose()?,
            },
        })
    }

    fn d_xn(&self) -> &T {
        self.d_xn.as_ref().unwrap_or(&self.local.d_xn)
    }
}

impl Scratch {
    fn new(gpu: &Gpu, c: &Qwen2Config, rows: (usize, usize)) -> Result<Scratch> {
        Scratch::build(c, rows, |shape| Tensor::zeros(gpu, shape, DType::F32))
    }

    /// Device bytes `Scratch::new` allocates.
    fn bytes(c: &Qwen2Config, rows: (usize, usize)) -> u64 {
        let mut f32s = 0;
        let counted = Scratch::<()>::build(c, rows, |shape| {
            f32s += shape.iter().product::<usize>();
            Ok(())
        });
        debug_assert!(counted.is_ok(), "counting never fails");
        f32s as u64 * 4
    }
}

impl LocalGrads {
    /// These buffers' first `len` rows.
    fn prefix(&self, gpu: &Gpu, len: usize) -> Result<LocalGrads> {
        let prefix = |t: &Tensor| t.prefix(gpu, len);
        let opt = |t: &Option<Tensor>| t.as_ref().map(prefix).transpose();
        Ok(LocalGrads {
            d_act: prefix(&self.d_act)?,
            d_gate: prefix(&self.d_gate)?,
            d_up: prefix(&self.d_up)?,
            d_xn: prefix(&self.d_xn)?,
            d_out: opt(&self.d_out)?,
            d_attn: opt(&self.d_attn)?,
        })
    }
}

/// Device bytes [`Qwen2::forward_backward`] holds for a micro-batch of `tokens` tokens (padded
/// rows together) with LoRAs of `ranks`, with or without LoRA dropout, besides the weights and
/// the trained state, with whole layers and (linear in the chunk's rows) in token chunks, and
/// what keeping the activations adds to whole layers.
pub fn micro_batch_bytes(
    c: &Qwen2Config,
    ranks: &PerProj<Option<usize>>,
    dropout: bool,
    tokens: usize,
) -> Working {
    let bytes = |chunk| micro_batch_bytes_at(c, ranks, dropout, (tokens, chunk));
    let fixed = bytes(0);
    Working {
        tokens,
        bytes: bytes(tokens),
        offloadable: (c.num_hidden_layers as u64 - 1) * (tokens * c.hidden_size * 4) as u64,
        chunked: Some(Chunked {
            tokens,
            fixed,
            per_row: bytes(1) - fixed,
        }),
        kept: kept_bytes(c, ranks, tokens),
    }
}

/// What a micro-batch of `tokens` tokens with LoRAs of `ranks` adds by keeping its activations:
/// the [`LayerActs`] of every layer but one and the LM head's logits of every row but one
/// temporary block.
fn kept_bytes(c: &Qwen2Config, ranks: &PerProj<Option<usize>>, tokens: usize) -> Kept {
    let layer = LayerActs::bytes_for(c, ranks, (tokens, tokens));
    Kept {
        layers: (c.num_hidden_layers as u64 - 1) * layer,
        logits: KeptLogits::bytes(tokens, c.vocab_size) - logits_block_bytes(c, tokens),
    }
}

/// Device bytes of the loss's logits temporary (one block) for `tokens` rows.
fn logits_block_bytes(c: &Qwen2Config, tokens: usize) -> u64 {
    let chunking = Chunking::default();
    cross_entropy::block_bytes(tokens.min(chunking.rows), c.vocab_size.min(chunking.vocab))
}

/// The share of the host's available memory ([`mem_available`]) that activations kept on a CPU
/// adapter may take without a budget: one quarter.
const KEPT_SHARE_OF_AVAILABLE: u64 = 4;

/// The host's MemAvailable (Linux, /proc/meminfo); None where it cannot be read.
fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Whether `WGTRAIN_KEEP_ACTIVATIONS` forces training to keep (1) or recompute (0) each layer's
/// activations (for tests and measurements), if set.
fn forced_keep_activations() -> Result<Option<bool>> {
    let Ok(text) = std::env::var("WGTRAIN_KEEP_ACTIVATIONS") else {
        return Ok(None);
    };
    match text.trim() {
        "1" => Ok(Some(true)),
        "0" => Ok(Some(false)),
        _ => bail!(
            "WGTRAIN_KEEP_ACTIVATIONS '{text}': expected 1 (keep every layer's activations for \
             the backward) or 0 (recompute each layer)"
        ),
    }
}

/// [`micro_batch_bytes`] of `(tokens, chunk)` ([`LayerActs`]): every layer's input, one layer's
/// activations and their gradients, the LoRA backward's temporaries (and dropout's materialised
/// inputs) of one layer (of one token chunk in the token-local part), the final norm's and the
/// LM head's buffers and one logits chunk. The kernels' smaller temporaries are not in it (the
/// dry run counts them).
fn micro_batch_bytes_at(
    c: &Qwen2Config,
    ranks: &PerProj<Option<usize>>,
    dropout: bool,
    (tokens, chunk): (usize, usize),
) -> u64 {
    let (n, h, layers) = (
        tokens as u64,
        c.hidden_size as u64,
        c.num_hidden_layers as u64,
    );
    let layer_input = n * h * 4;
    // Per LoRA projection: dy·B [rows, r], and with dropout its dropped input [rows, in].
    let lora: usize = ranks
        .iter()
        .filter_map(|(p, r)| r.map(|r| (p, r)))
        .map(|(p, r)| {
            let rows = if token_local(p) { chunk } else { tokens };
            rows * (r + if dropout { p.shape(c).1 } else { 0 })
        })
        .sum();
    // hidden, dhidden, dres [n, h]; rstd, lse, targets, token ids [n].
    let head = 3 * n * h * 4 + 4 * n * 4;
    let logits = logits_block_bytes(c, tokens);
    (layers + 1) * layer_input
        + LayerActs::bytes_for(c, ranks, (tokens, chunk))
        + Scratch::bytes(c, (tokens, chunk))
        + lora as u64 * 4
        + head
        + logits
}

/// Each decoder layer's input, kept from the forward for the backward's recomputation: all on
/// the device, or (offloaded) read back to host memory once its layer has run and written back
/// before its backward, two device buffers taking turns.
struct LayerInputs {
    device: Vec<Tensor>,
    /// Offloaded: the inputs saved so far, by layer (empty in a dry run, which moves nothing).
    host: Option<Vec<Vec<u8>>>,
}

impl LayerInputs {
    fn new(gpu: &Gpu, layers: usize, shape: &[usize], offload: bool) -> Result<LayerInputs> {
        let buffers = if offload { 2 } else { layers + 1 };
        Ok(LayerInputs {
            device: (0..buffers)
                .map(|_| Tensor::zeros(gpu, shape, DType::F32))
                .collect::<Result<_>>()?,
            host: offload.then(Vec::new),
        })
    }

    /// The buffer of layer `l`'s input (of the final norm's for l = layers).
    fn at(&self, l: usize) -> &Tensor {
        match self.host {
            Some(_) => &self.device[l % 2],
            None => &self.device[l],
        }
    }

    /// After layer `l`'s forward is recorded: offloaded, runs it and reads its input back.
    fn save(&mut self, batch: &mut Batch, l: usize) -> Result<()> {
        let gpu = batch.gpu;
        if let Some(host) = &mut self.host {
            batch.flush();
            let input = &self.device[l % 2];
            host.push(match gpu.is_dry_run() {
                true => Vec::new(),
                false => input.to_bytes(gpu)?,
            });
        }
        Ok(())
    }

    /// Before layer `l` is recomputed: offloaded, writes its input back (after the recorded
    /// work, which may still read the buffer).
    fn restore(&self, batch: &mut Batch, l: usize) -> Result<()> {
        if let (Some(host), false) = (&self.host, batch.gpu.is_dry_run()) {
            batch.flush();
            self.device[l % 2].write_bytes(batch.gpu, &host[l])?;
        }
        Ok(())
    }
}

impl Qwen2 {
    /// Whether a training micro-batch of `tokens` tokens keeps what its forward makes for the
    /// backward — every layer's activations and, unless the LM head is paged, the head's logits
    /// — instead of recomputing each layer before its backward; if so, the bytes that adds
    /// ([`Kept`]). Forced by [`Qwen2::set_keep_activations`] or `WGTRAIN_KEEP_ACTIVATIONS`, else
    /// only with whole layers whose inputs stay on the device, and then: under a memory plan, as
    /// it decided for the run's largest micro-batch ([`MemoryPlan::fit`]); without a budget, on
    /// a CPU adapter (whose memory is the host's) when they take at most a quarter of the host's
    /// available memory; never on a GPU without a budget, nor under a budget without a plan
    /// (full fine-tuning).
    pub fn kept_activations(&self, gpu: &Gpu, tokens: usize) -> Result<Option<u64>> {
        let plan = self.memory_plan();
        let head_paged = plan.is_some_and(|p| p.paging.head);
        let bytes = kept_bytes(&self.config, &self.lora_ranks(), tokens).bytes(head_paged);
        let chunked = self.chunk_rows(tokens).1 < tokens;
        let offloaded = plan.is_some_and(|p| p.offloaded > 0);
        let forced = match self.keep_override() {
            Some(keep) => Some(keep),
            None => forced_keep_activations()?,
        };
        let keep = match forced {
            Some(true) => {
                ensure!(
                    !chunked && !offloaded,
                    "keeping every layer's activations for the backward (WGTRAIN_KEEP_ACTIVATIONS \
                     or Qwen2::set_keep_activations) needs whole layers with their inputs on the \
                     device; this micro-batch of {tokens} tokens {}",
                    match chunked {
                        true => "runs its layers in token chunks",
                        false => "offloads its layer inputs to the host",
                    }
                );
                true
            }
            Some(false) => false,
            None if chunked || offloaded => false,
            None => match plan {
                Some(plan) => plan.kept > 0,
                None => {
                    gpu.device_memory().is_none()
                        && gpu.is_cpu()
                        && mem_available().is_some_and(|m| bytes <= m / KEPT_SHARE_OF_AVAILABLE)
                }
            },
        };
        Ok(keep.then_some(bytes))
    }

    /// Loads a checkpoint with every tensor f32 on the device, packed together: the master
    /// weights of full fine-tuning, updated in place by the optimizer.
    pub fn load_f32(gpu: &Gpu, dir: impl AsRef<Path>) -> Result<Qwen2> {
        let dir = dir.as_ref();
        ensure!(
            dir.is_dir(),
            "model directory {} does not exist",
            dir.display()
        );
        let config = Qwen2Config::load(dir)?;
        let weights = Weights::open(dir)?;
        weights.validate(&config)?;
        let mut packed = packed_weights(gpu, &config)?;
        Qwen2::build(gpu, config, |spec, _| {
            let t = packed
                .remove(&spec.name)
                .context("one packed tensor per weight")?;
            write_to_device(gpu, &weights.get(&spec.name)?, &t)?;
            Ok(t)
        })
    }

    /// A model of `config`'s shapes with zero weights (nothing is uploaded): f32 everywhere when
    /// `f32_master` (full fine-tuning's master weights), else bf16 matrices as [`Qwen2::load`]
    /// keeps them. For dry runs at real shapes without a checkpoint.
    pub fn zeroed(gpu: &Gpu, config: Qwen2Config, f32_master: bool) -> Result<Qwen2> {
        let mut packed = match f32_master {
            true => packed_weights(gpu, &config)?,
            false => HashMap::new(),
        };
        Qwen2::build(gpu, config, |spec, dtype| match packed.remove(&spec.name) {
            Some(t) => Ok(t),
            None => Tensor::zeros(gpu, &spec.shape, dtype),
        })
    }

    /// A zero-weight bf16 model of `config`'s shapes under `plan`: the dry run of a checkpoint
    /// directory that holds only its config.json (nothing is uploaded or streamed in a dry run).
    pub fn zeroed_planned(gpu: &Gpu, config: Qwen2Config, plan: MemoryPlan) -> Result<Qwen2> {
        let zeros = |spec: &TensorSpec, dtype| Tensor::zeros(gpu, &spec.shape, dtype);
        let model = Qwen2::build_planned(gpu, config, &plan, zeros)?;
        model.streaming_from(gpu, plan, None)
    }

    /// One micro-batch of `rows` — (ids, targets) pairs, padded to the longest with unsupervised
    /// tokens — forward and backward: adds `grad_scale ·` d(summed loss) to `grads` and returns
    /// the summed loss. `dropout` applies LoRA dropout with this micro-batch's seed.
    pub fn forward_backward(
        &self,
        gpu: &Gpu,
        grads: &Grads,
        rows: &[(&[u32], &[u32])],
        grad_scale: f32,
        dropout: Option<LoraDropout>,
    ) -> Result<LossSum> {
        let c = &self.config;
        let (ids, targets, seq_len) = pad_rows(rows)?;
        self.note_length(seq_len);
        let (n, h) = (ids.len(), c.hidden_size);
        let step = Step {
            batch_size: rows.len(),
            seq_len,
            past: 0,
            starts: Tensor::from_u32(gpu, &[rows.len()], &vec![0; rows.len()])?,
            cache: None,
            dropout,
        };
        let token_ids = TokenIds::new(gpu, &ids)?;
        let mut batch = gpu.batch();

        // Forward, keeping each layer's input (and, kept, its activations) for the backward.
        let layers = self.layers.len();
        let offload = self.memory_plan().is_some_and(|p| p.offloaded > 0);
        let mut inputs = LayerInputs::new(gpu, layers, &[n, h], offload)?;
        let keep = self.kept_activations(gpu, n)?.is_some();
        let acts = (0..if keep { layers } else { 1 })
            .map(|_| LayerActs::new(gpu, self, n))
            .collect::<Result<Vec<_>>>()?;
        let acts_of = |l: usize| &acts[if keep { l.min(layers - 1) } else { 0 }];
        self.record_embedding(&mut batch, &token_ids, inputs.at(0))?;
        // A submit after each layer's forward (and, below, its recomputation and its backward),
        // so that the temporaries its ops keep (Batch::keep; e.g. LoRA dropout's inputs) are
        // released as it goes rather than piling up over the whole model.
        let hidden = Tensor::zeros(gpu, &[n, h], DType::F32)?;
        let rstd = Tensor::zeros(gpu, &[n], DType::F32)?;
        for l in 0..layers {
            self.stream_in(&mut batch, l, Some(l + 1).filter(|&n| n < layers))?;
            let next = (inputs.at(l + 1), acts_of(l + 1), (&hidden, &rstd));
            let io = LayerIo {
                x: inputs.at(l),
                x_normed: self.chains_into(l),
                out: Some(self.chained_out(l, next.0, next.1, next.2)),
            };
            self.layer_forward(&mut batch, l, io, acts_of(l), &step)?;
            batch.flush();
            inputs.save(&mut batch, l)?;
        }
        let last = inputs.at(layers);

        let targets_t = Tensor::from_u32(gpu, &[n], &targets)?;
        let lse = Tensor::zeros(gpu, &[n], DType::F32)?;
        let loss = Tensor::zeros(gpu, &[1], DType::F32)?;
        let count = Tensor::zeros(gpu, &[1], DType::U32)?;
        let full = grads.full();
        let w_lm = self.head()?;
        let mut head = LmHead {
            hidden: &hidden,
            w_lm,
            chunking: Chunking::default(),
            kept: None,
        };
        // A paged head keeps its path: its chunks stream through their ring in both passes.
        let head_paged = self.memory_plan().is_some_and(|p| p.paging.head);
        let kept_logits = match keep && !head_paged {
            true => Some(KeptLogits::new(gpu, head)?),
            false => None,
        };
        head.kept = kept_logits.as_ref();
        cross_entropy_forward(&mut batch, head, &targets_t, &lse, &loss, &count)?;
        // Releases the forward's logits temporary before the backward makes its own.
        batch.flush();
        let dhidden = Tensor::zeros(gpu, &[n, h], DType::F32)?;
        // The tied head's gradient goes to the embedding's, which the embedding backward adds to.
        let dw_lm = full.map(|g| Out::add(g.lm_head.as_ref().unwrap_or(&g.embed)));
        cross_entropy_backward(
            &mut batch,
            head,
            &targets_t,
            &lse,
            grad_scale,
            Out::write(&dhidden),
            dw_lm,
        )?;
        if let Some(logits) = kept_logits {
            logits.release(&mut batch);
        }
        let dres = Tensor::zeros(gpu, &[n, h], DType::F32)?;
        rmsnorm_backward(
            &mut batch,
            &dhidden,
            last,
            &self.norm,
            &rstd,
            Out::write(&dres),
            full.map(|g| Out::add(&g.norm)),
        )?;

        let scratch = Scratch::new(gpu, c, self.chunk_rows(n))?;
        for l in (0..layers).rev() {
            self.stream_in(&mut batch, l, l.checked_sub(1))?;
            let x = inputs.at(l);
            if !keep {
                // Recomputing layer l for its backward leaves out its output (the backward reads
                // only the intermediates).
                inputs.restore(&mut batch, l)?;
                let io = LayerIo {
                    x,
                    x_normed: false,
                    out: None,
                };
                self.layer_forward(&mut batch, l, io, acts_of(l), &step)?;
                batch.flush();
            }
            let pass = LayerPass {
                l,
                acts: acts_of(l),
                step: &step,
                grads,
            };
            self.layer_backward(&mut batch, &pass, x, &scratch, &dres)
                .with_context(|| format!("backward of layer {l}"))?;
            batch.flush();
        }
        if let Some(g) = full {
            // As transformers' padding_idx: the pad row keeps what it had before the lookups'
            // gradient (earlier micro-batches and, tied, the LM head's).
            let pad_row = match c.pad_token_id.filter(|p| ids.contains(p)) {
                Some(p) => {
                    let p = p as usize;
                    let row = Tensor::zeros(gpu, &[1, h], DType::F32)?;
                    copy_rows(&mut batch, &g.embed, p..p + 1, &row, 0)?;
                    Some((p, row))
                }
                None => None,
            };
            embedding_backward(&mut batch, &token_ids, &dres, &g.embed)?;
            if let Some((p, row)) = &pad_row {
                copy_rows(&mut batch, row, 0..1, &g.embed, *p)?;
            }
        }
        batch.submit();
        Ok(LossSum {
            sum: loss.to_f32(gpu)?[0] as f64,
            tokens: count.to_u32(gpu)?[0] as u64,
        })
    }

    /// Backward of layer `pass.l` given its input `x` and recomputed activations: `dres` holds
    /// dL/d(output) on entry and dL/d(input) on return. In token chunks, each chunk's token-local
    /// part is recomputed just before its backward.
    fn layer_backward(
        &self,
        batch: &mut Batch,
        pass: &LayerPass,
        x: &Tensor,
        s: &Scratch,
        dres: &Tensor,
    ) -> Result<()> {
        let a = pass.acts;
        let whole = (x, &a.attn);
        if a.local.rows == a.rows {
            let rows = LocalRows {
                acts: &a.local,
                whole,
                first: 0,
            };
            self.local_backward(batch, pass, rows, &s.local, (dres, &s.d_attn))?;
        } else {
            for first in (0..a.rows).step_by(a.local.rows) {
                let len = a.local.rows.min(a.rows - first);
                let chunk = a.local.chunk(batch, whole, first, len)?;
                let rows = LocalRows {
                    acts: &chunk,
                    whole,
                    first,
                };
                self.local_forward(batch, pass.l, rows, None, pass.step)?;
                let g = s.local.prefix(batch.gpu, len)?;
                let (Some(d_out), Some(d_attn)) = (&g.d_out, &g.d_attn) else {
                    bail!("a layer's token chunk needs its chunk gradient buffers");
                };
                copy_rows(batch, dres, first..first + len, d_out, 0)?;
                self.local_backward(batch, pass, rows, &g, (d_out, d_attn))?;
                copy_rows(batch, d_attn, 0..len, &s.d_attn, first)?;
                copy_rows(batch, d_out, 0..len, dres, first)?;
                // Releases the chunk's temporaries (LoRA's) before the next.
                batch.flush();
            }
        }
        self.attention_backward(batch, pass, x, s, dres)
    }

    /// Backward of the token-local part over `rows` (its activations recomputed): `d_out` holds
    /// dL/d(layer output) of the rows on entry and dL/d(mid) on return; dL/d(attention output)
    /// goes to `d_attn`.
    fn local_backward(
        &self,
        batch: &mut Batch,
        pass: &LayerPass,
        rows: LocalRows,
        g: &LocalGrads,
        (d_out, d_attn): (&Tensor, &Tensor),
    ) -> Result<()> {
        let (l, a) = (pass.l, rows.acts);
        let layer = &self.layers[l];
        let at = ProjRows {
            u: &a.u,
            first: rows.first,
        };
        let proj = |batch: &mut Batch, p: Proj, dy: &Tensor, x: &Tensor, dx: Out| {
            self.proj_backward(batch, pass, at, p, (dy, x), dx)
                .with_context(|| format!("layer {l} {}", p.path()))
        };
        // MLP: out = mid + down(swiglu(gate(xn2), up(xn2))).
        proj(batch, Proj::Down, d_out, &a.act, Out::write(&g.d_act))?;
        swiglu_backward(batch, &g.d_act, &a.gate, &a.up, &g.d_gate, &g.d_up)?;
        proj(batch, Proj::Gate, &g.d_gate, &a.xn2, Out::write(&g.d_xn))?;
        proj(batch, Proj::Up, &g.d_up, &a.xn2, Out::add(&g.d_xn))?;
        let full = pass.grads.full().map(|g| &g.layers[l]);
        rmsnorm_backward(
            batch,
            &g.d_xn,
            &a.mid,
            &layer.post_norm,
            &a.rstd2,
            Out::add(d_out),
            full.map(|g| Out::add(&g.post_norm)),
        )?;
        // mid = x + o(attn).
        let (_, attn) = rows.inputs();
        proj(batch, Proj::O, d_out, attn, Out::write(d_attn))
    }

    /// Backward of the attention part of layer `pass.l` (from dL/d(attention output) in
    /// `s.d_attn`): adds dL/d(input) through the input norm to `dres`, which holds dL/d(mid).
    fn attention_backward(
        &self,
        batch: &mut Batch,
        pass: &LayerPass,
        x: &Tensor,
        s: &Scratch,
        dres: &Tensor,
    ) -> Result<()> {
        let LayerPass {
            l, acts: a, step, ..
        } = *pass;
        let c = &self.config;
        let layer = &self.layers[l];
        let at = ProjRows { u: &a.u, first: 0 };
        let proj = |batch: &mut Batch, p: Proj, dy: &Tensor, dx: Out| {
            self.proj_backward(batch, pass, at, p, (dy, &a.xn), dx)
                .with_context(|| format!("layer {l} {}", p.path()))
        };
        let dims = AttentionDims {
            batch_size: step.batch_size,
            tq: step.seq_len,
            tk: step.seq_len,
            hq: c.num_attention_heads,
            hkv: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let qkv = Qkv::new(&a.q, &a.k, &a.v);
        let grads = Qkv::new(&s.dq, &s.dk, &s.dv);
        attention_backward(batch, qkv, &a.attn, &a.lse, &s.d_attn, grads, dims)?;
        let positions = Positions::Sequential {
            seq_len: step.seq_len,
            starts: &step.starts,
        };
        let dqk = QueryKey {
            q: &s.dq,
            q_heads: c.num_attention_heads,
            k: &s.dk,
            k_heads: c.num_key_value_heads,
        };
        rope_backward(batch, &self.rope, dqk, &positions)?;
        let d_xn = s.d_xn();
        proj(batch, Proj::Q, &s.dq, Out::write(d_xn))?;
        proj(batch, Proj::K, &s.dk, Out::add(d_xn))?;
        proj(batch, Proj::V, &s.dv, Out::add(d_xn))?;
        let full = pass.grads.full().map(|g| &g.layers[l]);
        rmsnorm_backward(
            batch,
            d_xn,
            x,
            &layer.input_norm,
            &a.rstd1,
            Out::add(dres),
            full.map(|g| Out::add(&g.input_norm)),
        )
    }

    /// Backward of projection `p` of layer `pass.l` (`y = x·Wᵀ + b [+ s·u·Bᵀ]`) over `rows`:
    /// `dx = dy·W [+ LoRA's part] (+ beta·dx)`, and the trainable weights' gradients
    /// accumulated, with the dropout mask the forward applied to the LoRA's input.
    fn proj_backward(
        &self,
        batch: &mut Batch,
        pass: &LayerPass,
        rows: ProjRows,
        p: Proj,
        (dy, x): (&Tensor, &Tensor),
        dx: Out,
    ) -> Result<()> {
        let LayerPass { l, step, grads, .. } = *pass;
        let dropout = step.dropout.and_then(|d| d.mask(l, p));
        let dropout = dropout.map(|d| d.from_row(rows.first, x.row_len()));
        let linear = &self.layers[l].proj[p];
        if let (Some(lora), Some((da, db))) = (&linear.lora, grads.lora(l, p)) {
            let u = rows.u[p].as_ref().context("LoRA activation u missing")?;
            let lora = Lora {
                a: &lora.a,
                b: &lora.b,
                scale: lora.scale,
                dropout,
            };
            let g = LoraGrads {
                a: Out::add(da),
                b: Out::add(db),
            };
            let input = InputGrad {
                dx,
                frozen: Some(&linear.weight),
            };
            return lora_backward(batch, dy, x, u, &lora, &g, Some(input));
        }
        matmul_backward_input(batch, dy, &linear.weight, dx)?;
        if let Some(g) = grads.full() {
            let lg = &g.layers[l];
            matmul_backward_weight(batch, dy, x, Out::add(&lg.weight[p]))?;
            if let Some(db) = &lg.bias[p] {
                sum_rows(batch, dy, Out::add(db), 1.0)?;
            }
        }
        Ok(())
    }
}
