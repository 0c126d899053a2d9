//! The Qwen2 / Qwen2.5 decoder on the GPU kernels, written out explicitly (llm.c style):
//!
//! ```text
//! x = embed(ids)
//! per layer:  h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(x)
//!             x = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                    n2 = rmsnorm(h)
//! logits = lm_head(rmsnorm(x))        (lm_head = embed_tokens when tied)
//! ```
//!
//! Frozen matrices stay bf16 on the device, straight from the memory-mapped checkpoint; norms and
//! biases are f32. A LoRA adapter is applied unmerged through the fused LoRA kernel.
//!
//! Backward-readiness: [`Qwen2::layer_forward`] reads the layer input `x` and writes the layer
//! output, leaving every intermediate its backward needs in [`LayerActs`] (normed inputs, rstd,
//! rotated q/k, v, attention out + lse, the mid residual, gate/up, LoRA's `u = x·Aᵀ`). A trainer
//! keeps each layer's input and either one `LayerActs` per layer from the forward or, where they
//! do not fit, recomputes that layer into one shared `LayerActs` before its backward (the
//! design's per-layer recomputation; see [`Qwen2::kept_activations`]).
//!
//! Logits are only ever formed for the rows asked for ([`Qwen2::logits`], the last row when
//! decoding); the loss path runs the chunked LM-head cross-entropy and never materialises [T, V].
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};
use wgtrain_kernels::ops::attention::{
    attention_forward, attention_forward_ragged, check_head_dim, AttentionDims, KeyLens, Qkv,
};
/// The target of an unsupervised position.
pub use wgtrain_kernels::ops::cross_entropy::IGNORE;
use wgtrain_kernels::ops::cross_entropy::{cross_entropy_forward, Chunking, HeadRows, LmHead};
use wgtrain_kernels::ops::elementwise::{add, copy_rows, scatter_rows};
use wgtrain_kernels::ops::embedding::{embedding_forward, TokenIds};
use wgtrain_kernels::ops::lora::{lora_forward, Dropout, Lora};
use wgtrain_kernels::ops::matmul::{matmul_forward, Gemm, Mat};
use wgtrain_kernels::ops::rmsnorm::{add_rmsnorm_forward, rmsnorm_forward, ResidualAdd};
use wgtrain_kernels::ops::rope::{rope_forward, Positions, QueryKey, Rope};
use wgtrain_kernels::ops::swiglu::swiglu_forward;
use wgtrain_kernels::{Batch, DType, Gpu, Tensor};

use super::adapter::Adapter;
use super::config::Qwen2Config;
use super::params::{names, PerProj, Proj, TensorSpec};
use super::residency::{LayerStream, MemoryPlan, Working};
use super::weights::{to_device, Weights};

/// LoRA factors on the device: A [r, in], B [out, r] (f32) and the scale.
pub struct LoraTensors {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
}

/// A frozen projection `y = x·Wᵀ (+ b)`, plus `s·(x·Aᵀ)·Bᵀ` when a LoRA is applied.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraTensors>,
}

impl Linear {
    /// `u` ([rows, r]) receives `x·Aᵀ` when a LoRA is applied (its backward needs it), x passing
    /// through `dropout` first when training with LoRA dropout.
    fn forward(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        u: Option<&Tensor>,
        y: &Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        match (&self.lora, u) {
            (None, _) => matmul_forward(batch, x, &self.weight, self.bias.as_ref(), y),
            (Some(l), Some(u)) => {
                let lora = Lora {
                    a: &l.a,
                    b: &l.b,
                    scale: l.scale,
                    dropout,
                };
                lora_forward(batch, x, &self.weight, self.bias.as_ref(), &lora, u, y)
            }
            (Some(_), None) => bail!("a LoRA projection was run without its activation buffer"),
        }
    }
}

pub struct Layer {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub proj: PerProj<Linear>,
}

impl Layer {
    /// The frozen tensors of layer `l` with their checkpoint names (what streaming uploads).
    pub(crate) fn tensors(&self, l: usize) -> Vec<(String, &Tensor)> {
        let mut out = vec![
            (names::input_norm(l), &self.input_norm),
            (names::post_norm(l), &self.post_norm),
        ];
        for (p, linear) in self.proj.iter() {
            out.push((names::weight(l, p), &linear.weight));
            if let Some(b) = &linear.bias {
                out.push((names::bias(l, p), b));
            }
        }
        out
    }

    /// A view of `slot`'s frozen tensors without a LoRA: a streamed layer that runs in that slot.
    fn view_of(gpu: &Gpu, slot: &Layer) -> Layer {
        Layer {
            input_norm: slot.input_norm.alias(gpu),
            post_norm: slot.post_norm.alias(gpu),
            proj: PerProj::from_fn(|p| Linear {
                weight: slot.proj[p].weight.alias(gpu),
                bias: slot.proj[p].bias.as_ref().map(|b| b.alias(gpu)),
                lora: None,
            }),
        }
    }
}

/// The model on the device.
pub struct Qwen2 {
    pub config: Qwen2Config,
    /// None when the plan pages it: each forward uploads the rows of its tokens.
    pub embed: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when tied to `embed`, or when the plan pages it: its vocabulary chunks stream
    /// through a ring of device slots.
    pub lm_head: Option<Tensor>,
    pub(crate) rope: Rope,
    /// The memory plan under a budget and the decoder layers, LM head chunks and embedding rows
    /// that stream from the checkpoint (None: no budget, all resident): a streamed layer's
    /// frozen tensors in `layers` are views of its ring slot.
    stream: Option<LayerStream>,
    /// Rows of the token chunks each layer's token-local part runs in (None: whole layers).
    token_chunk: Option<usize>,
    /// Whether training keeps every layer's activations for the backward, as
    /// [`Qwen2::set_keep_activations`] forces it (None: as [`Qwen2::kept_activations`] decides).
    keep_activations: Option<bool>,
    /// Set once the length warning ([`Qwen2Config::length_warning`]) has been printed.
    length_warned: AtomicBool,
}

/// Every intermediate of one decoder layer over `rows` tokens: what its backward reads. The
/// token-local part after attention ([`LocalActs`]) holds one chunk of the tokens at a time when
/// the layer runs in token chunks ([`Qwen2::token_chunk`]). (`T` is a device tensor but for
/// counting their bytes.)
pub struct LayerActs<T = Tensor> {
    pub rows: usize,
    /// input_layernorm(x) and its rstd.
    pub xn: T,
    pub rstd1: T,
    /// Projections (q and k after RoPE).
    pub q: T,
    pub k: T,
    pub v: T,
    /// Attention output and its row log-sum-exp.
    pub attn: T,
    pub lse: T,
    /// `x·Aᵀ` of the q, k and v LoRAs ([rows, r]; the others' are in `local`).
    pub u: PerProj<Option<T>>,
    pub local: LocalActs<T>,
}

