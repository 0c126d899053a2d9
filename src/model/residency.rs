//! Where a model's bytes live when the device is smaller than the model: the memory plan
//! (`--device-memory`) and the streaming of frozen decoder layers.
//!
//! A [`MemoryPlan`] keeps decoder layers `0..resident_layers` on the device and streams the rest
//! through a ring of `slots` device slots (one layer each, bf16 matrices and f32 norms and biases
//! as a resident layer holds them): streamed layer `l` runs in slot `(l - resident_layers) %
//! slots`, uploaded from the memory-mapped checkpoint just before it is needed
//! ([`LayerStream`]). Two slots let the next layer's upload be queued before the current layer's
//! work; one slot is the smallest plan. When even that does not fit, training's checkpointed
//! layer inputs wait in host memory between the forward and the backward. The embedding, LM
//! head, final norm and the LoRA state stay resident. Paging changes where bytes live, never the
//! arithmetic: a streamed run is bit-identical to a resident one.
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use wgtrain_kernels::ops::cross_entropy::{Chunking, HeadRows};
use wgtrain_kernels::ops::matmul::Mat;
use wgtrain_kernels::{Batch, DType, Gpu, Tensor};

use super::config::Qwen2Config;
use super::params::{names, qwen2_tensors, PerProj, Proj};
use super::qwen2::Layer;
use super::weights::{device_rows, write_to_device, Weights};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Parses a memory size: a number (decimals allowed) and a unit, `B`, `KiB`, `MiB`, `GiB`,
/// `TiB` or decimal `KB`, `MB`, `GB`, `TB` (case-insensitive), e.g. `24GiB`, `512MiB`, `1.5GB`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let scale = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => GIB << 10,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => bail!(
            "device memory '{text}': expected a size with a unit, e.g. 24GiB, 512MiB or 16GB \
             (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        ),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| format!("device memory '{text}': '{number}' is not a positive number"))?;
    Ok((value * scale as f64) as u64)
}

/// Formats bytes as MiB and GiB, as the dry run prints them.
pub fn size(bytes: u64) -> String {
    format!(
        "{:10.1} MiB {:7.2} GiB",
        bytes as f64 / MIB as f64,
        bytes as f64 / GIB as f64
    )
}

/// Device bytes of a tensor of `numel` elements of `width` bytes (buffers are rounded up).
fn tensor_bytes(numel: usize, width: usize) -> u64 {
    ((numel * width) as u64).next_multiple_of(wgtrain_kernels::tensor::BUFFER_ALIGN)
}

/// Device bytes of the model's weights as [`super::Qwen2::load`] keeps them (bf16 matrices, f32
/// vectors), or all f32 (full fine-tuning's master weights): (one decoder layer, everything
/// else: embedding, final norm, untied LM head).
pub fn weight_bytes(config: &Qwen2Config, f32_master: bool) -> (u64, u64) {
    let (mut layer, mut other) = (0, 0);
    let layer0 = names::layer(0);
    for spec in qwen2_tensors(config) {
        let width = match spec.shape.len() == 1 || f32_master {
            true => 4,
            false => 2,
        };
        let bytes = tensor_bytes(spec.shape.iter().product(), width);
        if spec.name.starts_with(&layer0) {
            layer += bytes;
        } else if !spec.name.starts_with(names::LAYERS) {
            other += bytes;
        }
    }
    (layer, other)
}

/// Device bytes of the LoRA factors of every layer at `ranks` (f32).
pub fn lora_bytes(config: &Qwen2Config, ranks: &PerProj<Option<usize>>) -> u64 {
    let per_layer: u64 = ranks
        .iter()
        .filter_map(|(p, r)| r.map(|r| (p, r)))
        .map(|(p, r): (Proj, usize)| {
            let (out_f, in_f) = p.shape(config);
            tensor_bytes(r * in_f, 4) + tensor_bytes(out_f * r, 4)
        })
        .sum();
    per_layer * config.num_hidden_layers as u64
}

/// What a workload holds on the device besides the weights, as its caller estimates it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Working {
    pub bytes: u64,
    /// The part of `bytes` that is checkpointed layer inputs, which can wait in host memory.
    pub offloadable: u64,
    /// Tokens of one forward (0: not known, as for inference, whose activations come on top):
    /// the embedding rows a paged embedding uploads for it.
    pub tokens: usize,
    /// What it holds with each layer's token-local part in chunks (None: it does not chunk).
    pub chunked: Option<Chunked>,
    /// What keeping its activations for the backward adds (zero: it never keeps them).
    pub kept: Kept,
}

/// What a training micro-batch holds on top of its working set when it keeps what its forward
/// made for the backward instead of recomputing it ([`MemoryPlan::kept`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Every decoder layer's activations, less the one layer's that recomputation reuses.
    pub layers: u64,
    /// The LM head's logits of every row, less the block that recomputing them reuses; not kept
    /// when the head is paged (its chunks stream through their ring in both passes, as they do
    /// without keeping).
    pub logits: u64,
}

impl Kept {
    /// The bytes kept under a plan that pages the LM head or not.
    pub fn bytes(&self, head_paged: bool) -> u64 {
        self.layers + if head_paged { 0 } else { self.logits }
    }
}

