//! The training loop: data → micro-batches → forward/backward ([`Qwen2::forward_backward`]) →
//! global gradient norm → NaN check → clipped SGD / AdamW update on the device → metrics
//! ([`super::step`] holds the device work of a step).
//!
//! LoRA trains f32 factors over the frozen bf16 model (PEFT's layout and initialisation); full
//! fine-tuning loads every weight as f32 master weights and updates them in place (a tied LM head
//! is the embedding, one parameter). The loss of a step is the mean over the supervised tokens of
//! all its micro-batches: every micro-batch's gradient is scaled by 1 / (that total).
//!
//! On a dry-run device ([`Gpu::is_dry_run`], `wgtrain train --dry-run`) the set-up runs as usual,
//! then one step on the run's largest micro-batch, and [`train`] returns the device memory that
//! took ([`MemoryReport`]) without writing anything to the output directory.
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use wgtrain_kernels::{DType, Gpu, Tensor};

use super::batching::{
    drop_reason, filter_rows, BatchSettings, DataOrder, Dropped, Fnv, RowCounts, Step,
};
use super::checkpoint::{
    check_output_dir, checkpoint_dir, config_hash, latest_checkpoint, load_f32_tensors,
    remove_old_checkpoints, save_f32_tensors, write_dir_atomically, NamedTensor, RngState,
    TrainState, OPTIMIZER_FILE, STATE_FILE, STATE_FORMAT_VERSION,
};
use super::config::{module_names, LoraSettings, Method, OptimizerKind, TrainConfig};
use super::demo::{demo_config_json, write_demo_dataset, write_demo_model, DEMO_ROWS};
use super::flops::{row_flops, Trainable};
use super::metrics::{write_loss_svg, MetricsWriter, Progress, StepMetrics, METRICS_FILE};
use super::ranks::{agree, any, check_same, JobReport, Ranks};
use super::run_dir::{check_not_in_use, check_output_apart, RunDir};
use super::schedule::Schedule;
use super::settings::label;
use super::step::{
    gradients_across, lora_step_working, new_moments, update, Gradients, MemoryReport, MicroBatch,
    Moments,
};
use crate::data::chat::{ChatEncoder, EncodedRow};
use crate::data::Dataset;
use crate::model::backward::micro_batch_bytes;
use crate::model::residency::{weight_bytes, MemoryPlan};
use crate::model::{
    next_token_targets, Adapter, AdapterConfig, Grads, LoraDropout, LoraPair, Param, PerProj,
    Qwen2, Qwen2Config, TargetModules, Weights, HF_SIDE_FILES,
};

/// What a finished (or interrupted) run reports.
#[derive(Debug)]
pub struct TrainSummary {
    /// Optimizer steps done, counting those before a resume.
    pub steps: usize,
    pub total_steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub rows: RowCounts,
    pub output: PathBuf,
    /// Stopped early on request (a stop signal); the final adapter or weights were not written.
    pub interrupted: bool,
    /// The last checkpoint written by this process.
    pub last_checkpoint: Option<PathBuf>,
}

/// What [`train`] did.
pub enum Outcome {
    Trained(TrainSummary),
    /// On a dry-run device: one step measured, nothing trained or written (with several ranks:
    /// each rank's peak and the gradient bytes summed across them).
    DryRun(MemoryReport, Option<JobReport>),
}

/// The stream of the training RNG (stream 0 of the seed draws the fresh LoRA factors).
const TRAIN_RNG_STREAM: u64 = 1;

/// The model directory and dataset files of a run (made in `demo_dir` for the demo).
fn inputs(config: &TrainConfig, demo_dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    if !config.demo {
        let model = config.model.clone().context("--model is required")?;
        return Ok((model, config.data.clone()));
    }
    let model = demo_dir.join("demo-model");
    let data = demo_dir.join("demo-data.jsonl");
    write_demo_model(&model, config.seed)?;
    write_demo_dataset(&data, DEMO_ROWS, config.seed)?;
    Ok((model, vec![data]))
}

/// The base model's config, before its weights (or the demo's) are written or loaded.
fn model_config(config: &TrainConfig) -> Result<Qwen2Config> {
    match &config.model {
        Some(model) if !config.demo => Qwen2Config::load(model),
        _ => Qwen2Config::parse(&demo_config_json().to_string()),
    }
}

/// Every row of every file, encoded and cut to `max_len`, each with where it comes from
/// (`file:line: row N`).
fn encode_rows(
    encoder: &ChatEncoder,
    files: &[PathBuf],
    config: &TrainConfig,
) -> Result<Vec<(String, EncodedRow)>> {
    let mut rows = Vec::new();
    for file in files {
        let dataset = Dataset::load(file)?;
        for row in dataset.rows() {
            if config.max_samples.is_some_and(|n| rows.len() >= n) {
                return Ok(rows);
            }
            let origin = format!("{}:{}: row {}", file.display(), row.line(), row.index());
            let encoded = encoder
                .encode_row(row.conversation(), config.max_len)
                .with_context(|| origin.clone())?;
            rows.push((origin, encoded));
        }
    }
    Ok(rows)
}

/// Dropped rows named in warnings: this many, then a count of the rest.
const DROPPED_ROWS_NAMED: usize = 20;

