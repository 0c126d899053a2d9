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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use wgtrain_kernels::Gpu;

use super::config::Qwen2Config;
use super::params::{names, qwen2_tensors, PerProj, Proj};
use super::qwen2::Layer;
use super::weights::{write_to_device, Weights};

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
    /// Device bytes of the other weights (embedding, final norm, LM head), always resident.
    pub other_bytes: u64,
    /// What the workload holds besides the weights (activations, LoRA state, ...), as estimated
    /// by the caller.
    pub working: u64,
    /// Bytes of checkpointed layer inputs that wait in host memory between the forward and the
    /// backward (0: they stay on the device).
    pub offloaded: u64,
    pub budget: Option<u64>,
}

impl MemoryPlan {
    /// Every layer resident (no budget: today's behaviour).
    pub fn resident(config: &Qwen2Config) -> MemoryPlan {
        let (layer_bytes, other_bytes) = weight_bytes(config, false);
        MemoryPlan {
            layers: config.num_hidden_layers,
            resident_layers: config.num_hidden_layers,
            slots: 0,
            layer_bytes,
            other_bytes,
            working: 0,
            offloaded: 0,
            budget: None,
        }
    }

    /// The plan for `budget` bytes of device memory of which the workload needs `working`
    /// besides the weights, `offloadable` of it checkpointed layer inputs that can wait in host
    /// memory; cheapest first: everything resident if it fits; else as many layers resident as
    /// fit beside two streaming slots (one when two do not fit); else the same with the layer
    /// inputs offloaded. A budget below the last is refused with the size that would fit.
    pub fn fit(config: &Qwen2Config, budget: Option<u64>, working: Working) -> Result<MemoryPlan> {
        let Working {
            bytes: working,
            offloadable,
        } = working;
        let mut plan = MemoryPlan {
            working,
            budget,
            ..MemoryPlan::resident(config)
        };
        let Some(budget) = budget else {
            return Ok(plan);
        };
        let layers_that_fit = |working: u64| {
            let room = budget.saturating_sub(plan.other_bytes + working);
            (room / plan.layer_bytes) as usize
        };
        let mut fit = layers_that_fit(working);
        if fit == 0 && offloadable > 0 {
            plan.offloaded = offloadable;
            plan.working = working - offloadable;
            fit = layers_that_fit(plan.working);
        }
        let least = plan.other_bytes + plan.layer_bytes + plan.working;
        ensure!(
            fit >= 1,
            "--device-memory {}: this run needs at least {:.1} MiB (--device-memory {least}B): \
             {:.1} MiB of embedding and LM head, one streamed decoder layer of {:.1} MiB and \
             {:.1} MiB of activations and trained state{}",
            human(budget),
            least as f64 / MIB as f64,
            plan.other_bytes as f64 / MIB as f64,
            plan.layer_bytes as f64 / MIB as f64,
            plan.working as f64 / MIB as f64,
            match plan.offloaded {
                0 => "",
                _ => " (the layer inputs offloaded to host memory)",
            }
        );
        if fit < plan.layers {
            plan.slots = fit.min(2);
            plan.resident_layers = fit - plan.slots;
        }
        Ok(plan)
    }

    /// Decoder layers that stream.
    pub fn streamed_layers(&self) -> usize {
        self.layers - self.resident_layers
    }

    /// Device bytes of the weights under this plan.
    pub fn weight_device_bytes(&self) -> u64 {
        self.other_bytes + (self.resident_layers + self.slots) as u64 * self.layer_bytes
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

    /// Layer uploads host -> device of one forward pass followed by the backward (a training
    /// micro-batch): each streamed layer once per direction, but for the `slots` layers still
    /// held where one direction ends and the other begins.
    pub fn training_uploads(&self) -> u64 {
        2 * self.streamed_layers().saturating_sub(self.slots) as u64 * self.layer_bytes
    }

    /// Host memory the plan reads weights from: the memory-mapped streamed layers, which the page
    /// cache holds if RAM allows (else they are read from disk on every pass), and the offloaded
    /// layer inputs.
    pub fn host_bytes(&self) -> u64 {
        self.streamed_layers() as u64 * self.layer_bytes + self.offloaded
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
        line(
            f,
            "resident: embedding, norm, LM head".into(),
            self.other_bytes,
        )?;
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

/// The streamed decoder layers of a model: which layer each slot holds, and where their bytes
/// come from.
pub struct LayerStream {
    pub plan: MemoryPlan,
    /// The memory-mapped checkpoint; None for a model built without one (a dry run).
    source: Option<Weights>,
    /// The streamed layer each slot holds now.
    held: Mutex<Vec<Option<usize>>>,
    /// Bytes uploaded host -> device so far.
    uploaded: AtomicU64,
}

impl LayerStream {
    /// Slot `k` starts out holding layer `resident_layers + k` (what the model was built with).
    pub fn new(plan: MemoryPlan, source: Option<Weights>) -> LayerStream {
        let held = (0..plan.slots)
            .map(|k| Some(plan.resident_layers + k))
            .collect();
        LayerStream {
            plan,
            source,
            held: Mutex::new(held),
            uploaded: AtomicU64::new(0),
        }
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
        for (name, tensor) in layer.tensors(l) {
            match &self.source {
                Some(weights) => write_to_device(gpu, &weights.get(&name)?, tensor)?,
                None if gpu.is_dry_run() => {}
                None => bail!(
                    "decoder layer {l} streams, but the model has no checkpoint to stream it from"
                ),
            }
            let bytes = tensor_bytes(tensor.numel(), tensor.dtype().bytes());
            self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        }
        held[slot] = Some(l);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
    fn plans_go_from_resident_to_streamed_to_offloaded_to_refused() {
        let config = Qwen2Config::qwen25("7B").unwrap();
        let (layer, other) = weight_bytes(&config, false);
        let working = Working {
            bytes: 10 * layer,
            offloadable: 5 * layer,
        };
        let plan = |budget: u64| MemoryPlan::fit(&config, Some(budget), working);
        let all = other + 28 * layer + working.bytes;
        let resident = plan(all).unwrap();
        assert_eq!((resident.resident_layers, resident.slots), (28, 0));
        assert_eq!(resident.device_bytes(), all);
        let streamed = plan(all - 1).unwrap();
        assert_eq!((streamed.resident_layers, streamed.slots), (25, 2));
        assert_eq!(streamed.training_uploads(), 2 * layer);
        let one_slot = plan(other + working.bytes + layer).unwrap();
        assert_eq!((one_slot.resident_layers, one_slot.slots), (0, 1));
        assert_eq!(one_slot.offloaded, 0);
        let offloaded = plan(other + working.bytes + layer - 1).unwrap();
        assert_eq!(offloaded.offloaded, working.offloadable);
        assert!(offloaded.device_bytes() < other + working.bytes + layer);
        let least = other + working.bytes - working.offloadable + layer;
        assert_eq!(plan(least).unwrap().slots, 1);
        let err = plan(least - 1).unwrap_err().to_string();
        assert!(err.contains(&format!("--device-memory {least}B")), "{err}");
        assert_eq!(MemoryPlan::fit(&config, None, working).unwrap().slots, 0);
    }
}