impl Working {
    /// The workload holding `bytes` more, with whole layers and in chunks alike.
    pub fn plus(mut self, bytes: u64) -> Working {
        self.bytes += bytes;
        if let Some(chunked) = &mut self.chunked {
            chunked.fixed += bytes;
        }
        self
    }
}

/// A workload of `tokens` tokens per layer with each layer's token-local part run in chunks of C
/// rows (C < `tokens`): it holds `fixed + C · per_row` bytes (layer inputs included).
#[derive(Clone, Copy, Debug)]
pub struct Chunked {
    pub tokens: usize,
    pub fixed: u64,
    pub per_row: u64,
}

/// The fewest rows the planner gives a token chunk: fewer would leave a large GPU's GEMMs short
/// of workgroups (and multiply the launches).
pub const MIN_TOKEN_CHUNK: usize = 256;

impl Chunked {
    /// The most rows a chunk can have in `room` bytes (a multiple of 32, the GEMM's tile rows,
    /// from [`MIN_TOKEN_CHUNK`] to `tokens - 1`), and the bytes held with it; None when no
    /// chunk fits or none would be shorter than the tokens.
    fn largest_in(&self, room: u64) -> Option<(usize, u64)> {
        let rows = (room.checked_sub(self.fixed)? / self.per_row.max(1)) as usize;
        let rows = rows.min(self.tokens - 1) / 32 * 32;
        (rows >= MIN_TOKEN_CHUNK).then(|| (rows, self.fixed + rows as u64 * self.per_row))
    }
}

/// What a plan keeps in host memory instead of on the device, besides streamed layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    /// The embedding table stays in the memory map: each forward uploads the rows of its tokens.
    pub embedding: bool,
    /// The LM head stays in the memory map: its vocabulary chunks stream through a ring of device
    /// slots, each chunk once per pass (tied: the embedding's table, paged with it).
    pub head: bool,
    /// Training's checkpointed layer inputs wait in host memory between forward and backward.
    pub inputs: bool,
}

/// The paged LM head's ring: its vocabulary chunks and the device slots they take turns in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRing {
    /// Vocabulary chunks of the loss's tiling ([`Chunking::default`]).
    pub chunks: usize,
    /// Slots: two (the next chunk's upload queued before the current chunk's work), one when
    /// the vocabulary is one chunk.
    pub slots: usize,
    pub chunk_bytes: u64,
    /// Bytes uploaded by each pass over the head: chunk `c` runs in slot `c % slots`, and a slot
    /// that only ever holds one chunk keeps it (all of them when `chunks <= slots`).
    pub pass_bytes: u64,
}

impl HeadRing {
    fn of(config: &Qwen2Config) -> HeadRing {
        let (vocab, h) = (config.vocab_size, config.hidden_size);
        let rows = Chunking::default().vocab.min(vocab);
        let chunks = vocab.div_ceil(rows);
        let slots = chunks.min(2);
        let pass_rows: usize = (0..chunks)
            .filter(|c| chunks.div_ceil(slots) > 1 && (c % slots) + slots < chunks)
            .chain((0..chunks).filter(|c| c % slots + slots >= chunks && *c >= slots))
            .map(|c| (rows * (c + 1)).min(vocab) - rows * c)
            .sum();
        HeadRing {
            chunks,
            slots,
            chunk_bytes: tensor_bytes(rows * h, 2),
            pass_bytes: tensor_bytes(pass_rows * h, 2),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.slots as u64 * self.chunk_bytes
    }
}

/// What stays on the device and what streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub layers: usize,
    /// Decoder layers `0..resident_layers` stay on the device.
    pub resident_layers: usize,
    /// Device slots the streamed layers take turns in (0 when none streams).
    pub slots: usize,
    /// Device bytes of one decoder layer's frozen weights.
    pub layer_bytes: u64,
    /// Device bytes of the other weights (embedding, final norm, LM head) when resident.
    pub other_bytes: u64,
    /// Device bytes of one [vocab, hidden] bf16 table: the embedding, and the untied LM head.
    pub table_bytes: u64,
    pub tied: bool,
    pub paging: Paging,
    /// The paged LM head's chunks and slots.
    pub head_ring: HeadRing,
    /// Device bytes of the embedding rows (bf16) and their order (u32) that a paged embedding
    /// uploads for one forward of the workload's tokens.
    pub lookup_bytes: u64,
    /// What the workload holds besides the weights (activations, LoRA state, ...), as estimated
    /// by the caller, less what is offloaded.
    pub working: u64,
    /// Bytes of checkpointed layer inputs that wait in host memory between the forward and the
    /// backward (0: they stay on the device).
    pub offloaded: u64,
    /// Rows of the token chunks each layer's token-local part runs in (None: whole layers).
    pub chunk: Option<usize>,
    /// Bytes (in `working`) of what training keeps from the forward for the backward instead of
    /// recomputing it ([`Kept`]); 0: each layer is recomputed before its backward.
    pub kept: u64,
    pub budget: Option<u64>,
}

impl MemoryPlan {
    /// Every weight resident (no budget: today's behaviour).
    pub fn resident(config: &Qwen2Config) -> MemoryPlan {
        let (layer_bytes, other_bytes) = weight_bytes(config, false);
        MemoryPlan {
            layers: config.num_hidden_layers,
            resident_layers: config.num_hidden_layers,
            slots: 0,
            layer_bytes,
            other_bytes,
            table_bytes: tensor_bytes(config.vocab_size * config.hidden_size, 2),
            tied: config.tie_word_embeddings,
            paging: Paging::default(),
            head_ring: HeadRing::of(config),
            lookup_bytes: 0,
            working: 0,
            offloaded: 0,
            chunk: None,
            kept: 0,
            budget: None,
        }
    }