/// Warns of every row that cannot be trained on (the first [`DROPPED_ROWS_NAMED`] named with
/// their reason), and returns the rows.
fn warn_of_dropped_rows(rows: Vec<(String, EncodedRow)>, config: &TrainConfig) -> Vec<EncodedRow> {
    let dropped: Vec<String> = rows
        .iter()
        .filter_map(|(origin, row)| {
            let why = match drop_reason(row, config.overlong)? {
                Dropped::Overlong => {
                    format!("longer than --max-len {} (--overlong drop)", config.max_len)
                }
                Dropped::Unsupervised => format!(
                    "no supervised (assistant) token within its first {} tokens (--max-len)",
                    config.max_len
                ),
            };
            Some(format!("{origin}: dropped: {why}"))
        })
        .collect();
    for line in dropped.iter().take(DROPPED_ROWS_NAMED) {
        eprintln!("warning: {line}");
    }
    if dropped.len() > DROPPED_ROWS_NAMED {
        eprintln!(
            "warning: ... and {} more rows dropped",
            dropped.len() - DROPPED_ROWS_NAMED
        );
    }
    rows.into_iter().map(|(_, row)| row).collect()
}

/// PEFT's fresh LoRA: A Kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero, drawn from `seed`.
pub fn new_adapter(model: &Qwen2Config, lora: &LoraSettings, seed: u64) -> Result<Adapter> {
    let config = AdapterConfig {
        r: lora.rank,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: TargetModules::List(
            module_names(&lora.targets)
                .into_iter()
                .map(String::from)
                .collect(),
        ),
        use_rslora: false,
        base_model: None,
    };
    let targets = Adapter::targets(&config, model)?;
    for &(l, proj) in &targets {
        let (out_f, in_f) = proj.shape(model);
        ensure!(
            lora.rank <= out_f.min(in_f),
            "{} {} exceeds the smaller side of layer {l}'s {} ({out_f} x {in_f}): a rank \
             above {} adds no directions, only memory",
            label!(lora_rank),
            lora.rank,
            proj.path(),
            out_f.min(in_f)
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut modules = BTreeMap::new();
    for (l, proj) in targets {
        let (out_f, in_f) = proj.shape(model);
        let bound = 1.0 / (in_f as f64).sqrt();
        let a = (0..lora.rank * in_f)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        let b = vec![0.0; out_f * lora.rank];
        modules.insert((l, proj), LoraPair { a, b });
    }
    Ok(Adapter { config, modules })
}

/// The device's peak FLOP/s for MFU, from `WGTRAIN_PEAK_GFLOPS` (wgpu cannot tell it; the kernels
/// run in f32, so the FP32 peak is the fair one).
fn peak_gflops() -> Result<Option<f64>> {
    match std::env::var("WGTRAIN_PEAK_GFLOPS") {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|g| *g > 0.0)
            .map(Some)
            .with_context(|| format!("WGTRAIN_PEAK_GFLOPS = {v:?} is not a positive number")),
    }
}

/// The trained adapter, read back from the device.
fn adapter_from_device(gpu: &Gpu, model: &Qwen2, config: &AdapterConfig) -> Result<Adapter> {
    let mut modules = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for (p, linear) in layer.proj.iter() {
            if let Some(lora) = &linear.lora {
                let pair = LoraPair {
                    a: lora.a.to_f32(gpu)?,
                    b: lora.b.to_f32(gpu)?,
                };
                modules.insert((l, p), pair);
            }
        }
    }
    Ok(Adapter {
        config: config.clone(),
        modules,
    })
}

/// What is being trained, to write it out (final output or checkpoint).
struct Trained<'a> {
    gpu: &'a Gpu,
    model: &'a Qwen2,
    grads: &'a Grads,
    /// LoRA: the adapter's config; full fine-tuning: None.
    adapter: Option<&'a AdapterConfig>,
    /// The base checkpoint (its config and tokenizer files go with full weights).
    base: &'a Path,
}

impl Trained<'_> {
    /// The adapter (PEFT layout) or the full model (f32 safetensors with the base's config and
    /// tokenizer files) into `dir`.
    fn save(&self, dir: &Path) -> Result<()> {
        match self.adapter {
            Some(ac) => adapter_from_device(self.gpu, self.model, ac)?.save(dir),
            None => save_full(self.gpu, self.model, self.grads, self.base, dir),
        }
    }

    /// `checkpoint-<step>`: the trained values, AdamW's moments and the state, written atomically.
    fn save_checkpoint(
        &self,
        moments: &[Option<Moments>],
        state: &TrainState,
        dir: &Path,
    ) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            self.save(tmp)?;
            let mut tensors = Vec::new();
            for (p, moments) in self.grads.params(self.model).iter().zip(moments) {
                if let Some(Moments { m, v }) = moments {
                    for (suffix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        tensors.push(NamedTensor {
                            name: format!("{}.{suffix}", p.name),
                            shape: t.shape().to_vec(),
                            data: t.to_f32(self.gpu)?,
                        });
                    }
                }
            }
            if !tensors.is_empty() {
                let metadata = [("format".to_string(), "wgtrain-adamw".to_string())].into();
                save_f32_tensors(&tmp.join(OPTIMIZER_FILE), &tensors, Some(metadata))?;
            }
            state.save(tmp)
        })
    }
}

