//! The LLaMA-Factory dialect of `wgtrain train --config FILE.yaml`: its keys mapped onto
//! [`TrainSettings`], and its `dataset` names looked up in `dataset_dir/dataset_info.json`.
//!
//! Every LLaMA-Factory key wgtrain knows is either mapped to a setting, accepted with a warning
//! when it does not apply (`IGNORED_KEYS`), or accepted only with the value that means what
//! wgtrain does (`stage: sft`, `packing: false`, ...). Any other key is an error naming the file,
//! the line and the key: a silently ignored key could change the experiment. A key whose flag was
//! given on the command line is not read at all.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

use super::config::{lora_targets, AdapterKind, OptimizerKind};
use super::schedule::SchedulerKind;
use super::settings::{overriding_flag, TrainSettings};

/// LLaMA-Factory keys accepted without effect, and why.
pub const IGNORED_KEYS: &[(&str, &str)] = &[
    ("deepspeed", "wgtrain runs on one GPU without DeepSpeed"),
    ("ddp_timeout", "no distributed training"),
    ("ddp_find_unused_parameters", "no distributed training"),
    (
        "bf16",
        "frozen weights are bf16 and trained values f32 always",
    ),
    (
        "fp16",
        "frozen weights are bf16 and trained values f32 always",
    ),
    (
        "pure_bf16",
        "frozen weights are bf16 and trained values f32 always",
    ),
    ("tf32", "WGSL kernels accumulate in f32"),
    ("flash_attn", "attention is always flash-style"),
    ("enable_liger_kernel", "wgtrain's kernels are its own"),
    ("use_unsloth", "wgtrain's kernels are its own"),
    (
        "gradient_checkpointing",
        "layers are always recomputed in backward",
    ),
    (
        "disable_gradient_checkpointing",
        "layers are always recomputed in backward",
    ),
    (
        "trust_remote_code",
        "only Qwen2 is loaded, with no remote code",
    ),
    ("report_to", "metrics go to metrics.jsonl"),
    ("run_name", "metrics go to metrics.jsonl"),
    ("logging_dir", "metrics go to metrics.jsonl"),
    ("logging_steps", "every step is logged"),
    ("plot_loss", "loss.svg is always drawn"),
    (
        "overwrite_output_dir",
        "replacing a run must be asked for with --overwrite",
    ),
    ("overwrite_cache", "tokenized data is not cached"),
    ("preprocessing_num_workers", "tokenization runs in-process"),
    ("dataloader_num_workers", "tokenization runs in-process"),
    (
        "save_only_model",
        "checkpoints always hold what a resume needs",
    ),
    (
        "per_device_eval_batch_size",
        "no evaluation during training",
    ),
    ("eval_strategy", "no evaluation during training"),
    ("evaluation_strategy", "no evaluation during training"),
    ("eval_steps", "no evaluation during training"),
    ("do_eval", "no evaluation during training"),
];

/// A YAML value, for error messages.
fn show(v: &Yaml) -> String {
    serde_norway::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"))
}

fn as_f64(v: &Yaml) -> Option<f64> {
    // HfArgumentParser converts strings: PyYAML reads `1e-4` (no dot) as a string.
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn as_i64(v: &Yaml) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .or_else(|| as_f64(v).filter(|x| x.fract() == 0.0).map(|x| x as i64))
}

fn as_bool(v: &Yaml) -> Option<bool> {
    v.as_bool()
        .or_else(|| match v.as_str()?.to_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })
}