    /// The plan for `budget` bytes of device memory of which the workload needs `working`
    /// besides the weights. Everything resident if it fits; else, of the ways to page the
    /// embedding (its rows gathered on the host), the LM head (through its own ring of chunk
    /// slots), the checkpointed layer inputs (to host memory) or none of them, each with as many
    /// decoder layers resident as fit beside two streaming slots (one when two do not fit), the
    /// one that moves the fewest bytes host <-> device per training micro-batch (on a tie, the
    /// one that pages less); else, if none fits, the same with each layer's token-local part in
    /// token chunks, the longest that fit. A budget that none meets is refused with the size
    /// that would fit. Last, a plan of whole layers with their inputs on the device keeps the
    /// activations for the backward if they fit beside it ([`MemoryPlan::keeping`]).
    pub fn fit(config: &Qwen2Config, budget: Option<u64>, working: Working) -> Result<MemoryPlan> {
        let plan = MemoryPlan::fit_recomputing(config, budget, working)?;
        Ok(match budget {
            Some(budget) => plan.keeping(working.kept, budget),
            None => plan,
        })
    }

    /// This plan keeping `kept` when it runs whole layers with their inputs on the device and
    /// `kept` fits in `budget` beside everything it holds: a choice of speed (no recomputation),
    /// made after the plan's placement, so it never makes a layer stream or a table page.
    fn keeping(self, kept: Kept, budget: u64) -> MemoryPlan {
        let bytes = kept.bytes(self.paging.head);
        let whole = self.chunk.is_none() && self.offloaded == 0;
        match bytes > 0 && whole && self.device_bytes() + bytes <= budget {
            true => MemoryPlan {
                kept: bytes,
                working: self.working + bytes,
                ..self
            },
            false => self,
        }
    }

    /// [`MemoryPlan::fit`] recomputing every layer in the backward.
    fn fit_recomputing(
        config: &Qwen2Config,
        budget: Option<u64>,
        working: Working,
    ) -> Result<MemoryPlan> {
        let resident = MemoryPlan {
            working: working.bytes,
            budget,
            lookup_bytes: tensor_bytes(working.tokens * config.hidden_size, 2)
                + working.tokens as u64 * 4,
            ..MemoryPlan::resident(config)
        };
        let Some(budget) = budget else {
            return Ok(resident);
        };
        if resident.device_bytes() <= budget {
            return Ok(resident);
        }
        let candidates: Vec<MemoryPlan> = [false, true]
            .into_iter()
            .flat_map(|inputs| [false, true].map(|head| (inputs, head)))
            .flat_map(|(inputs, head)| {
                [false, true].map(|embedding| Paging {
                    embedding,
                    head,
                    inputs,
                })
            })
            .filter(|p| !(resident.tied && p.embedding != p.head))
            .filter(|p| !(p.inputs && working.offloadable == 0))
            .map(|paging| resident.paged(paging, working))
            .collect();
        // The fewest bytes moved, then the longest token chunks; on a tie the first candidate,
        // the one that pages less.
        let cheapest = |plans: Vec<MemoryPlan>| {
            plans
                .into_iter()
                .min_by_key(|p| (p.training_traffic(), std::cmp::Reverse(p.chunk)))
        };
        let whole = candidates.iter().filter_map(|p| {
            let fit = p.layers_that_fit(budget);
            (fit > 0).then(|| p.clone().with_layers(fit))
        });
        if let Some(plan) = cheapest(whole.collect()) {
            return Ok(plan);
        }
        if let Some(chunked) = working.chunked {
            let plans = candidates.iter().filter_map(|p| p.chunked(chunked, budget));
            if let Some(plan) = cheapest(plans.collect()) {
                return Ok(plan);
            }
        }
        let least_plan = candidates
            .iter()
            .map(|p| p.least(working.chunked))
            .min_by_key(MemoryPlan::device_bytes)
            .expect("resident weights are always a candidate");
        let least = least_plan.device_bytes();
        let paged = match (least_plan.paging.embedding, least_plan.paging.head) {
            (true, true) => " (embedding rows and LM head chunks paged)",
            (true, false) => " (embedding rows paged)",
            (false, true) => " (LM head chunks paged)",
            (false, false) => "",
        };
        bail!(
            "--device-memory {}: this run needs at least {:.1} MiB (--device-memory {least}B): \
             {:.1} MiB of embedding, final norm and LM head{paged}, one streamed decoder layer \
             of {:.1} MiB and {:.1} MiB of activations and trained state{}{}",
            human(budget),
            least as f64 / MIB as f64,
            least_plan.other_device_bytes() as f64 / MIB as f64,
            least_plan.layer_bytes as f64 / MIB as f64,
            least_plan.working as f64 / MIB as f64,
            match least_plan.offloaded {
                0 => "",
                _ => " (the layer inputs offloaded to host memory)",
            },
            match least_plan.chunk {
                Some(rows) => format!(" (each layer's MLP in chunks of {rows} tokens)"),
                None => String::new(),
            }
        )
    }