/// Writes the fully fine-tuned model as a Hugging Face checkpoint (f32 weights, the base's config
/// and tokenizer files).
fn save_full(gpu: &Gpu, model: &Qwen2, grads: &Grads, base: &Path, dir: &Path) -> Result<()> {
    let tensors = grads
        .params(model)
        .into_iter()
        .map(|p| {
            Ok(NamedTensor {
                name: p.name,
                shape: p.value.shape().to_vec(),
                data: p.value.to_f32(gpu)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = [("format".to_string(), "pt".to_string())].into();
    save_f32_tensors(&dir.join("model.safetensors"), &tensors, Some(metadata))?;
    for name in HF_SIDE_FILES {
        let src = base.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("copying {} into {}", src.display(), dir.display()))?;
        }
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    config["torch_dtype"] = json!("float32");
    // transformers 5 writes `dtype` and reads it before `torch_dtype`.
    if config.get("dtype").is_some() {
        config["dtype"] = json!("float32");
    }
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))
}

/// AdamW's moments as a checkpoint saved them, checked against the parameters.
fn load_moments(gpu: &Gpu, params: &[Param], path: &Path) -> Result<Vec<Option<Moments>>> {
    let mut saved: HashMap<String, NamedTensor> = load_f32_tensors(path)?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let moments = new_moments(gpu, params, OptimizerKind::Adamw)?;
    for (p, m) in params.iter().zip(moments.iter().flatten()) {
        for (suffix, moment) in [("exp_avg", &m.m), ("exp_avg_sq", &m.v)] {
            let name = format!("{}.{suffix}", p.name);
            let t = saved
                .remove(&name)
                .with_context(|| format!("{}: tensor {name} is missing", path.display()))?;
            ensure!(
                t.shape == p.value.shape(),
                "{}: tensor {name} has shape {:?}, but the parameter has {:?}",
                path.display(),
                t.shape,
                p.value.shape()
            );
            moment.write_f32(gpu, &t.data)?;
        }
    }
    if let Some(name) = saved.keys().min() {
        bail!(
            "{}: tensor {name} belongs to no parameter being trained",
            path.display()
        );
    }
    Ok(moments)
}

/// Refuses missing inputs, and an output directory that is, holds or lies inside one of them
/// (`--overwrite` would delete it, or the run would write into it), before --output is touched.
fn check_inputs(config: &TrainConfig) -> Result<()> {
    for file in &config.data {
        ensure!(file.is_file(), "--data {}: no such file", file.display());
    }
    if let Some(dir) = &config.init_adapter {
        ensure!(
            dir.is_dir(),
            "--init-adapter {}: no such directory",
            dir.display()
        );
    }
    let mut inputs: Vec<(&str, &Path)> = config
        .data
        .iter()
        .map(|d| ("--data", d.as_path()))
        .collect();
    inputs.extend(config.model.as_deref().map(|m| ("--model", m)));
    inputs.extend(
        config
            .init_adapter
            .as_deref()
            .map(|a| ("--init-adapter", a)),
    );
    check_output_apart(&config.output, &inputs)
}

/// Names the first trained tensor holding NaN or infinity before any update of this process: the
/// weights loaded from `source` are damaged (no learning rate is to blame).
fn check_finite_weights(gpu: &Gpu, params: &[Param], source: &Path) -> Result<()> {
    for p in params {
        let values = p.value.to_f32(gpu)?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            bail!(
                "the weights loaded from {} hold non-finite values (tensor {} has {bad}): they \
                 are damaged; start from an earlier checkpoint or the base model",
                source.display(),
                p.name
            );
        }
    }
    Ok(())
}

/// The checkpoint `--resume` names: the directory itself, or a run directory's latest complete
/// checkpoint.
fn resume_dir(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    match latest_checkpoint(path)? {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "--resume {}: neither a checkpoint (no {STATE_FILE}) nor a run directory holding a \
             complete checkpoint-<step>",
            path.display()
        ),
    }
}

/// A checkpoint to resume from: its directory and state.
type Resume = (PathBuf, TrainState);

/// The run's settings, once an existing adapter's factors (the checkpoint resumed, or
/// `--init-adapter`) have fixed its rank, alpha and targets (None: `config` as it is), and the
/// checkpoint `--resume` names, checked against them.
fn settle(config: &TrainConfig) -> Result<(Option<TrainConfig>, Option<Resume>)> {
    let resume_from_dir = config.resume.as_deref().map(resume_dir).transpose()?;
    // The run (its summary, resume check and FLOP count) takes the adapter's own values.
    let adopted = match resume_from_dir
        .as_deref()
        .or(config.init_adapter.as_deref())
    {
        Some(adapter) => {
            let (adopted, warnings) = config.with_adapter(adapter, &model_config(config)?)?;
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            Some(adopted)
        }
        None => None,
    };
    let summary = adopted.as_ref().unwrap_or(config).resume_summary();
    let resume = match resume_from_dir {
        Some(dir) => {
            let state = TrainState::load(&dir)?;
            state
                .check_config(&summary)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            Some((dir, state))
        }
        None => None,
    };
    Ok((adopted, resume))
}