/// The intermediates of a decoder layer's token-local part — o_proj, the residual adds, the
/// post-attention norm and the MLP, each row computed from the same row alone — over `rows`
/// tokens: one chunk of the layer's tokens, or all of them.
pub struct LocalActs<T = Tensor> {
    pub rows: usize,
    /// Chunked only: the chunk's rows of the layer input and of the attention output (a whole
    /// layer reads them in place).
    pub x: Option<T>,
    pub attn: Option<T>,
    pub o: T,
    /// x + o_proj(attn): the residual stream between attention and MLP.
    pub mid: T,
    pub xn2: T,
    pub rstd2: T,
    pub gate: T,
    pub up: T,
    /// silu(gate) * up.
    pub act: T,
    pub down: T,
    /// `x·Aᵀ` of the o, gate, up and down LoRAs ([rows, r]).
    pub u: PerProj<Option<T>>,
}

/// Whether projection `p` is in a layer's token-local part (not q, k, v).
pub(crate) fn token_local(p: Proj) -> bool {
    matches!(p, Proj::O | Proj::Gate | Proj::Up | Proj::Down)
}

/// `x·Aᵀ` of the LoRAs of `ranks` in (`local`) or out of the token-local part over `rows` tokens.
fn lora_us<T>(
    ranks: &PerProj<Option<usize>>,
    local: bool,
    rows: usize,
    make: &mut impl FnMut(&[usize]) -> Result<T>,
) -> Result<PerProj<Option<T>>> {
    PerProj::try_from_fn(|p| match ranks[p].filter(|_| token_local(p) == local) {
        Some(r) => make(&[rows, r]).map(Some),
        None => Ok(None),
    })
}

impl<T> LayerActs<T> {
    /// The activations for `rows` tokens, the token-local part `chunk` rows of them at a time,
    /// with LoRAs of `ranks`, each made by `make(shape)`: the one list of their shapes, in
    /// allocation order.
    fn build(
        c: &Qwen2Config,
        ranks: &PerProj<Option<usize>>,
        (rows, chunk): (usize, usize),
        mut make: impl FnMut(&[usize]) -> Result<T>,
    ) -> Result<LayerActs<T>> {
        let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let chunked = chunk < rows;
        Ok(LayerActs {
            rows,
            xn: make(&[rows, h])?,
            rstd1: make(&[rows])?,
            q: make(&[rows, q])?,
            k: make(&[rows, kv])?,
            v: make(&[rows, kv])?,
            attn: make(&[rows, q])?,
            lse: make(&[rows, c.num_attention_heads])?,
            u: lora_us(ranks, false, rows, &mut make)?,
            local: LocalActs {
                rows: chunk,
                x: chunked.then(|| make(&[chunk, h])).transpose()?,
                attn: chunked.then(|| make(&[chunk, q])).transpose()?,
                o: make(&[chunk, h])?,
                mid: make(&[chunk, h])?,
                xn2: make(&[chunk, h])?,
                rstd2: make(&[chunk])?,
                gate: make(&[chunk, i])?,
                up: make(&[chunk, i])?,
                act: make(&[chunk, i])?,
                down: make(&[chunk, h])?,
                u: lora_us(ranks, true, chunk, &mut make)?,
            },
        })
    }
}

impl LayerActs {
    /// Activations sized for `rows` tokens (one set serves every layer of an inference pass),
    /// the token-local part in the model's token chunks.
    pub fn new(gpu: &Gpu, model: &Qwen2, rows: usize) -> Result<LayerActs> {
        let ranks = model.lora_ranks();
        LayerActs::build(&model.config, &ranks, model.chunk_rows(rows), |shape| {
            Tensor::zeros(gpu, shape, DType::F32)
        })
    }

    /// Device bytes `LayerActs::new(.., rows)` allocates.
    pub fn bytes(model: &Qwen2, rows: usize) -> u64 {
        LayerActs::bytes_for(&model.config, &model.lora_ranks(), model.chunk_rows(rows))
    }

    /// Device bytes of the activations of `(rows, chunk)` ([`LayerActs::build`]) with LoRAs of
    /// `ranks`.
    pub fn bytes_for(
        config: &Qwen2Config,
        ranks: &PerProj<Option<usize>>,
        rows: (usize, usize),
    ) -> u64 {
        let mut f32s = 0;
        let counted = LayerActs::<()>::build(config, ranks, rows, |shape| {
            f32s += shape.iter().product::<usize>();
            Ok(())
        });
        debug_assert!(counted.is_ok(), "counting never fails");
        f32s as u64 * 4
    }
}

impl LocalActs {
    /// The chunk of `len` rows from row `first` of a layer whose input is `x` and attention
    /// output `attn`: these buffers' first `len` rows, the chunk's rows of x and attn copied in.
    pub(crate) fn chunk(
        &self,
        batch: &mut Batch,
        (x, attn): (&Tensor, &Tensor),
        first: usize,
        len: usize,
    ) -> Result<LocalActs> {
        let gpu = batch.gpu;
        let prefix = |t: &Tensor| t.prefix(gpu, len);
        let opt = |t: &Option<Tensor>| t.as_ref().map(prefix).transpose();
        let chunk = LocalActs {
            rows: len,
            x: opt(&self.x)?,
            attn: opt(&self.attn)?,
            o: prefix(&self.o)?,
            mid: prefix(&self.mid)?,
            xn2: prefix(&self.xn2)?,
            rstd2: prefix(&self.rstd2)?,
            gate: prefix(&self.gate)?,
            up: prefix(&self.up)?,
            act: prefix(&self.act)?,
            down: prefix(&self.down)?,
            u: PerProj::try_from_fn(|p| opt(&self.u[p]))?,
        };
        let (Some(x_rows), Some(attn_rows)) = (&chunk.x, &chunk.attn) else {
            bail!("a layer's token chunk needs its chunk buffers");
        };
        copy_rows(batch, x, first..first + len, x_rows, 0)?;
        copy_rows(batch, attn, first..first + len, attn_rows, 0)?;
        Ok(chunk)
    }
}

/// Keys and values of past tokens, after RoPE: per layer [slots * capacity, kv_dim] f32, slot s
/// holding one sequence of up to `capacity` tokens at rows s * capacity.., each slot of its own
/// length. One slot serves [`Qwen2::forward_cached`]; batched generation decodes slots 0..B
/// together and keeps its active sequences in the first slots ([`KvCache::move_slot`]).
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    lens: Vec<usize>,
    capacity: usize,
}