    /// This plan with each layer's token-local part in the longest token chunks that leave room
    /// in `budget` for two streaming slots, else one (None when even the shortest do not fit).
    fn chunked(&self, chunked: Chunked, budget: u64) -> Option<MemoryPlan> {
        [2, 1].into_iter().find_map(|slots: u64| {
            let room = budget.checked_sub(self.other_device_bytes() + slots * self.layer_bytes)?;
            let (rows, bytes) = chunked.largest_in(room + self.offloaded)?;
            let plan = MemoryPlan {
                chunk: Some(rows),
                working: bytes - self.offloaded,
                ..self.clone()
            };
            let fit = plan.layers_that_fit(budget);
            Some(plan.with_layers(fit))
        })
    }

    /// This paging's least device memory: one streamed layer beside the working set, in the
    /// shortest token chunks where the rows are longer than those.
    fn least(&self, chunked: Option<Chunked>) -> MemoryPlan {
        let plan = match chunked.filter(|c| c.tokens > MIN_TOKEN_CHUNK) {
            Some(c) => MemoryPlan {
                chunk: Some(MIN_TOKEN_CHUNK),
                working: c.fixed + MIN_TOKEN_CHUNK as u64 * c.per_row - self.offloaded,
                ..self.clone()
            },
            None => self.clone(),
        };
        plan.with_layers(1)
    }

    /// This plan with `paging`, no layer placed yet.
    fn paged(&self, paging: Paging, working: Working) -> MemoryPlan {
        let offloaded = if paging.inputs {
            working.offloadable
        } else {
            0
        };
        MemoryPlan {
            paging,
            offloaded,
            working: working.bytes - offloaded,
            resident_layers: 0,
            ..self.clone()
        }
    }

    /// Decoder layers that fit the budget beside the other weights and the working set.
    fn layers_that_fit(&self, budget: u64) -> usize {
        let room = budget.saturating_sub(self.weight_device_bytes() + self.working);
        (room / self.layer_bytes) as usize
    }

    /// With room for `fit` (>= 1) decoder layers: all resident, or two slots (one when only one
    /// fits) and the rest resident.
    fn with_layers(mut self, fit: usize) -> MemoryPlan {
        (self.resident_layers, self.slots) = match fit >= self.layers {
            true => (self.layers, 0),
            false => (fit - fit.min(2), fit.min(2)),
        };
        self
    }

    /// Decoder layers that stream.
    pub fn streamed_layers(&self) -> usize {
        self.layers - self.resident_layers
    }

    /// Device bytes of the embedding, final norm and LM head under this plan: resident tables,
    /// or the paged embedding's rows of one forward and the paged head's ring.
    pub fn other_device_bytes(&self) -> u64 {
        let mut bytes = self.other_bytes;
        if self.paging.embedding {
            bytes = bytes - self.table_bytes + self.lookup_bytes;
        }
        if self.paging.head {
            if !self.tied {
                bytes -= self.table_bytes;
            }
            bytes += self.head_ring.bytes();
        }
        bytes
    }

    /// Device bytes of the weights under this plan.
    pub fn weight_device_bytes(&self) -> u64 {
        self.other_device_bytes() + (self.resident_layers + self.slots) as u64 * self.layer_bytes
    }

    /// The planned device memory: weights and the working set.
    pub fn device_bytes(&self) -> u64 {
        self.weight_device_bytes() + self.working
    }

    /// Bytes moved host <-> device by one training micro-batch: weight uploads, and offloaded layer
    /// inputs down after the forward and up before the backward.
    pub fn training_traffic(&self) -> u64 {
        self.training_uploads() + 2 * self.offloaded
    }

    /// Uploads host -> device of one forward pass followed by the backward (a training
    /// micro-batch): each streamed layer once per direction, but for the `slots` layers still
    /// held where one direction ends and the other begins; the paged LM head's chunks once per
    /// direction, but for those a slot keeps ([`HeadRing::pass_bytes`]); the paged embedding's
    /// rows.
    pub fn training_uploads(&self) -> u64 {
        let layers =
            2 * self.streamed_layers().saturating_sub(self.slots) as u64 * self.layer_bytes;
        let ring = &self.head_ring;
        let head = match self.paging.head {
            true => 2 * ring.pass_bytes,
            false => 0,
        };
        let lookup = if self.paging.embedding {
            self.lookup_bytes
        } else {
            0
        };
        layers + head + lookup
    }

    /// Host memory the plan reads from: the memory-mapped streamed layers and paged tables,
    /// which the page cache holds if RAM allows (else they are read from disk on every pass),
    /// and the offloaded layer inputs.
    pub fn host_bytes(&self) -> u64 {
        let tables = match (self.paging.embedding, self.paging.head && !self.tied) {
            (true, true) => 2,
            (false, false) => 0,
            _ => 1,
        };
        self.streamed_layers() as u64 * self.layer_bytes
            + tables * self.table_bytes
            + self.offloaded
    }
}

/// How a training step gets each layer's activations for its backward, as the plan and the dry
/// run print it: kept from the forward (`kept` bytes beyond recomputing) or recomputed.
pub fn activations_line(kept: Option<u64>) -> String {
    match kept {
        Some(bytes) => format!(
            "  {:<38}{}",
            "kept for the backward: activations",
            size(bytes)
        ),
        None => "  activations: recomputed layer by layer in the backward".into(),
    }
}