/// The run's rows, encoded, cut to `--max-len` and filtered (dropped rows named), with their
/// next-token targets.
fn read_rows(
    config: &TrainConfig,
    encoder: &ChatEncoder,
    files: &[PathBuf],
) -> Result<(Vec<EncodedRow>, Vec<Vec<u32>>, RowCounts)> {
    let encoded = warn_of_dropped_rows(encode_rows(encoder, files, config)?, config);
    let (rows, counts) = filter_rows(encoded, config.overlong);
    ensure!(
        !rows.is_empty(),
        "no row of {} has a supervised token within --max-len {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        config.max_len
    );
    let targets = rows
        .iter()
        .map(|r| next_token_targets(&r.ids, &r.labels_mask))
        .collect();
    Ok((rows, targets, counts))
}

/// The order of the run's micro-batches; a resumed run continues where its checkpoint was, on
/// the same data and schedule.
fn data_order(
    config: &TrainConfig,
    rows: &[EncodedRow],
    resume: Option<&Resume>,
) -> Result<DataOrder> {
    let mut order = DataOrder::new(
        rows.iter().map(EncodedRow::len).collect(),
        BatchSettings {
            batch_size: config.batch_size,
            grad_accum: config.grad_accum,
            seed: config.seed,
            shuffle: config.shuffle,
            duration: config.duration,
        },
    )?;
    let Some((dir, state)) = resume else {
        return Ok(order);
    };
    let total_steps = order.total_steps();
    ensure!(
        state.data_fingerprint == order.fingerprint(),
        "resuming from {}: the data changed since the checkpoint (it was {}, now {})",
        dir.display(),
        state.data_fingerprint,
        order.fingerprint()
    );
    ensure!(
        state.scheduler_step == state.step && state.total_steps == total_steps,
        "resuming from {}: step {} of {} (scheduler step {}) does not fit this run of {} steps",
        dir.display(),
        state.step,
        state.total_steps,
        state.scheduler_step,
        total_steps
    );
    order
        .seek(state.data_position)
        .with_context(|| format!("resuming from {}", dir.display()))?;
    Ok(order)
}

/// The training RNG: each micro-batch draws its LoRA-dropout seed from it, and checkpoints carry
/// its position so that a resumed run draws the same masks.
fn training_rng(config: &TrainConfig, resume: Option<&Resume>) -> Result<ChaCha8Rng> {
    Ok(match resume {
        Some((_, state)) => state.rng.restore()?,
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(TRAIN_RNG_STREAM);
            rng
        }
    })
}

/// The model to train: f32 master weights (full), or the frozen model with the adapter applied
/// (resumed, `--init-adapter`, or fresh) and the adapter config the run saves. Under a device
/// memory budget the frozen layers that do not fit beside a micro-batch of `tokens` tokens and the
/// LoRA state stream; full fine-tuning's weights cannot, so a budget too small for them is
/// refused. A dry run of a directory without weights plans a zero model of its config.
fn load_model(
    gpu: &Gpu,
    config: &TrainConfig,
    model_dir: &Path,
    resume_from: Option<&Path>,
    tokens: usize,
) -> Result<(Qwen2, Option<AdapterConfig>)> {
    let model_config = Qwen2Config::load(model_dir)?;
    let config_only = gpu.is_dry_run() && !Weights::present(resume_from.unwrap_or(model_dir));
    let adamw = config.optimizer.kind == OptimizerKind::Adamw;
    match &config.method {
        Method::Full => {
            check_full_fits(gpu, &model_config, adamw, tokens)?;
            let model = match config_only {
                true => Qwen2::zeroed(gpu, model_config, true)?,
                false => Qwen2::load_f32(gpu, resume_from.unwrap_or(model_dir))?,
            };
            Ok((model, None))
        }
        Method::Lora(lora) => {
            let adapter = match resume_from.or(config.init_adapter.as_deref()) {
                Some(dir) => Adapter::load(dir, &model_config)?,
                None => new_adapter(&model_config, lora, config.seed)?,
            };
            let dropout = lora.dropout > 0.0;
            let working =
                lora_step_working(&model_config, &adapter.ranks(), adamw, dropout, tokens);
            let mut model = match config_only {
                true => {
                    let plan = MemoryPlan::fit(&model_config, gpu.device_memory(), working)?;
                    Qwen2::zeroed_planned(gpu, model_config, plan)?
                }
                false => Qwen2::load_planned(gpu, model_dir, working)?,
            };
            model.apply_adapter(gpu, &adapter)?;
            let mut adapter_config = adapter.config.clone();
            adapter_config.base_model = Some(model_dir.display().to_string());
            adapter_config.lora_dropout = lora.dropout;
            Ok((model, Some(adapter_config)))
        }
    }
}