impl KvCache {
    /// A one-sequence cache.
    pub fn new(gpu: &Gpu, model: &Qwen2, capacity: usize) -> Result<KvCache> {
        KvCache::with_slots(gpu, model, 1, capacity)
    }

    /// `slots` sequences of up to `capacity` tokens each.
    pub fn with_slots(gpu: &Gpu, model: &Qwen2, slots: usize, capacity: usize) -> Result<KvCache> {
        ensure!(
            slots > 0 && capacity > 0,
            "a KV cache needs a positive slot count and capacity, got {slots} x {capacity}"
        );
        let c = &model.config;
        let tensors = || -> Result<Vec<Tensor>> {
            (0..c.num_hidden_layers)
                .map(|_| Tensor::zeros(gpu, &[slots * capacity, c.kv_dim()], DType::F32))
                .collect()
        };
        Ok(KvCache {
            k: tensors()?,
            v: tensors()?,
            lens: vec![0; slots],
            capacity,
        })
    }

    /// Tokens cached in slot 0 (a one-sequence cache's sequence).
    pub fn len(&self) -> usize {
        self.lens[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens cached in each slot.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Tokens one slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn device_bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(Tensor::device_bytes).sum()
    }

    /// Device bytes of a cache of `slots` x `capacity` tokens for `config`.
    pub fn bytes(config: &Qwen2Config, slots: usize, capacity: usize) -> u64 {
        (2 * config.num_hidden_layers * slots * capacity * config.kv_dim() * 4) as u64
    }

    /// Forgets slot `slot`'s tokens (the next prefill overwrites its rows).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Moves the tokens of slot `from` into the empty slot `to`, leaving `from` empty: batched
    /// generation fills the hole a finished sequence leaves with its last active one, so the
    /// active sequences stay slots 0..B and cost nothing once finished.
    pub fn move_slot(&mut self, gpu: &Gpu, from: usize, to: usize) -> Result<()> {
        let slots = self.lens.len();
        ensure!(
            from < slots && to < slots && from != to && self.lens[to] == 0,
            "cannot move KV cache slot {from} into slot {to} ({slots} slots, lengths {:?})",
            self.lens
        );
        let (len, cap) = (self.lens[from], self.capacity);
        let mut batch = gpu.batch();
        for t in self.k.iter().chain(&self.v) {
            copy_rows(&mut batch, t, from * cap..from * cap + len, t, to * cap)?;
        }
        batch.submit();
        self.lens[to] = len;
        self.lens[from] = 0;
        Ok(())
    }

    /// Where `seq_len` new tokens of each slot in `slots` go, checked to fit. A step that reads
    /// cached keys (any slot non-empty) runs slots 0..B in order: the attention's sequence b reads
    /// slot b.
    fn step(
        &self,
        gpu: &Gpu,
        slots: &[usize],
        seq_len: usize,
    ) -> Result<(Vec<u32>, CacheStep<'_>)> {
        let mut seen = vec![false; self.lens.len()];
        for &s in slots {
            ensure!(
                s < seen.len() && !std::mem::replace(&mut seen[s], true),
                "KV cache slots {slots:?}: each must be one of the {} slots, once",
                seen.len()
            );
            ensure!(
                self.lens[s] + seq_len <= self.capacity,
                "KV cache slot {s} holds {} tokens; {} cached + {seq_len} new do not fit",
                self.capacity,
                self.lens[s]
            );
        }
        let pasts: Vec<usize> = slots.iter().map(|&s| self.lens[s]).collect();
        ensure!(
            pasts.iter().all(|&p| p == 0) || slots.iter().enumerate().all(|(b, &s)| b == s),
            "KV cache slots {slots:?}: extending cached sequences needs slots 0..{} in order",
            slots.len()
        );
        let rows: Vec<u32> = slots
            .iter()
            .zip(&pasts)
            .flat_map(|(&s, &past)| {
                let first = s * self.capacity + past;
                (first..first + seq_len).map(|r| r as u32)
            })
            .collect();
        let lens: Vec<u32> = pasts.iter().map(|&p| (p + seq_len) as u32).collect();
        let step = CacheStep {
            cache: self,
            rows: Tensor::from_u32(gpu, &[rows.len()], &rows)?,
            lens: Tensor::from_u32(gpu, &[lens.len()], &lens)?,
        };
        Ok((pasts.iter().map(|&p| p as u32).collect(), step))
    }
}

/// LoRA dropout of one training micro-batch (PEFT's `lora_dropout`): the probability and a seed
/// from which every layer and projection derives its own mask, so the per-layer recomputation and
/// the backward regenerate exactly the masks of the forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropout {
    pub p: f32,
    pub seed: u64,
}

impl LoraDropout {
    /// The mask of projection `proj` of layer `layer` (independent across modules, as PEFT's
    /// separate `lora_dropout` modules are); None when p = 0, which keeps the fused launches.
    pub(crate) fn mask(&self, layer: usize, proj: Proj) -> Option<Dropout> {
        let module = (layer * Proj::ALL.len() + proj.index()) as u64;
        let seed = splitmix64(self.seed ^ splitmix64(module)) as u32;
        (self.p > 0.0).then(|| Dropout::new(self.p, seed))
    }
}

/// The token chunk `WGTRAIN_TOKEN_CHUNK` forces (rows; for tests and measurements), if set.
fn forced_token_chunk() -> Result<Option<usize>> {
    let Ok(text) = std::env::var("WGTRAIN_TOKEN_CHUNK") else {
        return Ok(None);
    };
    match text.trim().parse() {
        Ok(rows) if rows > 0 => Ok(Some(rows)),
        _ => bail!("WGTRAIN_TOKEN_CHUNK '{text}': expected a positive number of token rows"),
    }
}

/// SplitMix64's finaliser: decorrelates the seeds of neighbouring modules and micro-batches.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The input and output of one decoder layer's forward ([`Qwen2::layer_forward`]).
pub(crate) struct LayerIo<'a> {
    pub(crate) x: &'a Tensor,
    /// `acts.xn` and `acts.rstd1` already hold x's input norm: the previous layer's
    /// [`LayerOut`] made them.
    pub(crate) x_normed: bool,
    /// None when recomputing the layer for its backward, which reads only the intermediates.
    pub(crate) out: Option<LayerOut<'a>>,
}