/// Bytes in the unit `--device-memory` takes.
fn human(bytes: u64) -> String {
    match bytes >= GIB {
        true => format!("{:.2}GiB", bytes as f64 / GIB as f64),
        false => format!("{:.1}MiB", bytes as f64 / MIB as f64),
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let budget = self.budget.map_or("no limit".to_string(), |b| {
            format!("--device-memory {}", human(b))
        });
        let line = |f: &mut fmt::Formatter, label: String, bytes: u64| {
            writeln!(f, "  {label:<38}{}", size(bytes))
        };
        writeln!(f, "memory plan ({budget}):")?;
        let Paging {
            embedding, head, ..
        } = self.paging;
        let resident: Vec<&str> = [
            (!embedding).then_some("embedding"),
            Some("norm"),
            (!head && !self.tied).then_some("LM head"),
            (!embedding && self.tied).then_some("LM head (tied)"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let paged_bytes = (embedding as u64 + (head && !self.tied) as u64) * self.table_bytes;
        line(
            f,
            format!("resident: {}", resident.join(", ")),
            self.other_bytes - paged_bytes,
        )?;
        if embedding {
            line(
                f,
                "paged: embedding rows of a forward".into(),
                self.lookup_bytes,
            )?;
        }
        if head {
            let ring = &self.head_ring;
            let label = format!(
                "paged: LM head{}, {} chunk(s), {} slot(s)",
                if self.tied { " (tied)" } else { "" },
                ring.chunks,
                ring.slots
            );
            line(f, label, ring.bytes())?;
        }
        line(
            f,
            format!("resident: decoder layers 0..{}", self.resident_layers),
            self.resident_layers as u64 * self.layer_bytes,
        )?;
        if self.slots > 0 {
            let (first, layers) = (self.resident_layers, self.layers);
            let label = format!("streamed: layers {first}..{layers}, {} slot(s)", self.slots);
            line(f, label, self.slots as u64 * self.layer_bytes)?;
        }
        if self.offloaded > 0 {
            line(
                f,
                "offloaded: layer inputs, to the host".into(),
                self.offloaded,
            )?;
        }
        if let Some(rows) = self.chunk {
            writeln!(f, "  token chunks: o_proj + MLP, {rows} tokens at a time")?;
        }
        if self.kept > 0 {
            writeln!(f, "{}", activations_line(Some(self.kept)))?;
        }
        line(
            f,
            "host <-> device per micro-batch step".into(),
            self.training_traffic(),
        )?;
        write!(
            f,
            "  {:<38}{}",
            "host memory the plan reads from",
            size(self.host_bytes())
        )
    }
}

/// The paged LM head: vocabulary chunk `c` runs in device slot `c % slots`, uploaded from the
/// memory-mapped checkpoint when the loss or the logits ask for it.
struct HeadSlots {
    /// The checkpoint tensor the head is read from (the embedding's when tied).
    name: &'static str,
    vocab_dim: (usize, usize),
    /// The loss's vocabulary chunks on this device ([`Chunking::vocab_chunks`]).
    chunks: Vec<Range<usize>>,
    slots: Vec<Tensor>,
    /// The chunk each slot holds now.
    held: Mutex<Vec<Option<usize>>>,
}

/// The streamed decoder layers of a model, which layer each slot holds, and where their bytes
/// come from; and, where the plan pages them, the LM head's chunks and the embedding's rows.
pub struct LayerStream {
    pub plan: MemoryPlan,
    /// The memory-mapped checkpoint; None for a model built without one (a dry run).
    source: Option<Weights>,
    /// The streamed layer each slot holds now.
    held: Mutex<Vec<Option<usize>>>,
    head: Option<HeadSlots>,
    /// Bytes uploaded host -> device so far.
    uploaded: AtomicU64,
}

impl LayerStream {
    /// Slot `k` starts out holding layer `resident_layers + k` (what the model was built with);
    /// a paged head's slots are allocated here.
    pub fn new(
        gpu: &Gpu,
        config: &Qwen2Config,
        plan: MemoryPlan,
        source: Option<Weights>,
    ) -> Result<LayerStream> {
        let held = (0..plan.slots)
            .map(|k| Some(plan.resident_layers + k))
            .collect();
        let head = match plan.paging.head {
            true => {
                let (vocab, h) = (config.vocab_size, config.hidden_size);
                let chunks = Chunking::default().vocab_chunks(gpu, vocab);
                let slots = (0..chunks.len().min(2))
                    .map(|_| Tensor::zeros(gpu, &[chunks[0].len(), h], DType::BF16))
                    .collect::<Result<Vec<_>>>()?;
                Some(HeadSlots {
                    name: match config.tie_word_embeddings {
                        true => names::EMBED,
                        false => names::LM_HEAD,
                    },
                    vocab_dim: (vocab, h),
                    held: Mutex::new(vec![None; slots.len()]),
                    chunks,
                    slots,
                })
            }
            false => None,
        };
        let stream = LayerStream {
            plan,
            source,
            held: Mutex::new(held),
            head,
            uploaded: AtomicU64::new(0),
        };
        // The ring starts out as a pass leaves it, holding the last chunks (all of them when
        // they fit): the first pass then uploads what every pass does.
        if let Some(head) = &stream.head {
            let chunks = head.chunks.len();
            for c in chunks - head.slots.len()..chunks {
                stream.fetch_chunk(gpu, head, c)?;
            }
            stream.uploaded.store(0, Ordering::Relaxed);
        }
        Ok(stream)
    }

    /// The slot layer `l` runs in; None when it is resident.
    pub fn slot(&self, l: usize) -> Option<usize> {
        let first = self.plan.resident_layers;
        (l >= first).then(|| (l - first) % self.plan.slots)
    }

    /// Bytes uploaded host -> device so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Device bytes of the paged head's slots.
    pub fn device_bytes(&self) -> u64 {
        self.head
            .as_ref()
            .map_or(0, |h| h.slots.iter().map(Tensor::device_bytes).sum())
    }

    /// The checkpoint, or None in a dry run; an error naming `what` streams without one.
    fn source(&self, gpu: &Gpu, what: &str) -> Result<Option<&Weights>> {
        match &self.source {
            Some(weights) => Ok(Some(weights)),
            None if gpu.is_dry_run() => Ok(None),
            None => bail!("{what} streams, but the model has no checkpoint to stream it from"),
        }
    }

    /// Queues the upload of layer `l`'s weights into its slot (through `layer`, the model's view
    /// of that slot) unless the slot holds it already. The caller has submitted all recorded work
    /// that reads the slot's previous layer: the queued write runs after it.
    pub fn fetch(&self, gpu: &Gpu, l: usize, layer: &Layer) -> Result<()> {
        let Some(slot) = self.slot(l) else {
            return Ok(());
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held[slot] == Some(l) {
            return Ok(());
        }
        // Forgotten first: a failed upload leaves the slot holding nothing known.
        held[slot] = None;
        let source = self.source(gpu, &format!("decoder layer {l}"))?;
        for (name, tensor) in layer.tensors(l) {
            if let Some(weights) = source {
                write_to_device(gpu, &weights.get(&name)?, tensor)?;
            }
            let bytes = tensor_bytes(tensor.numel(), tensor.dtype().bytes());
            self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        }
        held[slot] = Some(l);
        Ok(())
    }

    /// Queues the upload of the head's chunk `c` into its slot unless the slot holds it, as
    /// [`LayerStream::fetch`] does a layer.
    fn fetch_chunk(&self, gpu: &Gpu, head: &HeadSlots, c: usize) -> Result<()> {
        let slot = c % head.slots.len();
        let mut held = head.held.lock().unwrap_or_else(|e| e.into_inner());
        if held[slot] == Some(c) {
            return Ok(());
        }
        held[slot] = None;
        let rows = head.chunks[c].clone();
        let what = format!("vocabulary rows {rows:?} of the LM head");
        if let Some(weights) = self.source(gpu, &what)? {
            let view = weights.get(head.name)?;
            let bytes = device_rows(&view, rows.clone(), DType::BF16)?;
            head.slots[slot]
                .write_rows(gpu, 0, &bytes)
                .with_context(|| format!("uploading {what} from {}", view.file.display()))?;
        }
        let bytes = tensor_bytes(rows.len() * head.vocab_dim.1, 2);
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        held[slot] = Some(c);
        Ok(())
    }

    /// The paged LM head's vocabulary chunks, in the order a pass asks for them (None when the
    /// head is resident).
    pub fn head_chunks(&self) -> Option<&[Range<usize>]> {
        self.head.as_ref().map(|h| h.chunks.as_slice())
    }

    /// The embedding rows of `ids` as a [ids, hidden] bf16 tensor: gathered on the host from the
    /// memory-mapped table (converted as a resident table is) and uploaded, queued.
    pub fn embedding_rows(&self, gpu: &Gpu, ids: &[u32], hidden: usize) -> Result<Tensor> {
        let rows = Tensor::zeros(gpu, &[ids.len(), hidden], DType::BF16)?;
        if let Some(weights) = self.source(gpu, "the embedding")? {
            let view = weights.get(names::EMBED)?;
            let mut bytes = Vec::with_capacity(ids.len() * hidden * 2);
            for &id in ids {
                let id = id as usize;
                bytes.extend_from_slice(&device_rows(&view, id..id + 1, DType::BF16)?);
            }
            rows.write_bytes(gpu, &bytes)?;
        }
        let bytes = tensor_bytes(ids.len() * hidden, 2) + ids.len() as u64 * 4;
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        Ok(rows)
    }
}

/// The paged LM head as the loss reads it: each chunk asked for is uploaded into its slot
/// (unless held) once the work recorded so far, which may read that slot, is submitted, and
/// the next chunk's upload is queued before the current chunk's work when it has a slot of its
/// own. Only a stream whose plan pages the head is one ([`LayerStream::head_chunks`]).
impl HeadRows for LayerStream {
    fn vocab_dim(&self) -> (usize, usize) {
        self.head.as_ref().map_or((0, 0), |h| h.vocab_dim)
    }

    fn dtype(&self) -> DType {
        DType::BF16
    }

    fn chunk(
        &self,
        batch: &mut Batch,
        rows: Range<usize>,
        next: Option<Range<usize>>,
    ) -> Result<Mat<'_>> {
        let head = self
            .head
            .as_ref()
            .context("the LM head is resident; it has no paged chunks")?;
        let index = |rows: &Range<usize>| {
            head.chunks.iter().position(|c| c == rows).with_context(|| {
                format!(
                    "the paged LM head holds vocabulary chunks of {} rows; rows {rows:?} are not one",
                    head.chunks[0].len()
                )
            })
        };
        let c = index(&rows)?;
        batch.flush();
        self.fetch_chunk(batch.gpu, head, c)?;
        if let Some(next) = next {
            let n = index(&next)?;
            if n % head.slots.len() != c % head.slots.len() {
                self.fetch_chunk(batch.gpu, head, n)?;
            }
        }
        Ok(Mat::new(&head.slots[c % head.slots.len()]).rows(0..rows.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::backward::micro_batch_bytes;
    use super::*;

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("512mib").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("16GB").unwrap(), 16_000_000_000);
        assert_eq!(parse_size("123B").unwrap(), 123);
        for bad in ["24", "GiB", "0MiB", "1.2.3GiB", "24 XB", ""] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn plans_page_the_embedding_then_stream_then_offload_then_page_the_head_then_refuse() {
        let config = Qwen2Config::qwen25("7B").unwrap();
        let (layer, other) = weight_bytes(&config, false);
        let working = Working {
            bytes: 10 * layer,
            offloadable: 5 * layer,
            tokens: 4096,
            chunked: None,
            kept: Kept::default(),
        };
        let plan = |budget: u64| MemoryPlan::fit(&config, Some(budget), working).unwrap();
        let paging = |embedding, head, inputs| Paging {
            embedding,
            head,
            inputs,
        };
        let all = other + 28 * layer + working.bytes;
        let resident = plan(all);
        assert_eq!((resident.resident_layers, resident.slots), (28, 0));
        assert_eq!(resident.device_bytes(), all);
        assert_eq!(resident.paging, Paging::default());

        // Cheapest first: the embedding's rows of the micro-batch instead of its table.
        let r = MemoryPlan::resident(&config);
        let lookup = tensor_bytes(4096 * config.hidden_size, 2) + 4096 * 4;
        let embedding_paged = plan(all - 1);
        assert_eq!(embedding_paged.paging, paging(true, false, false));
        assert_eq!(embedding_paged.resident_layers, 28);
        assert_eq!(embedding_paged.training_uploads(), lookup);
        // Then decoder layers stream, the head staying resident.
        let other_paged = other - r.table_bytes + lookup;
        let streamed = plan(other_paged + working.bytes + 10 * layer);
        assert_eq!(streamed.paging, paging(true, false, false));
        assert_eq!((streamed.resident_layers, streamed.slots), (8, 2));
        assert_eq!(streamed.training_uploads(), 2 * 18 * layer + lookup);
        let one_slot = plan(other_paged + working.bytes + layer);
        assert_eq!((one_slot.resident_layers, one_slot.slots), (0, 1));
        assert_eq!(one_slot.paging, paging(true, false, false));
        // Then the layer inputs wait in host memory (2 bytes moved per byte freed, where the
        // head moves 2 tables to free one table less its ring).
        let offloaded = plan(other_paged + working.bytes + layer - 1);
        assert_eq!(offloaded.paging, paging(true, false, true));
        let offloaded = plan(other_paged + working.bytes - working.offloadable + layer);
        assert_eq!(offloaded.paging, paging(true, false, true));
        assert_eq!(offloaded.slots, 1);
        // Then the LM head's chunks stream through their own ring (uploaded twice a step).
        let head_paged = plan(other_paged + working.bytes - working.offloadable + layer - 1);
        assert_eq!(head_paged.paging, paging(true, true, true));
        assert_eq!(head_paged.head_ring.chunks, 5);
        assert_eq!(head_paged.head_ring.slots, 2);
        let layers = 2 * (28 - head_paged.slots) as u64 * layer;
        assert_eq!(
            head_paged.training_uploads(),
            layers + 2 * r.table_bytes + lookup
        );
        assert_eq!(head_paged.head_ring.pass_bytes, r.table_bytes);
        assert_eq!(
            head_paged.host_bytes(),
            28 * layer + 2 * r.table_bytes + working.offloadable
        );
        // Inference offloads nothing: the head is paged right after the layers stream.
        let weights_only = Working::default();
        let other_paged = other - r.table_bytes;
        let inference = MemoryPlan::fit(&config, Some(other_paged + layer - 1), weights_only);
        assert_eq!(inference.unwrap().paging, paging(true, true, false));
        // Below everything paged and one slot, refused with the least size.
        let least = other - 2 * r.table_bytes + lookup + r.head_ring.bytes() + working.bytes
            - working.offloadable
            + layer;
        let all_paged = plan(least);
        assert_eq!(all_paged.paging, paging(true, true, true));
        assert_eq!(all_paged.slots, 1);
        assert_eq!(all_paged.device_bytes(), least);
        let err = MemoryPlan::fit(&config, Some(least - 1), working)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("--device-memory {least}B")), "{err}");
        assert_eq!(MemoryPlan::fit(&config, None, working).unwrap().slots, 0);

        // A tied table is the embedding and the head: paged together or not at all.
        let tied = Qwen2Config::qwen25("3B").unwrap();
        let (layer, other) = weight_bytes(&tied, false);
        for layers in 0..=36 {
            let budget = other + layers * layer + working.bytes;
            if let Ok(plan) = MemoryPlan::fit(&tied, Some(budget), working) {
                assert_eq!(plan.paging.embedding, plan.paging.head, "{plan:?}");
            }
        }
    }

    #[test]
    fn activations_are_kept_only_in_the_room_the_placement_leaves() {
        let config = Qwen2Config::qwen25("7B").unwrap();
        let ranks = PerProj::from_fn(|_| Some(64));
        let working = micro_batch_bytes(&config, &ranks, false, 16);
        let kept = working.kept.bytes(false);
        let (layer, _) = weight_bytes(&config, false);
        assert!(kept > 0 && working.kept.bytes(true) < kept && kept < layer);
        let unbudgeted = MemoryPlan::fit(&config, None, working).unwrap();
        assert_eq!(
            unbudgeted.kept, 0,
            "without a budget the model's rule decides"
        );
        let all = unbudgeted.device_bytes();
        let plan = |budget| MemoryPlan::fit(&config, Some(budget), working).unwrap();
        // Room for everything and the kept activations: kept, in the plan's bytes.
        let keeping = plan(all + kept);
        assert_eq!((keeping.kept, keeping.device_bytes()), (kept, all + kept));
        assert_eq!((keeping.resident_layers, keeping.slots), (28, 0));
        let shown = keeping.to_string();
        assert!(shown.contains("kept for the backward"), "{shown}");
        // A byte less: everything stays resident, and recomputes.
        let tight = plan(all + kept - 1);
        assert_eq!((tight.kept, tight.resident_layers, tight.slots), (0, 28, 0));
        assert_eq!(tight.device_bytes(), all);
        // Lower budgets: keeping never changes what is placed where, and fits the budget; where
        // layers stream it keeps what fits in the room they leave.
        let mut streamed_and_kept = 0;
        for budget in (all / 4..all).step_by(layer as usize / 7) {
            let Ok(recomputing) = MemoryPlan::fit_recomputing(&config, Some(budget), working)
            else {
                continue;
            };
            let p = plan(budget);
            let placed = |p: &MemoryPlan| (p.resident_layers, p.slots, p.paging, p.chunk);
            assert_eq!(placed(&p), placed(&recomputing), "{budget}");
            assert!(p.device_bytes() <= budget, "{p:?}");
            let would = working.kept.bytes(p.paging.head);
            let whole = p.chunk.is_none() && p.offloaded == 0;
            let room = whole && recomputing.device_bytes() + would <= budget;
            assert_eq!(p.kept, if room { would } else { 0 }, "{budget}");
            streamed_and_kept += usize::from(p.kept > 0 && p.slots > 0);
        }
        assert!(streamed_and_kept > 0);
        // Token chunks and offloaded inputs recompute whatever the room.
        let chunked = MemoryPlan {
            chunk: Some(256),
            ..unbudgeted.clone()
        };
        assert_eq!(chunked.keeping(working.kept, u64::MAX).kept, 0);
        let offloaded = MemoryPlan {
            offloaded: 1,
            ..unbudgeted
        };
        assert_eq!(offloaded.keeping(working.kept, u64::MAX).kept, 0);
    }

    /// The size a refusal names (`--device-memory {N}B`).
    fn named_size(err: &str) -> u64 {
        let tail = &err[err.find("--device-memory ").unwrap() + 16..];
        let tail = &tail[tail.find("--device-memory ").unwrap() + 16..];
        tail[..tail.find("B)").unwrap()].parse().unwrap()
    }

    #[test]
    fn long_rows_run_in_token_chunks_when_whole_layers_do_not_fit() {
        let config = Qwen2Config::qwen25("7B").unwrap();
        let ranks = PerProj::from_fn(|_| Some(64));
        let tokens = 16384;
        let working = micro_batch_bytes(&config, &ranks, true, tokens);
        assert!(working.chunked.is_some());
        let plan = |budget: u64, working| MemoryPlan::fit(&config, Some(budget), working);
        // The least budget for whole layers (everything paged, one streamed layer) fits them.
        let unchunked = Working {
            chunked: None,
            ..working
        };
        let whole_least = named_size(&plan(1, unchunked).unwrap_err().to_string());
        let whole = plan(whole_least, working).unwrap();
        assert_eq!((whole.chunk, whole.slots), (None, 1));
        assert!(plan(whole_least - 1, unchunked).is_err());
        // Less: token chunks of a multiple of 32 rows, within the budget.
        let budget = whole_least - 1;
        let chunks = plan(budget, working).unwrap();
        let rows = chunks.chunk.unwrap();
        assert!(
            rows % 32 == 0 && (MIN_TOKEN_CHUNK..tokens).contains(&rows),
            "{rows}"
        );
        assert!(chunks.device_bytes() <= budget);
        let shown = format!("token chunks: o_proj + MLP, {rows} tokens at a time");
        assert!(chunks.to_string().contains(&shown), "{chunks}");
        // The least: the shortest chunks and one slot; refused below, naming that size.
        let err = plan(1, working).unwrap_err().to_string();
        assert!(err.contains("in chunks of 256 tokens"), "{err}");
        let least = named_size(&err);
        let shortest = plan(least, working).unwrap();
        assert_eq!((shortest.chunk, shortest.slots), (Some(MIN_TOKEN_CHUNK), 1));
        assert_eq!(shortest.device_bytes(), least);
        let err = plan(least - 1, working).unwrap_err().to_string();
        assert_eq!(named_size(&err), least, "{err}");
        assert!(
            least < whole_least - (4 << 30),
            "chunks save less than 4 GiB: {err}"
        );
    }
}