/// Full fine-tuning keeps its f32 master weights, their gradients and (AdamW) moments on the
/// device: under a budget too small for them and a micro-batch of `tokens` tokens, the run is
/// refused with the size it needs.
fn check_full_fits(gpu: &Gpu, c: &Qwen2Config, adamw: bool, tokens: usize) -> Result<()> {
    let Some(budget) = gpu.device_memory() else {
        return Ok(());
    };
    let (layer, other) = weight_bytes(c, true);
    let weights = layer * c.num_hidden_layers as u64 + other;
    let copies = if adamw { 4 } else { 2 };
    let need = weights * copies + micro_batch_bytes(c, &PerProj::default(), false, tokens).bytes;
    ensure!(
        need <= budget,
        "--device-memory {:.2} GiB is too small for full fine-tuning, which keeps its f32 weights, \
         their gradients{} on the device (they do not stream) beside the activations: it needs \
         {:.2} GiB; LoRA (--finetuning-type lora) streams the frozen weights",
        budget as f64 / (1u64 << 30) as f64,
        if adamw { " and AdamW's two moments" } else { "" },
        need as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

/// The NaN policy: a step whose loss or gradient norm is not finite stops the run before its
/// update is applied, keeping the checkpoints. On the first step of a process, trained values
/// already non-finite are named as damaged weights (from `weights_from`), not blamed on the
/// learning rate.
fn stop_if_not_finite(
    gpu: &Gpu,
    g: &Gradients,
    step: &Step,
    first_step: bool,
    params: &[Param],
    weights_from: &Path,
    output: &Path,
) -> Result<()> {
    if g.loss.is_finite() && g.grad_norm.is_finite() {
        return Ok(());
    }
    if first_step {
        check_finite_weights(gpu, params, weights_from)
            .with_context(|| format!("step {}", step.index + 1))?;
    }
    let kept = kept_checkpoint(output)?;
    bail!(
        "step {}: the loss ({}) or gradient norm ({}) is not finite; training stopped before \
         applying it, and {kept}. A lower --lr or --max-grad-norm needs a fresh run \
         (--overwrite): resuming keeps the settings",
        step.index + 1,
        g.loss,
        g.grad_norm
    );
}

/// What a stopped run keeps in `output`: its last complete checkpoint, if any.
pub fn kept_checkpoint(output: &Path) -> Result<String> {
    Ok(match latest_checkpoint(output)? {
        Some((at, dir)) => format!(
            "the last checkpoint (step {at}) is kept in {}",
            dir.display()
        ),
        None => "no checkpoint had been written yet".to_string(),
    })
}

/// A fingerprint of the files of `dirs` a run reads (config and tokenizer JSON, safetensors):
/// each one's name and size, a JSON file's bytes, a safetensors file's first and last MiB (its
/// header and some weights; reading every weight again would cost minutes on a large model).
fn files_fingerprint(dirs: &[&Path]) -> Result<String> {
    const SAMPLE: u64 = 1 << 20;
    let mut hash = Fnv::default();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        files.retain(|f| {
            f.is_file()
                && matches!(
                    f.extension().and_then(|e| e.to_str()),
                    Some("json" | "safetensors")
                )
        });
        files.sort();
        for file in files {
            let mut read = || -> std::io::Result<()> {
                let mut f = std::fs::File::open(&file)?;
                let len = f.metadata()?.len();
                hash.write(file.file_name().unwrap_or_default().as_encoded_bytes());
                hash.write(&len.to_le_bytes());
                let whole = file.extension().is_some_and(|e| e == "json") || len <= 2 * SAMPLE;
                let samples = match whole {
                    true => vec![(0, len)],
                    false => vec![(0, SAMPLE), (len - SAMPLE, SAMPLE)],
                };
                for (at, n) in samples {
                    let mut bytes = vec![0; n as usize];
                    f.seek(SeekFrom::Start(at))?;
                    f.read_exact(&mut bytes)?;
                    hash.write(&bytes);
                }
                Ok(())
            };
            read().with_context(|| format!("reading {}", file.display()))?;
        }
    }
    Ok(format!("fnv1a {:016x}", hash.0))
}

/// A fingerprint of the encoded rows (token ids and targets): the data as the run sees it.
fn rows_fingerprint(rows: &[EncodedRow], targets: &[Vec<u32>]) -> String {
    let mut hash = Fnv::default();
    for (row, targets) in rows.iter().zip(targets) {
        for ids in [&row.ids, targets] {
            hash.write(&(ids.len() as u64).to_le_bytes());
            for id in ids {
                hash.write(&id.to_le_bytes());
            }
        }
    }
    format!("{} rows, fnv1a {:016x}", rows.len(), hash.0)
}

/// The run's metrics.jsonl: new, or a resumed run's with the lines up to its checkpoint (returned)
/// kept byte for byte.
fn open_metrics(
    output: &Path,
    resume: Option<&Resume>,
) -> Result<(MetricsWriter, Vec<StepMetrics>)> {
    let path = output.join(METRICS_FILE);
    match resume {
        Some((_, state)) => MetricsWriter::resume(&path, state.step),
        None => Ok((MetricsWriter::create(&path)?, Vec::new())),
    }
}

/// The settings of a job of `ranks` processes (None: one, `config` as it is). A step is the
/// micro-batches of every rank: its data order and the settings a resume checks count ranks x
/// --grad-accum, so a run resumes on another number of ranks as long as that product stays.
fn job_config(config: &TrainConfig, ranks: usize) -> Option<TrainConfig> {
    (ranks > 1).then(|| TrainConfig {
        grad_accum: config.grad_accum * ranks,
        ..config.clone()
    })
}

/// What every rank of a job must share: the settings (`summary`), the encoded rows, the model
/// and what training starts from (a checkpoint to resume, `--init-adapter`, or neither).
fn job_fingerprint(
    summary: &serde_json::Value,
    rows: &[EncodedRow],
    targets: &[Vec<u32>],
    model_dir: &Path,
    resume: Option<&Resume>,
    init_adapter: Option<&Path>,
) -> Result<String> {
    let start = match (resume, init_adapter) {
        (Some((dir, state)), _) => format!("step {} {}", state.step, files_fingerprint(&[dir])?),
        (None, Some(dir)) => files_fingerprint(&[dir])?,
        (None, None) => "the base model".to_string(),
    };
    Ok(format!(
        "settings {}, data {}, model {}, starting from {start}",
        config_hash(summary),
        rows_fingerprint(rows, targets),
        files_fingerprint(&[model_dir])?,
    ))
}

/// The dry run's step: `batch_size` rows as long as the longest row, one such micro-batch per
/// rank (gradient accumulation repeats micro-batches; it does not hold more at once), run by
/// `run_step`; the memory of what is `trained` and the step's peak, and with several ranks each
/// rank's peak and the gradient bytes they sum.
fn dry_run_step(
    rows: &[EncodedRow],
    batch_size: usize,
    ranks: &dyn Ranks,
    trained: &Trained,
    params: &[Param],
    moments: &[Option<Moments>],
    run_step: impl FnOnce(&Step) -> Result<(Gradients, f64, u64)>,
) -> Result<Outcome> {
    let longest = (0..rows.len()).max_by_key(|&i| rows[i].len()).unwrap_or(0);
    let micro_batch = vec![longest; batch_size.min(rows.len())];
    let shape = (micro_batch.len(), rows[longest].len());
    let step = Step {
        index: 0,
        epoch: 0,
        micro_batches: vec![micro_batch; ranks.size()],
        epoch_progress: 0.0,
    };
    let (_, _, peak) = run_step(&step)?;
    let memory = MemoryReport::new(trained.gpu, trained.model, params, moments, shape, peak)?;
    let job = (ranks.size() > 1).then(|| JobReport {
        peaks: ranks
            .all_gather(&peak.to_le_bytes())
            .iter()
            .map(|b| u64::from_le_bytes(b[..].try_into().expect("8 bytes of a u64")))
            .collect(),
        summed_bytes: params.iter().map(|p| 4 * p.grad.numel() as u64).sum(),
    });
    Ok(Outcome::DryRun(memory, job))
}

/// Runs the training `config` describes on `gpu`, as one of `ranks` (data-parallel processes,
/// each running `config.grad_accum` micro-batches of every step; rank 0 alone writes). Once
/// `stop` is set on any rank, the step under way is finished, a checkpoint is written and the
/// run returns as interrupted. On a dry-run device, measures one step instead (see the module
/// documentation).
pub fn train(
    config: &TrainConfig,
    gpu: &Gpu,
    stop: &AtomicBool,
    ranks: &dyn Ranks,
) -> Result<Outcome> {
    let job = job_config(config, ranks.size());
    let config = job.as_ref().unwrap_or(config);
    // Rank 0's lock on --output covers the job.
    let writes = ranks.rank() == 0;
    if writes {
        check_not_in_use(&config.output)?;
    }
    let (adopted, resume) = settle(config)?;
    let config = adopted.as_ref().unwrap_or(config);
    let summary = config.resume_summary();
    let dry_run = gpu.is_dry_run();
    check_inputs(config)?;
    // A dry run, and every rank but 0, leave --output alone (the demo's model and data go to a
    // temporary directory), but a dry run refuses what the run would refuse.
    let demo_tmp = match (dry_run || !writes) && config.demo {
        true => Some(tempfile::tempdir().context("creating a temporary directory")?),
        false => None,
    };
    if dry_run {
        check_output_dir(&config.output, config.overwrite, resume.is_some())?;
    }
    // Locked for the whole run; the demo makes its inputs in it, a run's own inputs are read
    // before it is touched.
    let open_run_dir = || -> Result<Option<RunDir>> {
        match dry_run || !writes {
            true => Ok(None),
            false => {
                RunDir::open(&config.output, config.overwrite, resume.is_some(), &summary).map(Some)
            }
        }
    };
    let mut run_dir = match config.demo {
        true => open_run_dir()?,
        false => None,
    };
    let demo_dir = demo_tmp
        .as_ref()
        .map_or(config.output.as_path(), |d| d.path());
    let (model_dir, files) = inputs(config, demo_dir)?;
    let encoder = ChatEncoder::load(&model_dir)?;
    let (rows, targets, counts) = read_rows(config, &encoder, &files)?;
    if !config.demo {
        run_dir = open_run_dir()?;
    }

    let mut order = data_order(config, &rows, resume.as_ref())?;
    let total_steps = order.total_steps();
    let mut rng = training_rng(config, resume.as_ref())?;
    let dropout_p = match &config.method {
        Method::Lora(lora) if lora.dropout > 0.0 => Some(lora.dropout as f32),
        _ => None,
    };

    let resume_from = resume.as_ref().map(|(dir, _)| dir.as_path());
    // The largest micro-batch: batch-size rows as long as the longest row (gradient accumulation
    // repeats micro-batches; it does not hold more at once).
    let longest = (0..rows.len()).max_by_key(|&i| rows[i].len()).unwrap_or(0);
    let micro_shape = (config.batch_size.min(rows.len()), rows[longest].len());
    let micro_tokens = micro_shape.0 * micro_shape.1;
    let (model, adapter_config) = load_model(gpu, config, &model_dir, resume_from, micro_tokens)?;
    if let (Some(plan), false) = (model.memory_plan(), dry_run) {
        eprintln!("{plan}");
    }
    let grads = Grads::new(gpu, &model)?;
    let params = grads.params(&model);
    let moments = match (resume_from, config.optimizer.kind) {
        (Some(dir), OptimizerKind::Adamw) => load_moments(gpu, &params, &dir.join(OPTIMIZER_FILE))?,
        _ => new_moments(gpu, &params, config.optimizer.kind)?,
    };
    let trained = Trained {
        gpu,
        model: &model,
        grads: &grads,
        adapter: adapter_config.as_ref(),
        base: &model_dir,
    };
    if ranks.size() > 1 {
        let (resume, init) = (resume.as_ref(), config.init_adapter.as_deref());
        let fingerprint = job_fingerprint(&summary, &rows, &targets, &model_dir, resume, init)?;
        check_same(ranks, "settings, model or data", &fingerprint)?;
    }

    let schedule = Schedule::new(
        config.scheduler,
        config.optimizer.lr,
        config.warmup,
        total_steps,
    )?;
    let norm_sq = Tensor::zeros(gpu, &[1], DType::F32)?;
    // Where the trained values came from, should they hold NaN or infinity.
    let weights_from = resume_from
        .or(config.init_adapter.as_deref())
        .unwrap_or(&model_dir);
    let first_step = order.position().step;
    // The device work of one step (each micro-batch drawing its dropout seed from `rng`, on every
    // rank, which then runs its share); returns its gradients, learning rate and peak memory.
    let run_step = |step: &Step, rng: &mut ChaCha8Rng| -> Result<(Gradients, f64, u64)> {
        let micro_batches: Vec<MicroBatch> = step
            .micro_batches
            .iter()
            .map(|micro| MicroBatch {
                rows: micro
                    .iter()
                    .map(|&i| (rows[i].ids.as_slice(), targets[i].as_slice()))
                    .collect(),
                dropout: dropout_p.map(|p| LoraDropout {
                    p,
                    seed: rng.next_u64(),
                }),
            })
            .collect();
        gpu.reset_peak();
        let g = gradients_across(ranks, gpu, &model, &grads, &micro_batches, &norm_sq)
            .with_context(|| format!("step {}", step.index + 1))?;
        let first = step.index == first_step;
        // Every rank holds the same gradients, so all find the same; one message for all.
        agree(
            ranks,
            stop_if_not_finite(gpu, &g, step, first, &params, weights_from, &config.output),
        )?;
        let lr = schedule.lr(step.index);
        let clip = config.max_grad_norm.map(|max| (&norm_sq, max));
        let o = &config.optimizer;
        update(gpu, &params, &moments, o, lr, step.index, clip)?;
        Ok((g, lr, gpu.memory().peak))
    };
    if dry_run {
        let run_step = |step: &Step| run_step(step, &mut rng);
        let batch_size = config.batch_size;
        return dry_run_step(
            &rows, batch_size, ranks, &trained, &params, &moments, run_step,
        );
    }
    let run = Run {
        config,
        gpu,
        ranks,
        writes,
        rows: &rows,
        counts,
        trained,
        moments: &moments,
        summary: &summary,
    };
    run.steps(
        &mut order,
        &mut rng,
        run_step,
        run_dir.as_mut(),
        resume.as_ref(),
        stop,
    )
}

/// A run set up by [`train`]: what its step loop reads.
struct Run<'a> {
    config: &'a TrainConfig,
    gpu: &'a Gpu,
    ranks: &'a dyn Ranks,
    /// Rank 0: writes metrics, progress, checkpoints and the output.
    writes: bool,
    rows: &'a [EncodedRow],
    counts: RowCounts,
    trained: Trained<'a>,
    moments: &'a [Option<Moments>],
    /// The settings a resume must match ([`TrainConfig::resume_summary`]).
    summary: &'a serde_json::Value,
}