fn as_string(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The 1-based line on which a top-level `key:` appears in `text`.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
                || line
                    .strip_prefix(&format!("\"{key}\""))
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// What the keys read leave for after the whole file: the dataset to look up, and whether a
/// constant schedule has ruled out warmup.
#[derive(Default)]
struct Pending {
    dataset: Option<String>,
    dataset_dir: Option<String>,
    /// transformers' "constant" schedule ignores any warmup setting, before or after it.
    no_warmup: bool,
}

/// Reads `key` = `value` (found at `at`, "file:line") into `s`.
fn read_key(
    s: &mut TrainSettings,
    pending: &mut Pending,
    warnings: &mut Vec<String>,
    key: &str,
    value: &Yaml,
    at: &str,
) -> Result<()> {
    let bad = |expected: &str| anyhow!("{at}: {key} = {} must be {expected}", show(value));
    let f64_ = || as_f64(value).ok_or_else(|| bad("a number"));
    let count = || {
        as_i64(value)
            .filter(|&n| n >= 0)
            .map(|n| n as usize)
            .ok_or_else(|| bad("a non-negative integer"))
    };
    let string = || as_string(value).ok_or_else(|| bad("a string"));
    let flag = || as_bool(value).ok_or_else(|| bad("true or false"));
    let is_null = matches!(value, Yaml::Null);
    match key {
        "model_name_or_path" => s.model = Some(string()?.into()),
        "adapter_name_or_path" => s.init_adapter = Some(string()?.into()),
        "dataset" => pending.dataset = Some(string()?),
        "dataset_dir" => pending.dataset_dir = Some(string()?),
        "output_dir" => s.output = Some(string()?.into()),
        "resume_from_checkpoint" if !is_null => s.resume = Some(string()?.into()),
        "resume_from_checkpoint" => {}
        "finetuning_type" => {
            s.adapter = Some(match string()?.as_str() {
                "lora" => AdapterKind::Lora,
                "full" => AdapterKind::Full,
                _ => return Err(bad("lora or full (wgtrain has no freeze tuning)")),
            })
        }
        "lora_rank" => s.lora_rank = Some(count()?),
        "lora_alpha" if !is_null => s.lora_alpha = Some(f64_()?),
        "lora_alpha" => {}
        "lora_dropout" => s.lora_dropout = Some(f64_()?),
        "lora_target" => {
            s.lora_target = match value {
                Yaml::Sequence(items) => items
                    .iter()
                    .map(|item| as_string(item).ok_or_else(|| bad("names")))
                    .collect::<Result<_>>()?,
                _ => string()?.split(',').map(|t| t.trim().to_string()).collect(),
            };
            // Report a bad name here, where the file and line are known.
            lora_targets(&s.lora_target).map_err(|e| anyhow!("{at}: {e}"))?;
        }
        "optim" => {
            s.optimizer = Some(match string()?.as_str() {
                "adamw_torch" | "adamw_hf" | "adamw_torch_fused" | "adamw" => OptimizerKind::Adamw,
                "sgd" => OptimizerKind::Sgd,
                _ => return Err(bad("adamw_torch or sgd")),
            })
        }
        "learning_rate" => s.lr = Some(f64_()?),
        "adam_beta1" => s.beta1 = Some(f64_()?),
        "adam_beta2" => s.beta2 = Some(f64_()?),
        "adam_epsilon" => s.eps = Some(f64_()?),
        "weight_decay" => s.weight_decay = Some(f64_()?),
        "lr_scheduler_type" => match string()?.as_str() {
            // transformers' "constant" has no warmup; its "constant_with_warmup" is ours.
            "constant" => {
                s.scheduler = Some(SchedulerKind::Constant);
                (s.warmup_steps, s.warmup_ratio, pending.no_warmup) = (Some(0), None, true);
            }
            "constant_with_warmup" => s.scheduler = Some(SchedulerKind::Constant),
            name => {
                s.scheduler = Some(
                    name.parse()
                        .map_err(|_| bad("cosine, linear, constant or constant_with_warmup"))?,
                )
            }
        },
        "warmup_ratio" | "warmup_steps" if pending.no_warmup => {}
        "warmup_ratio" => s.warmup_ratio = Some(f64_()?),
        "warmup_steps" => s.warmup_steps = Some(count()?),
        "max_grad_norm" => s.max_grad_norm = Some(f64_()?),
        "per_device_train_batch_size" => s.batch_size = Some(count()?),
        "gradient_accumulation_steps" => s.grad_accum = Some(count()?),
        "num_train_epochs" => s.epochs = Some(f64_()?),
        // transformers' default -1 means "use num_train_epochs".
        "max_steps" => match as_i64(value) {
            Some(n) if n <= 0 => {}
            _ => s.max_steps = Some(count()?),
        },
        "cutoff_len" => s.max_len = Some(count()?),
        "max_samples" if !is_null => s.max_samples = Some(count()?),
        "max_samples" => {}
        "seed" => s.seed = Some(count()? as u64),
        "save_steps" => s.save_steps = Some(count()?),
        "save_total_limit" if !is_null => s.save_total_limit = Some(count()?),
        "save_total_limit" => {}
        "save_strategy" => match string()?.as_str() {
            "steps" => {}
            "no" => s.save_steps = Some(0),
            _ => return Err(bad("steps or no")),
        },
        "stage" if string()? != "sft" => {
            return Err(bad("sft (wgtrain does supervised fine-tuning)"))
        }
        "do_train" if !flag()? => return Err(bad("true")),
        "template" => {
            let name = string()?;
            if !["qwen", "qwen25", "qwen2_5", "chatml"].contains(&name.as_str()) {
                return Err(bad(
                    "qwen or chatml: wgtrain renders the checkpoint's own chat template",
                ));
            }
            warnings.push(format!(
                "{at}: template = {name}: wgtrain renders the checkpoint's own chat template"
            ));
        }
        "packing" | "neat_packing" | "train_on_prompt" | "mask_history" | "use_dora"
        | "use_rslora" | "pissa_init" | "streaming"
            if flag()? =>
        {
            return Err(bad("false: wgtrain does not implement it"))
        }
        "val_size" if f64_()? != 0.0 => {
            return Err(bad("0: wgtrain trains on every row and holds none out"))
        }
        "quantization_bit" if !is_null => {
            return Err(bad("null: wgtrain does not quantize the base model"))
        }
        "stage" | "do_train" | "packing" | "neat_packing" | "train_on_prompt" | "mask_history"
        | "use_dora" | "use_rslora" | "pissa_init" | "streaming" | "val_size"
        | "quantization_bit" => {}
        _ => match IGNORED_KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => warnings.push(format!("{at}: {key} ignored: {why}")),
            None => bail!(
                "{at}: unknown key {key:?}: wgtrain reads the LLaMA-Factory keys listed in \
                 docs/training.md"
            ),
        },
    }
    Ok(())
}

