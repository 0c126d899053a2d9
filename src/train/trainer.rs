//! The training loop: data → micro-batches → forward/backward ([`Qwen2::forward_backward`]) →
//! global gradient norm → NaN check → clipped SGD / AdamW update on the device → metrics.
//!
//! LoRA trains f32 factors over the frozen bf16 model (PEFT's layout and initialisation); full
//! fine-tuning loads every weight as f32 master weights and updates them in place (a tied LM head
//! is the embedding, one parameter). The loss of a step is the mean over the supervised tokens of
//! all its micro-batches: every micro-batch's gradient is scaled by 1 / (that total).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use wgtrain_kernels::ops::optim::{adamw_step, grad_norm_sq, sgd_step, AdamW};
use wgtrain_kernels::{DType, Gpu, Tensor};

use super::batching::{filter_rows, BatchSettings, DataOrder, RowCounts};
use super::checkpoint::{prepare_output_dir, save_f32_tensors, NamedTensor};
use super::config::{LoraSettings, Method, OptimizerKind, TrainConfig};
use super::demo::{write_demo_dataset, write_demo_model, DEMO_ROWS};
use super::metrics::{write_loss_svg, MetricsWriter, Progress, StepMetrics};
use super::schedule::Schedule;
use crate::data::chat::{ChatEncoder, EncodedRow};
use crate::data::Dataset;
use crate::model::{
    next_token_targets, Adapter, AdapterConfig, Grads, LoraPair, Proj, Qwen2, TargetModules,
};

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub rows: RowCounts,
    pub output: PathBuf,
}

/// The model directory and dataset files of a run (made in the output directory for the demo).
fn inputs(config: &TrainConfig) -> Result<(PathBuf, Vec<PathBuf>)> {
    if !config.demo {
        let model = config.model.clone().context("--model is required")?;
        return Ok((model, config.data.clone()));
    }
    let model = config.output.join("demo-model");
    let data = config.output.join("demo-data.jsonl");
    write_demo_model(&model, config.seed)?;
    write_demo_dataset(&data, DEMO_ROWS, config.seed)?;
    Ok((model, vec![data]))
}

/// Every row of every file, encoded and cut to `max_len`.
fn encode_rows(
    encoder: &ChatEncoder,
    files: &[PathBuf],
    config: &TrainConfig,
) -> Result<Vec<EncodedRow>> {
    let mut rows = Vec::new();
    for file in files {
        let dataset = Dataset::load(file)?;
        for row in dataset.rows() {
            if config.max_samples.is_some_and(|n| rows.len() >= n) {
                return Ok(rows);
            }
            let encoded = encoder
                .encode_row(row.conversation(), config.max_len)
                .with_context(|| {
                    format!("{}:{}: row {}", file.display(), row.line(), row.index())
                })?;
            rows.push(encoded);
        }
    }
    Ok(rows)
}

/// PEFT's fresh LoRA: A Kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero, drawn from `seed`.
fn new_adapter(model: &Qwen2, lora: &LoraSettings, seed: u64) -> Result<Adapter> {
    let config = AdapterConfig {
        r: lora.rank,
        lora_alpha: lora.alpha,
        target_modules: TargetModules::List(lora.targets.clone()),
        use_rslora: false,
        base_model: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut modules = BTreeMap::new();
    for (l, proj) in Adapter::targets(&config, &model.config)? {
        let (out_f, in_f) = proj.shape(&model.config);
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

/// The trained adapter, read back from the device.
fn adapter_from_device(gpu: &Gpu, model: &Qwen2, config: &AdapterConfig) -> Result<Adapter> {
    let mut modules = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for (p, linear) in layer.proj.iter().enumerate() {
            if let Some(lora) = &linear.lora {
                let pair = LoraPair {
                    a: lora.a.to_f32(gpu)?,
                    b: lora.b.to_f32(gpu)?,
                };
                modules.insert((l, Proj::ALL[p]), pair);
            }
        }
    }
    Ok(Adapter {
        config: config.clone(),
        modules,
    })
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
    let config_path = base.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    config["torch_dtype"] = json!("float32");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("writing {}", dir.join("config.json").display()))?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = base.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("copying {} into {}", src.display(), dir.display()))?;
        }
    }
    Ok(())
}