impl Run<'_> {
    /// The steps from where `order` stands to its end or a stop request (then the step under way
    /// is finished and checkpointed): metrics, progress, checkpoints; then the final output.
    /// `run_step` does the device work of one step: its gradients, learning rate and peak device
    /// memory.
    fn steps(
        &self,
        order: &mut DataOrder,
        rng: &mut ChaCha8Rng,
        mut run_step: impl FnMut(&Step, &mut ChaCha8Rng) -> Result<(Gradients, f64, u64)>,
        mut run_dir: Option<&mut RunDir>,
        resume: Option<&Resume>,
        stop: &AtomicBool,
    ) -> Result<Outcome> {
        let (config, model, ranks) = (self.config, self.trained.model, self.ranks);
        let (mut metrics, mut history) = match self.writes {
            true => open_metrics(&config.output, resume).map(|(m, h)| (Some(m), h))?,
            false => (None, Vec::new()),
        };
        let (earlier_s, mut tokens_seen) =
            resume.map_or((0.0, 0), |(_, state)| (state.elapsed_s, state.tokens_seen));
        let total_steps = order.total_steps();
        let done_before = order.position().step;
        let mut progress = self
            .writes
            .then(|| Progress::new(config.progress, total_steps, done_before, earlier_s));
        let resuming = resume.map_or(String::new(), |(dir, _)| {
            format!(", resuming after step {done_before} from {}", dir.display())
        });
        let counts = &self.counts;
        let on_ranks = match ranks.size() {
            1 => String::new(),
            n => format!(" (rank 0 of {n})"),
        };
        if let Some(p) = &progress {
            p.println(&format!(
                "training {} rows ({} truncated, {} dropped) for {total_steps} steps on {}\
                 {on_ranks}{resuming}",
                counts.kept,
                counts.truncated,
                counts.dropped_overlong + counts.dropped_unsupervised,
                self.gpu.describe(),
            ));
        }
        let trained_kind = match &config.method {
            Method::Full => Trainable::Full,
            Method::Lora(_) => Trainable::Lora(model.lora_ranks()),
        };
        let peak_flops = peak_gflops()?.map(|g| g * 1e9);
        let start = Instant::now();
        let mut last_checkpoint = None;
        let mut interrupted = false;

        while let Some(step) = order.next_step() {
            let step_start = Instant::now();
            let lens = step
                .micro_batches
                .iter()
                .flatten()
                .map(|&i| self.rows[i].len());
            let tokens: usize = lens.clone().sum();
            let flops: f64 = lens
                .map(|len| row_flops(&model.config, &trained_kind, len))
                .sum();
            let (g, lr, peak) = run_step(&step, rng)?;

            let done = step.index + 1;
            let seconds = step_start.elapsed().as_secs_f64();
            tokens_seen += tokens as u64;
            let epoch = step.epoch_progress;
            let elapsed_s = earlier_s + start.elapsed().as_secs_f64();
            let m = StepMetrics {
                step: done,
                epoch,
                loss: g.loss,
                lr,
                grad_norm: g.grad_norm,
                supervised_tokens: g.supervised as u64,
                tokens: tokens as u64,
                tokens_per_s: tokens as f64 / seconds,
                flops_per_s: flops / seconds,
                mfu: peak_flops.map(|peak| flops / seconds / peak),
                peak_mem_mib: peak as f64 / (1u64 << 20) as f64,
                elapsed_s,
            };
            if let (Some(metrics), Some(progress)) = (metrics.as_mut(), progress.as_mut()) {
                metrics.write(&m)?;
                progress.step(&m);
            }
            history.push(m);
            if done == done_before + 1 {
                if let Some(run_dir) = run_dir.as_deref_mut() {
                    run_dir.started()?;
                }
            }

            let stopping = any(ranks, stop.load(Ordering::SeqCst));
            let due = config.save_steps.is_some_and(|n| done % n == 0);
            if due || stopping || done == total_steps {
                let state = TrainState {
                    format_version: STATE_FORMAT_VERSION,
                    step: done,
                    total_steps,
                    epoch,
                    data_position: order.position(),
                    scheduler_step: done,
                    rng: RngState::capture(rng),
                    data_fingerprint: order.fingerprint(),
                    config_hash: config_hash(self.summary),
                    config: self.summary.clone(),
                    elapsed_s,
                    tokens_seen,
                };
                let written = match self.writes {
                    true => self.checkpoint(&state).map(Some),
                    false => Ok(None),
                };
                last_checkpoint = agree(ranks, written)?;
            }
            if stopping && done < total_steps {
                interrupted = true;
                break;
            }
        }
        if let Some(progress) = &progress {
            progress.finish();
            let steps_run = order.position().step - done_before;
            if let (n @ 2.., (bytes, seconds), 1..) = (ranks.size(), ranks.summed(), steps_run) {
                progress.println(&format!(
                    "gradients summed across {n} ranks: {:.3} MiB per step in {:.2} ms per step \
                     (mean of {steps_run})",
                    bytes as f64 / steps_run as f64 / (1u64 << 20) as f64,
                    1e3 * seconds / steps_run as f64
                ));
            }
        }

        // An interrupted run leaves only its checkpoint: a final adapter would look like a
        // finished run.
        let written = match self.writes {
            true => self.write_output(interrupted, &history),
            false => Ok(()),
        };
        agree(ranks, written)?;
        Ok(Outcome::Trained(TrainSummary {
            steps: order.position().step,
            total_steps,
            first_loss: history.first().map_or(f64::NAN, |m| m.loss),
            last_loss: history.last().map_or(f64::NAN, |m| m.loss),
            rows: self.counts,
            output: config.output.clone(),
            interrupted,
            last_checkpoint,
        }))
    }

    /// The final adapter or weights (unless `interrupted`) and the loss curve of `history`.
    fn write_output(&self, interrupted: bool, history: &[StepMetrics]) -> Result<()> {
        let output = &self.config.output;
        if !interrupted {
            self.trained.save(output)?;
        }
        write_loss_svg(output.join("loss.svg"), history, "wgtrain training loss")
    }

    /// `checkpoint-<step>` with `state`, then the rotation `--save-total-limit` asks for.
    fn checkpoint(&self, state: &TrainState) -> Result<PathBuf> {
        let output = &self.config.output;
        let dir = checkpoint_dir(output, state.step);
        self.trained.save_checkpoint(self.moments, state, &dir)?;
        if let Some(keep) = self.config.save_total_limit {
            remove_old_checkpoints(output, keep)?;
        }
        Ok(dir)
    }
}