/// Where a layer writes its output `mid + down`: `out`, and in the same launch its RMSNorm with
/// `weight` — the next layer's input norm (into that layer's `LayerActs`) or the final norm.
pub(crate) struct LayerOut<'a> {
    pub(crate) out: &'a Tensor,
    pub(crate) weight: &'a Tensor,
    pub(crate) normed: &'a Tensor,
    pub(crate) rstd: &'a Tensor,
}

/// The rows the token-local part of a layer runs over: a chunk of its tokens, or all of them.
#[derive(Clone, Copy)]
pub(crate) struct LocalRows<'a> {
    /// Their activations (a chunk's, or the whole layer's).
    pub(crate) acts: &'a LocalActs,
    /// The layer's input and attention output, all rows (a chunk has its rows copied in `acts`).
    pub(crate) whole: (&'a Tensor, &'a Tensor),
    /// The index of the first row in the layer.
    pub(crate) first: usize,
}

impl LocalRows<'_> {
    /// The rows' input and attention output.
    pub(crate) fn inputs(&self) -> (&Tensor, &Tensor) {
        let a = self.acts;
        (
            a.x.as_ref().unwrap_or(self.whole.0),
            a.attn.as_ref().unwrap_or(self.whole.1),
        )
    }
}

/// Where one forward writes its new keys and values in a KV cache.
pub(crate) struct CacheStep<'a> {
    pub(crate) cache: &'a KvCache,
    /// u32 [rows]: the cache row of each new token.
    pub(crate) rows: Tensor,
    /// u32 [batch_size]: each sequence's keys after this step.
    pub(crate) lens: Tensor,
}

/// The rows of one forward: `batch_size` sequences of `seq_len` new tokens, each following the
/// tokens it already has in `cache`.
pub(crate) struct Step<'a> {
    pub(crate) batch_size: usize,
    pub(crate) seq_len: usize,
    /// Cached tokens of the longest sequence; 0 when every sequence starts empty, so that its new
    /// keys are all it attends to.
    pub(crate) past: usize,
    /// u32 [batch_size]: each sequence's cached tokens (RoPE positions start there).
    pub(crate) starts: Tensor,
    pub(crate) cache: Option<CacheStep<'a>>,
    /// Training only: None for inference.
    pub(crate) dropout: Option<LoraDropout>,
}

/// Next-token targets of a row: `targets[t] = ids[t + 1]` where token t + 1 is supervised, else
/// [`IGNORE`] (and always for the last position).
pub fn next_token_targets(ids: &[u32], labels_mask: &[bool]) -> Vec<u32> {
    (0..ids.len())
        .map(|t| match labels_mask.get(t + 1) {
            Some(true) => ids[t + 1],
            _ => IGNORE,
        })
        .collect()
}

/// (ids, targets) rows padded to the longest into one [B·T] batch, with T: padding ids are 0 and
/// unsupervised, and causal attention keeps them from affecting the real tokens.
pub(crate) fn pad_rows(rows: &[(&[u32], &[u32])]) -> Result<(Vec<u32>, Vec<u32>, usize)> {
    let seq_len = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    ensure!(seq_len > 0, "a batch without tokens");
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for (row_ids, row_targets) in rows {
        ensure!(
            row_ids.len() == row_targets.len(),
            "a row has {} ids and {} targets",
            row_ids.len(),
            row_targets.len()
        );
        ids.extend_from_slice(row_ids);
        ids.resize(ids.len() + seq_len - row_ids.len(), 0);
        targets.extend_from_slice(row_targets);
        targets.resize(ids.len(), IGNORE);
    }
    Ok((ids, targets, seq_len))
}

/// A masked loss: summed cross-entropy and the number of supervised tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub tokens: u64,
}

impl Qwen2 {
    /// Loads a Hugging Face checkpoint directory (config.json + safetensors), checking every tensor
    /// against the config first. Under a device memory budget ([`Gpu::device_memory`]) the plan
    /// is made for the weights alone (what inference holds besides them comes on top).
    pub fn load(gpu: &Gpu, dir: impl AsRef<Path>) -> Result<Qwen2> {
        Qwen2::load_planned(gpu, dir, Working::default())
    }

    /// [`Qwen2::load`] under the memory plan for a workload that holds `working` besides the
    /// weights ([`MemoryPlan::fit`] of [`Gpu::device_memory`]): the layers that do not fit stream
    /// from the memory-mapped checkpoint.
    pub fn load_planned(gpu: &Gpu, dir: impl AsRef<Path>, working: Working) -> Result<Qwen2> {
        let dir = dir.as_ref();
        ensure!(
            dir.is_dir(),
            "model directory {} does not exist",
            dir.display()
        );
        let config = Qwen2Config::load(dir)?;
        let weights = Weights::open(dir)?;
        let plan = MemoryPlan::fit(&config, gpu.device_memory(), working)?;
        Qwen2::from_weights(gpu, config, weights, plan)
    }

    /// The model of `config` from the checkpoint `weights` (checked against the config first),
    /// the layers `plan` streams left in the memory map.
    pub fn from_weights(
        gpu: &Gpu,
        config: Qwen2Config,
        weights: Weights,
        plan: MemoryPlan,
    ) -> Result<Qwen2> {
        weights.validate(&config)?;
        let upload = |spec: &TensorSpec, dtype| to_device(gpu, &weights.get(&spec.name)?, dtype);
        let model = Qwen2::build_planned(gpu, config, &plan, upload)?;
        model.streaming_from(gpu, plan, Some(weights))
    }

    /// Builds the model from `tensor(spec, dtype)`, called once for every tensor of
    /// [`super::qwen2_tensors`] with the device dtype wanted (bf16 matrices, f32 vectors). Lets a
    /// benchmark supply random weights of a real model's shapes.
    pub fn build(
        gpu: &Gpu,
        config: Qwen2Config,
        tensor: impl FnMut(&TensorSpec, DType) -> Result<Tensor>,
    ) -> Result<Qwen2> {
        let plan = MemoryPlan::resident(&config);
        Qwen2::build_planned(gpu, config, &plan, tensor)
    }

    /// Hands the model its plan under a budget, the stream of its streamed layers and paged
    /// tables (read from `source`) and the plan's token chunks, or those `WGTRAIN_TOKEN_CHUNK`
    /// forces.
    pub(crate) fn streaming_from(
        mut self,
        gpu: &Gpu,
        plan: MemoryPlan,
        source: Option<Weights>,
    ) -> Result<Qwen2> {
        self.set_token_chunk(forced_token_chunk()?.or(plan.chunk))?;
        if plan.budget.is_some() {
            self.stream = Some(LayerStream::new(gpu, &self.config, plan, source)?);
        }
        Ok(self)
    }