/// Reads a LLaMA-Factory training YAML into settings and warnings about keys without effect. A key
/// that one of `flags` (the command line) overrides is not read at all, so nothing in it is
/// resolved: with `--data`, the file's `dataset` is never looked up.
pub fn read_llama_factory_yaml(
    path: &Path,
    flags: &TrainSettings,
) -> Result<(TrainSettings, Vec<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Yaml = serde_norway::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid YAML: {e}", path.display()))?;
    let map = match doc {
        Yaml::Mapping(map) => map,
        Yaml::Null => Default::default(),
        _ => bail!(
            "{}: expected a mapping of LLaMA-Factory keys",
            path.display()
        ),
    };
    let mut s = TrainSettings::default();
    let mut warnings = Vec::new();
    let mut pending = Pending::default();
    for (key, value) in &map {
        let Some(key) = key.as_str() else {
            bail!("{}: key {} is not a string", path.display(), show(key));
        };
        let at = match key_line(&text, key) {
            Some(line) => format!("{}:{line}", path.display()),
            None => path.display().to_string(),
        };
        if let Some(flag) = overriding_flag(key, flags) {
            warnings.push(format!("{at}: {key} overridden by {flag}"));
            continue;
        }
        read_key(&mut s, &mut pending, &mut warnings, key, value, &at)?;
    }
    let Pending {
        dataset,
        dataset_dir,
        ..
    } = pending;
    if let Some(names) = dataset {
        let dir = PathBuf::from(dataset_dir.as_deref().unwrap_or("data"));
        s.data = resolve_datasets(&names, &dir).with_context(|| {
            let line = key_line(&text, "dataset").map_or(String::new(), |l| format!(":{l}"));
            format!("{}{line}: dataset = {names}", path.display())
        })?;
    } else if dataset_dir.is_some() {
        bail!("{}: dataset_dir is given but no dataset", path.display());
    }
    Ok((s, warnings))
}