/// AdamW's moments of one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// Runs the training `config` describes on `gpu`.
pub fn train(config: &TrainConfig, gpu: &Gpu) -> Result<TrainSummary> {
    ensure!(
        config.resume.is_none(),
        "--resume is not implemented yet in this build"
    );
    prepare_output_dir(
        &config.output,
        config.overwrite,
        false,
        &config.resume_summary(),
    )?;
    let (model_dir, files) = inputs(config)?;
    let encoder = ChatEncoder::load(&model_dir)?;
    let (rows, counts) = filter_rows(encode_rows(&encoder, &files, config)?, config.overlong);
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
    let targets: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| next_token_targets(&r.ids, &r.labels_mask))
        .collect();

    let (model, adapter_config) = match &config.method {
        Method::Full => (Qwen2::load_f32(gpu, &model_dir)?, None),
        Method::Lora(lora) => {
            ensure!(
                lora.dropout == 0.0,
                "--lora-dropout {} is not supported: LoRA dropout is not implemented (use 0)",
                lora.dropout
            );
            let mut model = Qwen2::load(gpu, &model_dir)?;
            let adapter = match &config.init_adapter {
                Some(dir) => Adapter::load(dir, &model.config)?,
                None => new_adapter(&model, lora, config.seed)?,
            };
            model.apply_adapter(gpu, &adapter)?;
            let mut adapter_config = adapter.config.clone();
            adapter_config.base_model = Some(model_dir.display().to_string());
            (model, Some(adapter_config))
        }
    };
    let grads = Grads::new(gpu, &model)?;
    let params = grads.params(&model);
    let moments = match config.optimizer.kind {
        OptimizerKind::Adamw => params
            .iter()
            .map(|p| {
                Ok(Some(Moments {
                    m: Tensor::zeros(gpu, p.value.shape(), DType::F32)?,
                    v: Tensor::zeros(gpu, p.value.shape(), DType::F32)?,
                }))
            })
            .collect::<Result<Vec<_>>>()?,
        OptimizerKind::Sgd => params.iter().map(|_| None).collect(),
    };

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
    let total_steps = order.total_steps();
    let schedule = Schedule::new(
        config.scheduler,
        config.optimizer.lr,
        config.warmup,
        total_steps,
    )?;
    let mut metrics = MetricsWriter::create(config.output.join("metrics.jsonl"))?;
    let mut progress = Progress::new(config.progress, total_steps, 0, 0.0);
    progress.println(&format!(
        "training {} rows ({} truncated, {} dropped) for {total_steps} steps on {}",
        counts.kept,
        counts.truncated,
        counts.dropped_overlong + counts.dropped_unsupervised,
        gpu.describe()
    ));
    let norm_sq = Tensor::zeros(gpu, &[1], DType::F32)?;
    let start = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();

    while let Some(step) = order.next_step() {
        let step_start = Instant::now();
        let supervised: usize = step
            .micro_batches
            .iter()
            .flatten()
            .map(|&i| {
                targets[i]
                    .iter()
                    .filter(|&&t| t != crate::model::IGNORE)
                    .count()
            })
            .sum();
        let tokens: usize = step
            .micro_batches
            .iter()
            .flatten()
            .map(|&i| rows[i].len())
            .sum();
        grads.zero(gpu, &model);
        let mut loss_sum = 0.0;
        for micro in &step.micro_batches {
            let mb: Vec<(&[u32], &[u32])> = micro
                .iter()
                .map(|&i| (rows[i].ids.as_slice(), targets[i].as_slice()))
                .collect();
            loss_sum += model
                .forward_backward(gpu, &grads, &mb, 1.0 / supervised as f32)
                .with_context(|| format!("step {}", step.index + 1))?
                .sum;
        }
        let loss = loss_sum / supervised as f64;
        let grad_list: Vec<&Tensor> = params.iter().map(|p| p.grad).collect();
        let mut batch = gpu.batch();
        grad_norm_sq(&mut batch, &grad_list, &norm_sq)?;
        batch.submit();
        let grad_norm = (norm_sq.to_f32(gpu)?[0] as f64).sqrt();
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "step {}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite; \
                 training stopped before applying it (the weights and any checkpoint in {} are \
                 from the last good step). Try a lower --lr or --max-grad-norm",
                step.index + 1,
                config.output.display()
            );
        }

        let lr = schedule.lr(step.index);
        let clip = config.max_grad_norm.map(|max| (&norm_sq, max));
        let o = &config.optimizer;
        let mut batch = gpu.batch();
        for (p, moments) in params.iter().zip(&moments) {
            let wd = if p.decays() { o.weight_decay } else { 0.0 };
            match moments {
                Some(Moments { m, v }) => {
                    let hyper = AdamW {
                        lr,
                        beta1: o.beta1,
                        beta2: o.beta2,
                        eps: o.eps,
                        weight_decay: wd,
                        step: step.index as u32 + 1,
                    };
                    adamw_step(&mut batch, p.value, p.grad, m, v, &hyper, clip)?
                }
                None => sgd_step(&mut batch, p.value, p.grad, lr, wd, clip)?,
            }
        }
        batch.submit();
        gpu.wait()?;

        let m = StepMetrics {
            step: step.index + 1,
            epoch: step.epoch_progress,
            loss,
            lr,
            grad_norm,
            supervised_tokens: supervised as u64,
            tokens: tokens as u64,
            tokens_per_s: tokens as f64 / step_start.elapsed().as_secs_f64(),
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        metrics.write(&m)?;
        progress.step(&m);
        history.push(m);
    }
    progress.finish();

    match &adapter_config {
        Some(ac) => adapter_from_device(gpu, &model, ac)?.save(&config.output)?,
        None => save_full(gpu, &model, &grads, &model_dir, &config.output)?,
    }
    write_loss_svg(
        config.output.join("loss.svg"),
        &history,
        "wgtrain training loss",
    )?;
    Ok(TrainSummary {
        steps: history.len(),
        first_loss: history.first().map_or(f64::NAN, |m| m.loss),
        last_loss: history.last().map_or(f64::NAN, |m| m.loss),
        rows: counts,
        output: config.output.clone(),
    })
}