    /// Rows of the token chunks each layer's token-local part (o_proj, the residual adds, the
    /// post-attention norm and the MLP) runs in; None: whole layers.
    pub fn token_chunk(&self) -> Option<usize> {
        self.token_chunk
    }

    /// Runs each layer's token-local part in chunks of `rows` tokens (None: whole layers),
    /// whatever the memory plan chose.
    pub fn set_token_chunk(&mut self, rows: Option<usize>) -> Result<()> {
        ensure!(rows != Some(0), "a token chunk of 0 rows");
        self.token_chunk = rows;
        Ok(())
    }

    /// Forces training to keep every layer's activations for the backward (`Some(true)`) or to
    /// recompute each layer (`Some(false)`), whatever the memory plan chose; None: as planned.
    pub fn set_keep_activations(&mut self, keep: Option<bool>) {
        self.keep_activations = keep;
    }

    /// What [`Qwen2::set_keep_activations`] forced, if anything.
    pub(crate) fn keep_override(&self) -> Option<bool> {
        self.keep_activations
    }

    /// A pass over `rows` tokens as [`LayerActs::build`] takes it: (rows, rows of a chunk).
    pub(crate) fn chunk_rows(&self, rows: usize) -> (usize, usize) {
        (rows, self.token_chunk.map_or(rows, |c| c.min(rows)))
    }

    /// [`Qwen2::build`] under `plan`: `tensor` is called for the resident layers and for the first
    /// layer of each ring slot (which it then holds); the other streamed layers are views of
    /// their slot, and a paged embedding or LM head is not made. The caller gives the model its
    /// [`LayerStream`] ([`Qwen2::streaming_from`]).
    pub(crate) fn build_planned(
        gpu: &Gpu,
        config: Qwen2Config,
        plan: &MemoryPlan,
        mut tensor: impl FnMut(&TensorSpec, DType) -> Result<Tensor>,
    ) -> Result<Qwen2> {
        check_head_dim(config.head_dim).context("model config")?;
        let mut get = |name: String, shape: &[usize]| {
            let dtype = if shape.len() == 1 {
                DType::F32
            } else {
                DType::BF16
            };
            let spec = TensorSpec {
                name,
                shape: shape.to_vec(),
            };
            tensor(&spec, dtype).with_context(|| format!("loading tensor {}", spec.name))
        };
        let h = config.hidden_size;
        let table = [config.vocab_size, h];
        let embed = match plan.paging.embedding {
            true => None,
            false => Some(get(names::EMBED.into(), &table)?),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            if l >= plan.resident_layers + plan.slots {
                let slot = &layers[plan.resident_layers + (l - plan.resident_layers) % plan.slots];
                layers.push(Layer::view_of(gpu, slot));
                continue;
            }
            let input_norm = get(names::input_norm(l), &[h])?;
            let post_norm = get(names::post_norm(l), &[h])?;
            let linear = |proj: Proj| -> Result<Linear> {
                let (out_f, in_f) = proj.shape(&config);
                Ok(Linear {
                    weight: get(names::weight(l, proj), &[out_f, in_f])?,
                    bias: match proj.has_bias() {
                        true => Some(get(names::bias(l, proj), &[out_f])?),
                        false => None,
                    },
                    lora: None,
                })
            };
            let proj = PerProj::try_from_fn(linear)?;
            layers.push(Layer {
                input_norm,
                post_norm,
                proj,
            });
        }
        let norm = get(names::FINAL_NORM.into(), &[h])?;
        let lm_head = match config.tie_word_embeddings || plan.paging.head {
            true => None,
            false => Some(get(names::LM_HEAD.into(), &table)?),
        };
        let rope = Rope::new(gpu, config.head_dim, config.rope_theta)?;
        Ok(Qwen2 {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            stream: None,
            token_chunk: None,
            keep_activations: None,
            length_warned: AtomicBool::new(false),
        })
    }

    /// The memory plan under a budget (None: no budget, everything resident).
    pub fn memory_plan(&self) -> Option<&MemoryPlan> {
        self.stream.as_ref().map(|s| &s.plan)
    }

    /// Bytes of streamed weights uploaded host -> device so far.
    pub fn streamed_bytes(&self) -> u64 {
        self.stream.as_ref().map_or(0, LayerStream::uploaded)
    }