/// LLaMA-Factory's `dataset` (comma-separated): each name is an entry of
/// `dataset_dir/dataset_info.json`, or else a path to a data file.
pub fn resolve_datasets(names: &str, dataset_dir: &Path) -> Result<Vec<PathBuf>> {
    let info_path = dataset_dir.join("dataset_info.json");
    let info: Option<Json> = if info_path.is_file() {
        let text = std::fs::read_to_string(&info_path)
            .with_context(|| format!("reading {}", info_path.display()))?;
        Some(
            serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", info_path.display(), e.line()))?,
        )
    } else {
        None
    };
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|name| {
            if let Some(entry) = info.as_ref().and_then(|info| info.get(name)) {
                return dataset_info_entry(name, entry, dataset_dir)
                    .with_context(|| format!("{}: entry {name:?}", info_path.display()));
            }
            let direct = PathBuf::from(name);
            ensure!(
                direct.is_file(),
                "{name:?} is neither an entry of {} nor a data file",
                info_path.display()
            );
            Ok(direct)
        })
        .collect()
}

/// The data file of one dataset_info.json entry, checking that its layout is one wgtrain reads
/// (sharegpt `conversations`/`from`/`value` or `messages`/`role`/`content` rows).
fn dataset_info_entry(name: &str, entry: &Json, dir: &Path) -> Result<PathBuf> {
    let Some(entry) = entry.as_object() else {
        bail!("must be an object");
    };
    for key in entry.keys() {
        ensure!(
            ["file_name", "formatting", "columns", "tags", "file_sha1"].contains(&key.as_str()),
            "key {key:?} is not supported (wgtrain reads local sharegpt files: file_name, \
             formatting, columns, tags)"
        );
    }
    let file = entry
        .get("file_name")
        .and_then(Json::as_str)
        .context("needs a \"file_name\" (wgtrain reads local files only)")?;
    let formatting = entry
        .get("formatting")
        .and_then(Json::as_str)
        .unwrap_or("alpaca");
    ensure!(
        formatting == "sharegpt",
        "formatting {formatting:?} is not supported: wgtrain reads sharegpt (or messages) rows"
    );
    let field = |group: &str, key: &str, default: &str| -> Result<String> {
        match entry.get(group).and_then(|g| g.get(key)) {
            None => Ok(default.to_string()),
            Some(Json::String(v)) => Ok(v.clone()),
            Some(v) => bail!("{group}.{key} = {v} must be a string"),
        }
    };
    if let Some(columns) = entry.get("columns").and_then(Json::as_object) {
        if let Some(other) = columns
            .keys()
            .find(|k| !["messages", "system"].contains(&k.as_str()))
        {
            bail!("columns.{other} is not supported (wgtrain reads messages and system)");
        }
    }
    let layout = (
        field("columns", "messages", "conversations")?,
        field("tags", "role_tag", "from")?,
        field("tags", "content_tag", "value")?,
    );
    let layout = (layout.0.as_str(), layout.1.as_str(), layout.2.as_str());
    ensure!(
        matches!(
            layout,
            ("conversations", "from", "value") | ("messages", "role", "content")
        ),
        "columns.messages / tags.role_tag / tags.content_tag = {layout:?}: wgtrain reads \
         conversations/from/value or messages/role/content; rename the fields in the file"
    );
    for (key, default, allowed) in [
        ("user_tag", "human", ["user", "human"]),
        ("assistant_tag", "gpt", ["assistant", "gpt"]),
        ("system_tag", "system", ["system", "system"]),
    ] {
        let tag = field("tags", key, default)?;
        ensure!(
            allowed.contains(&tag.as_str()),
            "tags.{key} = {tag:?}: wgtrain reads roles {}",
            allowed.join(" or ")
        );
    }
    let system = field("columns", "system", "system")?;
    ensure!(
        system == "system",
        "columns.system = {system:?}: wgtrain reads the system prompt from \"system\""
    );
    let path = dir.join(file);
    ensure!(
        path.is_file(),
        "dataset {name:?}: file {} does not exist",
        path.display()
    );
    Ok(path)
}