    /// Before recording decoder layer `l`: when it streams, submits the recorded work (which may
    /// read the slot about to be overwritten; queued uploads run after it), queues the upload of
    /// layer `l` unless its slot holds it, then that of `next`, the layer to run after it, when
    /// it has a slot of its own, so that its upload overlaps this layer's work.
    pub(crate) fn stream_in(&self, batch: &mut Batch, l: usize, next: Option<usize>) -> Result<()> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        if stream.slot(l).is_none() && next.and_then(|n| stream.slot(n)).is_none() {
            return Ok(());
        }
        batch.flush();
        let fetch = |l: usize| {
            stream
                .fetch(batch.gpu, l, &self.layers[l])
                .with_context(|| format!("streaming decoder layer {l}"))
        };
        fetch(l)?;
        match next {
            Some(n) if stream.slot(n) != stream.slot(l) => fetch(n),
            _ => Ok(()),
        }
    }

    /// Prints the length warning the first time a sequence of this model reaches `tokens` past
    /// `max_position_embeddings`.
    pub(crate) fn note_length(&self, tokens: usize) {
        if let Some(warning) = self.config.length_warning(tokens) {
            if !self.length_warned.swap(true, Ordering::Relaxed) {
                eprintln!("warning: {warning}");
            }
        }
    }

    /// Applies `adapter` unmerged (replacing any applied before).
    pub fn apply_adapter(&mut self, gpu: &Gpu, adapter: &Adapter) -> Result<()> {
        let (r, scale) = (adapter.config.r, adapter.config.scale());
        for layer in &mut self.layers {
            for linear in layer.proj.values_mut() {
                linear.lora = None;
            }
        }
        // Every factor packed together: one optimizer launch updates them all.
        let shapes: Vec<Vec<usize>> = adapter
            .modules
            .keys()
            .flat_map(|&(_, proj)| {
                let (out_f, in_f) = proj.shape(&self.config);
                [vec![r, in_f], vec![out_f, r]]
            })
            .collect();
        let mut packed = Tensor::packed(gpu, &shapes, DType::F32)?.into_iter();
        for (&(l, proj), pair) in &adapter.modules {
            let mut next = || packed.next().expect("two packed tensors per module");
            let (a, b) = (next(), next());
            a.write_f32(gpu, &pair.a)
                .with_context(|| format!("LoRA A of layer {l} {}", proj.path()))?;
            b.write_f32(gpu, &pair.b)
                .with_context(|| format!("LoRA B of layer {l} {}", proj.path()))?;
            let layer = self.layers.get_mut(l).with_context(|| {
                format!("the adapter has layer {l}; the model has fewer layers")
            })?;
            layer.proj[proj].lora = Some(LoraTensors { a, b, scale });
        }
        Ok(())
    }

    /// LoRA rank of each projection (the same in every layer that has one).
    pub(crate) fn lora_ranks(&self) -> PerProj<Option<usize>> {
        let mut ranks = PerProj::<Option<usize>>::default();
        for layer in &self.layers {
            for (rank, linear) in ranks.values_mut().zip(layer.proj.values()) {
                if let Some(l) = &linear.lora {
                    *rank = Some(rank.unwrap_or(0).max(l.a.rows()));
                }
            }
        }
        ranks
    }

    /// The LM head as the loss and the logits read it: its own matrix, the embedding when tied,
    /// or (paged) its chunks uploaded from the checkpoint as they are asked for.
    pub fn head(&self) -> Result<&dyn HeadRows> {
        if let Some(stream) = self.stream.as_ref().filter(|s| s.head_chunks().is_some()) {
            return Ok(stream);
        }
        let table = self.lm_head.as_ref().or(self.embed.as_ref());
        Ok(table.context("the model has neither an LM head nor a paged one")?)
    }

    /// The vocabulary chunks the logits are made in: the paged head's, or one.
    fn logit_chunks(&self) -> Vec<Range<usize>> {
        match self.stream.as_ref().and_then(LayerStream::head_chunks) {
            Some(chunks) => chunks.to_vec(),
            // The whole vocabulary is one chunk.
            None => std::iter::once(0..self.config.vocab_size).collect(),
        }
    }

    /// Records `x = embed(ids)`: a lookup in the resident table, or (paged) in the rows of `ids`
    /// gathered on the host from the memory map and uploaded in order, by the same kernel and so
    /// to the same values.
    pub(crate) fn record_embedding(
        &self,
        batch: &mut Batch,
        ids: &TokenIds,
        x: &Tensor,
    ) -> Result<()> {
        if let Some(table) = &self.embed {
            return embedding_forward(batch, ids, table, x);
        }
        let stream = self
            .stream
            .as_ref()
            .context("the model has neither an embedding table nor a paged one")?;
        let gpu = batch.gpu;
        ids.check_vocab(self.config.vocab_size)?;
        let rows = stream.embedding_rows(gpu, ids.host(), self.config.hidden_size)?;
        let order: Vec<u32> = (0..ids.host().len() as u32).collect();
        let order = TokenIds::new(gpu, &order)?;
        embedding_forward(batch, &order, &rows, x)?;
        batch.keep(rows);
        batch.keep(order.into_tensor());
        Ok(())
    }

    /// Device bytes of the weights (and applied adapter).
    pub fn device_bytes(&self) -> u64 {
        let linear = |l: &Linear| {
            l.weight.device_bytes()
                + l.bias.as_ref().map_or(0, Tensor::device_bytes)
                + l.lora
                    .as_ref()
                    .map_or(0, |l| l.a.device_bytes() + l.b.device_bytes())
        };
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                l.input_norm.device_bytes()
                    + l.post_norm.device_bytes()
                    + l.proj.values().map(linear).sum::<u64>()
            })
            .sum();
        self.embed.as_ref().map_or(0, Tensor::device_bytes)
            + layers
            + self.norm.device_bytes()
            + self.lm_head.as_ref().map_or(0, Tensor::device_bytes)
            + self.stream.as_ref().map_or(0, LayerStream::device_bytes)
    }

    /// Whether layer `l - 1`'s output was normed with layer `l`'s input norm in its own launch
    /// ([`Qwen2::chained_out`]): layer `l`'s weights are on the device while `l - 1` runs unless
    /// both stream through one device slot, and then `l` norms its input itself.
    pub(crate) fn chains_into(&self, l: usize) -> bool {
        l > 0
            && self.stream.as_ref().is_none_or(|stream| {
                stream.slot(l).is_none() || stream.slot(l) != stream.slot(l - 1)
            })
    }

    /// Where layer `l` of a forward over every layer writes its output `out`: normed in the same
    /// launch by the next layer's input norm into `acts` (which that layer then reads, see
    /// [`LayerIo::x_normed`]), or after the last layer by the final norm into `last`
    /// (hidden states, rstd).
    pub(crate) fn chained_out<'a>(
        &'a self,
        l: usize,
        out: &'a Tensor,
        acts: &'a LayerActs,
        last: (&'a Tensor, &'a Tensor),
    ) -> LayerOut<'a> {
        let (weight, (normed, rstd)) = match self.layers.get(l + 1) {
            Some(next) => (&next.input_norm, (&acts.xn, &acts.rstd1)),
            None => (&self.norm, last),
        };
        LayerOut {
            out,
            weight,
            normed,
            rstd,
        }
    }

    /// Records decoder layer `l`: reads the residual stream `io.x` [rows, hidden], writes the
    /// next one as `io.out` says, and leaves the layer's intermediates in `acts`. Each residual
    /// add is fused with the RMSNorm that follows it (one launch fewer each, same arithmetic).
    /// In token chunks, the token-local part runs chunk by chunk after attention (the layer's
    /// output normed after the last), and a recomputation (`io.out` None) stops at attention:
    /// the backward recomputes each chunk before its own backward.
    pub(crate) fn layer_forward(
        &self,
        batch: &mut Batch,
        l: usize,
        io: LayerIo,
        acts: &LayerActs,
        step: &Step,
    ) -> Result<()> {
        self.attention_forward(batch, l, &io, acts, step)?;
        let whole = (io.x, &acts.attn);
        if acts.local.rows == acts.rows {
            let rows = LocalRows {
                acts: &acts.local,
                whole,
                first: 0,
            };
            return self.local_forward(batch, l, rows, io.out, step);
        }
        let Some(out) = io.out else {
            return Ok(());
        };
        for first in (0..acts.rows).step_by(acts.local.rows) {
            let len = acts.local.rows.min(acts.rows - first);
            let chunk = acts.local.chunk(batch, whole, first, len)?;
            let rows = LocalRows {
                acts: &chunk,
                whole,
                first,
            };
            self.local_forward(batch, l, rows, None, step)?;
            // o is free again: it takes the chunk's output, mid + down.
            add(batch, &chunk.mid, &chunk.down, &chunk.o, 1.0, 1.0)?;
            copy_rows(batch, &chunk.o, 0..len, out.out, first)?;
            // Releases the chunk's temporaries (LoRA dropout's inputs) before the next.
            batch.flush();
        }
        let eps = self.config.rms_norm_eps as f32;
        rmsnorm_forward(batch, out.out, out.weight, eps, out.normed, out.rstd)
    }

    /// Layer `l` up to and including attention: the input norm (unless `io.x_normed`), q, k, v,
    /// RoPE and attention (reading and extending the KV cache of `step`).
    fn attention_forward(
        &self,
        batch: &mut Batch,
        l: usize,
        io: &LayerIo,
        a: &LayerActs,
        step: &Step,
    ) -> Result<()> {
        let c = &self.config;
        let layer = &self.layers[l];
        let proj = |batch: &mut Batch, p: Proj, y: &Tensor| {
            let dropout = step.dropout.and_then(|d| d.mask(l, p));
            layer.proj[p]
                .forward(batch, &a.xn, a.u[p].as_ref(), y, dropout)
                .with_context(|| format!("layer {l} {}", p.path()))
        };
        if !io.x_normed {
            let eps = c.rms_norm_eps as f32;
            rmsnorm_forward(batch, io.x, &layer.input_norm, eps, &a.xn, &a.rstd1)?;
        }
        proj(batch, Proj::Q, &a.q)?;
        proj(batch, Proj::K, &a.k)?;
        proj(batch, Proj::V, &a.v)?;
        let positions = Positions::Sequential {
            seq_len: step.seq_len,
            starts: &step.starts,
        };
        let qk = QueryKey {
            q: &a.q,
            q_heads: c.num_attention_heads,
            k: &a.k,
            k_heads: c.num_key_value_heads,
        };
        rope_forward(batch, &self.rope, qk, &positions)?;
        let dims = AttentionDims {
            batch_size: step.batch_size,
            tq: step.seq_len,
            tk: step.past + step.seq_len,
            hq: c.num_attention_heads,
            hkv: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        if let Some(kv) = &step.cache {
            scatter_rows(batch, &a.k, &kv.cache.k[l], &kv.rows)?;
            scatter_rows(batch, &a.v, &kv.cache.v[l], &kv.rows)?;
        }
        match step.cache.as_ref().filter(|_| step.past > 0) {
            Some(kv) => {
                let keys = KeyLens {
                    lens: &kv.lens,
                    capacity: kv.cache.capacity,
                };
                let (k, v) = (&kv.cache.k[l], &kv.cache.v[l]);
                attention_forward_ragged(batch, Qkv { q: &a.q, k, v }, &a.attn, &a.lse, dims, keys)
            }
            // No cache, or every sequence starts empty: the new keys are all there is.
            None => {
                let qkv = Qkv::new(&a.q, &a.k, &a.v);
                attention_forward(batch, qkv, &a.attn, &a.lse, dims)
            }
        }
    }

    /// The token-local part of layer `l` over `rows`: from the attention output to the layer
    /// output, written as `out` says (None: left in `mid` and `down`). LoRA dropout masks the
    /// rows as it masks them in the whole layer.
    pub(crate) fn local_forward(
        &self,
        batch: &mut Batch,
        l: usize,
        rows: LocalRows,
        out: Option<LayerOut>,
        step: &Step,
    ) -> Result<()> {
        let (a, first) = (rows.acts, rows.first);
        let layer = &self.layers[l];
        let eps = self.config.rms_norm_eps as f32;
        let proj = |batch: &mut Batch, p: Proj, x: &Tensor, y: &Tensor| {
            let dropout = step.dropout.and_then(|d| d.mask(l, p));
            let dropout = dropout.map(|d| d.from_row(first, x.row_len()));
            layer.proj[p]
                .forward(batch, x, a.u[p].as_ref(), y, dropout)
                .with_context(|| format!("layer {l} {}", p.path()))
        };
        let (x, attn) = rows.inputs();
        proj(batch, Proj::O, attn, &a.o)?;
        let residual = ResidualAdd {
            a: x,
            b: &a.o,
            sum: &a.mid,
        };
        add_rmsnorm_forward(batch, residual, &layer.post_norm, eps, &a.xn2, &a.rstd2)?;
        proj(batch, Proj::Gate, &a.xn2, &a.gate)?;
        proj(batch, Proj::Up, &a.xn2, &a.up)?;
        swiglu_forward(batch, &a.gate, &a.up, &a.act)?;
        proj(batch, Proj::Down, &a.act, &a.down)?;
        let Some(out) = out else {
            return Ok(());
        };
        let residual = ResidualAdd {
            a: &a.mid,
            b: &a.down,
            sum: out.out,
        };
        add_rmsnorm_forward(batch, residual, out.weight, eps, out.normed, out.rstd)
    }

    /// Records embedding, every layer and the final norm over `ids` (`batch_size` sequences of
    /// equal length, stacked; with a cache, the next tokens of the sequences in the given slots);
    /// returns the normed final hidden states [rows, hidden].
    fn record_hidden(
        &self,
        batch: &mut Batch,
        ids: &[u32],
        batch_size: usize,
        cache: Option<(&KvCache, &[usize])>,
    ) -> Result<Tensor> {
        let gpu = batch.gpu;
        let (rows, h) = (ids.len(), self.config.hidden_size);
        ensure!(
            rows > 0 && batch_size > 0 && rows % batch_size == 0,
            "{rows} tokens are not {batch_size} equal sequences"
        );
        let seq_len = rows / batch_size;
        let (starts, cache) = match cache {
            Some((cache, slots)) => {
                ensure!(
                    slots.len() == batch_size,
                    "{batch_size} sequences in {} KV cache slots",
                    slots.len()
                );
                let (starts, step) = cache.step(gpu, slots, seq_len)?;
                (starts, Some(step))
            }
            None => (vec![0; batch_size], None),
        };
        let step = Step {
            batch_size,
            seq_len,
            past: starts.iter().copied().max().unwrap_or(0) as usize,
            starts: Tensor::from_u32(gpu, &[batch_size], &starts)?,
            cache,
            dropout: None,
        };
        self.note_length(step.past + seq_len);
        let ids = TokenIds::new(gpu, ids)?;
        let acts = LayerActs::new(gpu, self, rows)?;
        let mut x = Tensor::zeros(gpu, &[rows, h], DType::F32)?;
        let mut y = Tensor::zeros(gpu, &[rows, h], DType::F32)?;
        let rstd = Tensor::zeros(gpu, &[rows], DType::F32)?;
        self.record_embedding(batch, &ids, &x)?;
        let layers = self.layers.len();
        for l in 0..layers {
            self.stream_in(batch, l, Some(l + 1).filter(|&n| n < layers))?;
            // The last layer's input is free once it has run: the final norm goes there.
            let io = LayerIo {
                x: &x,
                x_normed: self.chains_into(l),
                out: Some(self.chained_out(l, &y, &acts, (&x, &rstd))),
            };
            self.layer_forward(batch, l, io, &acts, &step)?;
            std::mem::swap(&mut x, &mut y);
        }
        Ok(y)
    }

    /// Records `logits = hidden[rows]·lm_headᵀ` into a new [rows.len(), vocab] tensor, one
    /// vocabulary chunk of a paged head at a time.
    fn record_logits(
        &self,
        batch: &mut Batch,
        hidden: &Tensor,
        rows: Range<usize>,
    ) -> Result<Tensor> {
        let logits = Tensor::zeros(batch.gpu, &[rows.len(), self.config.vocab_size], DType::F32)?;
        let (head, chunks) = (self.head()?, self.logit_chunks());
        for (c, cols) in chunks.iter().enumerate() {
            let w = head.chunk(batch, cols.clone(), chunks.get(c + 1).cloned())?;
            Gemm::new(Mat::new(hidden).rows(rows.clone()), false, w, true)
                .run(batch, Mat::new(&logits).cols(cols.clone()))?;
        }
        Ok(logits)
    }

    /// Full forward of one sequence; the logits of positions `rows`, row-major [rows.len(), vocab].
    pub fn logits(&self, gpu: &Gpu, ids: &[u32], rows: Range<usize>) -> Result<Vec<f32>> {
        ensure!(
            !rows.is_empty() && rows.end <= ids.len(),
            "logit rows {rows:?} outside a sequence of {} tokens",
            ids.len()
        );
        let mut batch = gpu.batch();
        let hidden = self.record_hidden(&mut batch, ids, 1, None)?;
        let logits = self.record_logits(&mut batch, &hidden, rows)?;
        batch.submit();
        logits.to_f32(gpu)
    }

    /// Runs `ids`, the next tokens of the sequence in slot 0 of `cache`, appending their keys and
    /// values; returns the logits of the last of them [vocab].
    pub fn forward_cached(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        self.forward_slots(gpu, cache, &[0], ids)
    }

    /// Prefills the prompt `ids` into the empty slot `slot` of `cache` (it attends to its own keys
    /// only); returns the logits of its last token [vocab].
    pub fn prefill_slot(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        slot: usize,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        ensure!(
            cache.lens.get(slot) == Some(&0),
            "KV cache slot {slot} is not an empty slot (lengths {:?})",
            cache.lens
        );
        self.forward_slots(gpu, cache, &[slot], ids)
    }

    /// One decoding step of the sequences in slots 0..ids.len(): `ids[b]` is slot b's next token.
    /// The rows run through every matrix product together, and one attention launch reads each
    /// slot's own cached keys. Returns the next-token logits [ids.len(), vocab].
    pub fn decode_slots(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let slots: Vec<usize> = (0..ids.len()).collect();
        self.forward_slots(gpu, cache, &slots, ids)
    }

    /// The next `ids.len() / slots.len()` tokens of each sequence in `slots` (one token each, or
    /// one sequence: the logits rows are then contiguous); the logits of each one's last token.
    fn forward_slots(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        slots: &[usize],
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        let n = slots.len();
        ensure!(
            n == 1 || ids.len() == n,
            "{} tokens for {n} KV cache slots: several slots take one token each",
            ids.len()
        );
        let mut batch = gpu.batch();
        let hidden = self.record_hidden(&mut batch, ids, n, Some((cache, slots)))?;
        let logits = self.record_logits(&mut batch, &hidden, ids.len() - n..ids.len())?;
        batch.submit();
        for &s in slots {
            cache.lens[s] += ids.len() / n;
        }
        logits.to_f32(gpu)
    }

    /// Summed next-token cross-entropy of `rows` — (ids, targets) pairs, targets from
    /// [`next_token_targets`] — run as one batch padded to the longest row (padding is
    /// unsupervised, and causal attention keeps it from affecting the real tokens).
    pub fn loss_sum(&self, gpu: &Gpu, rows: &[(&[u32], &[u32])]) -> Result<LossSum> {
        let (ids, targets, _) = pad_rows(rows)?;
        // Only supervised positions reach the LM head, the forward's largest product: a
        // prompt's and the padding's hidden rows are left out.
        let vocab = self.config.vocab_size;
        let supervised: Vec<usize> = (0..targets.len())
            .filter(|&i| (targets[i] as usize) < vocab)
            .collect();
        if supervised.is_empty() {
            return Ok(LossSum {
                sum: 0.0,
                tokens: 0,
            });
        }
        let mut batch = gpu.batch();
        let all = self.record_hidden(&mut batch, &ids, rows.len(), None)?;
        let hidden = Tensor::zeros(gpu, &[supervised.len(), all.row_len()], DType::F32)?;
        let mut at = 0;
        for run in supervised.chunk_by(|a, b| *b == a + 1) {
            copy_rows(&mut batch, &all, run[0]..run[0] + run.len(), &hidden, at)?;
            at += run.len();
        }
        batch.keep(all);
        let targets: Vec<u32> = supervised.iter().map(|&i| targets[i]).collect();
        let tokens = supervised.len();
        let targets = Tensor::from_u32(gpu, &[tokens], &targets)?;
        let lse = Tensor::zeros(gpu, &[tokens], DType::F32)?;
        let loss = Tensor::zeros(gpu, &[1], DType::F32)?;
        let count = Tensor::zeros(gpu, &[1], DType::U32)?;
        let w_lm = self.head()?;
        let head = LmHead {
            hidden: &hidden,
            w_lm,
            chunking: Chunking::default(),
            kept: None,
        };
        cross_entropy_forward(&mut batch, head, &targets, &lse, &loss, &count)?;
        batch.submit();
        Ok(LossSum {
            sum: loss.to_f32(gpu)?[0] as f64,
            tokens: count.to_u32(gpu)?[0] as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_next_supervised_token() {
        let ids = [10, 11, 12, 13, 14];
        let mask = [false, false, true, true, false];
        assert_eq!(
            next_token_targets(&ids, &mask),
            vec![IGNORE, 12, 13, IGNORE, IGNORE]
        );
    }

    #[test]
    fn projection_names() {
        assert_eq!(Proj::Gate.module(), "gate_proj");
        assert_eq!(Proj::O.path(), "self_attn.o_proj");
    }
}
