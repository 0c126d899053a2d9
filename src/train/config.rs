//! A training run's checked settings: `TrainConfig::resolve` lays the flags over an optional
//! LLaMA-Factory YAML's values (both [`TrainSettings`], the table in [`super::settings`]), fills
//! in defaults (the paper's recipe) and validates. Relative paths in a YAML file are taken from the current directory, as
//! LLaMA-Factory does (its configs are run from the directory that holds `data/`).
//! The LLaMA-Factory dialect of the YAML file is [`super::llama_factory`].
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value as Json};

use super::batching::{Duration, Overlong};
use super::metrics::ProgressMode;
use super::schedule::{SchedulerKind, Warmup};
use super::settings::{label, label_of, TrainSettings};
use crate::model::{Adapter, AdapterConfig, Proj, Qwen2Config};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterKind {
    /// Train LoRA factors on the frozen bf16 model.
    Lora,
    /// Train every weight (f32 master copies).
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    Adamw,
    /// Plain SGD (no momentum), as torch.optim.SGD's defaults.
    Sgd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// The projections that get a LoRA, in [`Proj::ALL`]'s order (by default all seven: the
    /// paper's "all linear layers except lm_head", LLaMA-Factory's `lora_target: all`).
    pub targets: Vec<Proj>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    Lora(LoraSettings),
    Full,
}

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    #[default]
    Default,
    Yaml,
    Flag,
}

impl Origin {
    fn of<T>(flag: &Option<T>, yaml: &Option<T>) -> Origin {
        match (flag, yaml) {
            (Some(_), _) => Origin::Flag,
            (None, Some(_)) => Origin::Yaml,
            (None, None) => Origin::Default,
        }
    }
}

/// The origins of the LoRA settings an existing adapter also fixes (see
/// [`TrainConfig::with_adapter`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraOrigins {
    pub rank: Origin,
    pub alpha: Origin,
    pub targets: Origin,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// A run's settings, complete and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// The built-in demo (no --model and no --data): the trainer makes the tiny model and the
    /// synthetic data with `train::demo`.
    pub demo: bool,
    pub model: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub output: PathBuf,
    pub overwrite: bool,
    pub method: Method,
    /// Where the LoRA rank, alpha and targets came from.
    pub lora_origins: LoraOrigins,
    pub init_adapter: Option<PathBuf>,
    pub optimizer: OptimizerSettings,
    pub scheduler: SchedulerKind,
    pub warmup: Warmup,
    /// None: no clipping.
    pub max_grad_norm: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub duration: Duration,
    pub max_len: usize,
    pub overlong: Overlong,
    pub max_samples: Option<usize>,
    pub seed: u64,
    pub shuffle: bool,
    /// None: a checkpoint only at the end (and on Ctrl-C).
    pub save_steps: Option<usize>,
    /// None: every checkpoint is kept.
    pub save_total_limit: Option<usize>,
    pub resume: Option<PathBuf>,
    pub progress: ProgressMode,
    /// Keys of the YAML file accepted without effect, to show the user.
    pub warnings: Vec<String>,
}

/// Where the demo writes its run unless --output is given.
pub const DEMO_OUTPUT: &str = "wgtrain-demo";

impl TrainConfig {
    /// `flags` over the YAML file's settings (if any), then defaults; `warnings` come from the
    /// file.
    pub fn resolve(
        flags: TrainSettings,
        file: Option<(TrainSettings, Vec<String>)>,
    ) -> Result<TrainConfig> {
        let (base, mut warnings) = file.unwrap_or_default();
        let non_empty = |targets: &Vec<String>| Some(()).filter(|_| !targets.is_empty());
        let lora_origins = LoraOrigins {
            rank: Origin::of(&flags.lora_rank, &base.lora_rank),
            alpha: Origin::of(&flags.lora_alpha, &base.lora_alpha),
            targets: Origin::of(
                &non_empty(&flags.lora_target),
                &non_empty(&base.lora_target),
            ),
        };
        let s = flags.over(base);
        let demo = s.model.is_none() && s.data.is_empty();
        ensure!(
            demo || (s.model.is_some() && !s.data.is_empty()),
            "{} and {} go together; give neither for the built-in demo",
            label!(model),
            label!(data)
        );
        if let Some(model) = &s.model {
            ensure!(
                model.is_dir(),
                "model {} is not a local directory (wgtrain does not download models: pass a \
                 Hugging Face checkpoint directory)",
                model.display()
            );
        }
        let output = match (s.output.clone(), demo) {
            (Some(output), _) => output,
            (None, true) => PathBuf::from(DEMO_OUTPUT),
            (None, false) => bail!("{} is required", label!(output)),
        };

        let kind = s.adapter.unwrap_or(AdapterKind::Lora);
        let method = resolve_method(&s, kind, &mut warnings)?;

        let optimizer = resolve_optimizer(&s, kind)?;

        let (warmup, max_grad_norm) = resolve_warmup_and_clipping(&s)?;
        let batch_size = s.batch_size.unwrap_or(1);
        ensure!(batch_size > 0, "{} must be positive", label!(batch_size));
        let grad_accum = s.grad_accum.unwrap_or(1);
        ensure!(grad_accum > 0, "{} must be positive", label!(grad_accum));
        let duration = resolve_duration(&s)?;
        let max_len = s.max_len.unwrap_or(16384);
        ensure!(
            max_len >= 2,
            "{} must be at least 2 tokens (one to predict from, one to predict)",
            label!(max_len)
        );
        if let Some(n) = s.max_samples {
            ensure!(n > 0, "{} must be positive", label!(max_samples));
        }
        Ok(TrainConfig {
            demo,
            model: s.model,
            data: s.data,
            output,
            overwrite: s.overwrite,
            method,
            lora_origins,
            init_adapter: s.init_adapter,
            optimizer,
            scheduler: s.scheduler.unwrap_or(SchedulerKind::Cosine),
            warmup,
            max_grad_norm,
            batch_size,
            grad_accum,
            duration,
            max_len,
            overlong: s.overlong.unwrap_or(Overlong::Truncate),
            max_samples: s.max_samples,
            seed: s.seed.unwrap_or(42),
            shuffle: !s.no_shuffle,
            save_steps: Some(s.save_steps.unwrap_or(500)).filter(|&n| n > 0),
            save_total_limit: s.save_total_limit.filter(|&n| n > 0),
            resume: s.resume,
            progress: s.progress.unwrap_or(ProgressMode::Auto),
            warnings,
        })
    }

    /// This run with the rank, alpha and targets of the existing adapter in `dir` (the
    /// `--init-adapter`, or the checkpoint a resume continues), whose factors fix them; `model` is
    /// the base model's config (it resolves the adapter's target patterns). A value the command line
    /// gave that differs is an error; one from the YAML file gives a warning (returned) naming the
    /// setting and both values; a default is replaced silently.
    pub fn with_adapter(
        &self,
        dir: &Path,
        model: &Qwen2Config,
    ) -> Result<(TrainConfig, Vec<String>)> {
        let Method::Lora(lora) = &self.method else {
            return Ok((self.clone(), Vec::new()));
        };
        let config_path = dir.join(crate::model::adapter::CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading the adapter config {}", config_path.display()))?;
        let adapter =
            AdapterConfig::parse(&text).with_context(|| format!("in {}", config_path.display()))?;
        let targeted = Adapter::targets(&adapter, model)
            .with_context(|| format!("in {}", config_path.display()))?;
        let targets: Vec<Proj> = Proj::ALL
            .into_iter()
            .filter(|&p| targeted.iter().any(|&(_, q)| q == p))
            .collect();
        let adopted = LoraSettings {
            rank: adapter.r,
            alpha: adapter.lora_alpha,
            dropout: lora.dropout,
            targets,
        };
        let o = &self.lora_origins;
        let mut warnings = Vec::new();
        for (flag, key, origin, ours, theirs) in [
            (
                "--lora-rank",
                "lora_rank",
                o.rank,
                lora.rank.to_string(),
                adopted.rank.to_string(),
            ),
            (
                "--lora-alpha",
                "lora_alpha",
                o.alpha,
                lora.alpha.to_string(),
                adopted.alpha.to_string(),
            ),
            (
                "--lora-target",
                "lora_target",
                o.targets,
                module_names(&lora.targets).join(","),
                module_names(&adopted.targets).join(","),
            ),
        ] {
            if ours == theirs {
                continue;
            }
            match origin {
                Origin::Flag => bail!(
                    "{flag} {ours} conflicts with the adapter {} ({key} {theirs} in {}): its factors \
                     fix it; drop {flag} or give {theirs}",
                    dir.display(),
                    crate::model::adapter::CONFIG_FILE
                ),
                Origin::Yaml => warnings.push(format!(
                    "{key} {ours} (YAML) differs from the adapter {}'s {theirs}: training with \
                     {theirs}",
                    dir.display()
                )),
                Origin::Default => {}
            }
        }
        let mut config = self.clone();
        config.method = Method::Lora(adopted);
        Ok((config, warnings))
    }

    /// The settings that decide the sequence of steps, for `TrainState` (a resume under other
    /// values would not continue the same run). Paths are left out so a moved run still resumes;
    /// the data itself is checked by its fingerprint.
    pub fn resume_summary(&self) -> Json {
        let method = match &self.method {
            Method::Full => json!({"kind": "full"}),
            Method::Lora(l) => json!({
                "kind": "lora", "rank": l.rank, "alpha": l.alpha, "dropout": l.dropout,
                "targets": module_names(&l.targets),
            }),
        };
        let o = &self.optimizer;
        json!({
            "demo": self.demo,
            "method": method,
            "optimizer": format!("{:?}", o.kind).to_lowercase(),
            "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
            "weight_decay": o.weight_decay,
            "scheduler": self.scheduler.name(),
            "warmup": match self.warmup {
                Warmup::Ratio(r) => json!({"ratio": r}),
                Warmup::Steps(n) => json!({"steps": n}),
            },
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "duration": match self.duration {
                Duration::Epochs(e) => json!({"epochs": e}),
                Duration::Steps(n) => json!({"max_steps": n}),
            },
            "max_len": self.max_len,
            "overlong": self.overlong,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        })
    }
}

/// LoRA (rank, alpha, dropout, targets, checked) or full fine-tuning, which warns of LoRA-only
/// settings given.
fn resolve_method(
    s: &TrainSettings,
    kind: AdapterKind,
    warnings: &mut Vec<String>,
) -> Result<Method> {
    Ok(match kind {
        AdapterKind::Full => {
            ensure!(
                s.init_adapter.is_none(),
                "{} needs --adapter lora",
                label!(init_adapter)
            );
            let lora_only: Vec<String> = ["lora_rank", "lora_alpha", "lora_dropout", "lora_target"]
                .into_iter()
                .filter(|&field| s.given(field))
                .map(label_of)
                .collect();
            if !lora_only.is_empty() {
                warnings.push(format!(
                    "{} ignored: full fine-tuning trains every weight (--adapter lora uses them)",
                    lora_only.join(", ")
                ));
            }
            Method::Full
        }
        AdapterKind::Lora => {
            let rank = s.lora_rank.unwrap_or(64);
            ensure!(rank > 0, "{} must be positive", label!(lora_rank));
            let alpha = s.lora_alpha.unwrap_or(2.0 * rank as f64);
            ensure!(
                alpha.is_finite() && alpha > 0.0,
                "{} must be positive, got {alpha}",
                label!(lora_alpha)
            );
            let dropout = s.lora_dropout.unwrap_or(0.0);
            ensure!(
                (0.0..1.0).contains(&dropout),
                "{} must lie in [0, 1), got {dropout}",
                label!(lora_dropout)
            );
            Method::Lora(LoraSettings {
                rank,
                alpha,
                dropout,
                targets: lora_targets(&s.lora_target)?,
            })
        }
    })
}

/// The optimizer and its hyperparameters, checked (LoRA's default learning rate is 1e-4, full
/// fine-tuning's 1e-5).
fn resolve_optimizer(s: &TrainSettings, kind: AdapterKind) -> Result<OptimizerSettings> {
    let default_lr = match kind {
        AdapterKind::Lora => 1e-4,
        AdapterKind::Full => 1e-5,
    };
    let optimizer = OptimizerSettings {
        kind: s.optimizer.unwrap_or(OptimizerKind::Adamw),
        lr: s.lr.unwrap_or(default_lr),
        beta1: s.beta1.unwrap_or(0.9),
        beta2: s.beta2.unwrap_or(0.999),
        eps: s.eps.unwrap_or(1e-8),
        weight_decay: s.weight_decay.unwrap_or(0.0),
    };
    let o = &optimizer;
    ensure!(
        o.lr.is_finite() && o.lr > 0.0,
        "{} must be positive, got {}",
        label!(lr),
        o.lr
    );
    for (name, beta) in [(label!(beta1), o.beta1), (label!(beta2), o.beta2)] {
        ensure!(
            (0.0..1.0).contains(&beta),
            "{name} must lie in [0, 1), got {beta}"
        );
    }
    ensure!(
        o.eps.is_finite() && o.eps > 0.0,
        "{} must be positive, got {}",
        label!(eps),
        o.eps
    );
    ensure!(
        o.weight_decay.is_finite() && o.weight_decay >= 0.0,
        "{} must be at least 0, got {}",
        label!(weight_decay),
        o.weight_decay
    );
    Ok(optimizer)
}

/// The warmup (transformers: a positive warmup_steps wins over warmup_ratio) and the gradient
/// clipping norm (0 disables).
fn resolve_warmup_and_clipping(s: &TrainSettings) -> Result<(Warmup, Option<f64>)> {
    let warmup = match (s.warmup_steps, s.warmup_ratio) {
        (Some(steps), None) => Warmup::Steps(steps),
        (Some(steps), Some(_)) if steps > 0 => Warmup::Steps(steps),
        (_, Some(ratio)) => {
            ensure!(
                (0.0..=1.0).contains(&ratio),
                "{} must lie in [0, 1], got {ratio}",
                label!(warmup_ratio)
            );
            Warmup::Ratio(ratio)
        }
        (None, None) => Warmup::Ratio(0.1),
    };
    let max_grad_norm = match s.max_grad_norm.unwrap_or(1.0) {
        0.0 => None,
        n if n.is_finite() && n > 0.0 => Some(n),
        n => bail!(
            "{} must be at least 0 (0 disables), got {n}",
            label!(max_grad_norm)
        ),
    };
    Ok((warmup, max_grad_norm))
}

/// How long the run trains (transformers: max_steps wins over num_train_epochs).
fn resolve_duration(s: &TrainSettings) -> Result<Duration> {
    Ok(match (s.max_steps, s.epochs) {
        (Some(steps), _) => {
            ensure!(steps > 0, "{} must be positive", label!(max_steps));
            Duration::Steps(steps)
        }
        (None, epochs) => {
            let epochs = epochs.unwrap_or(3.0);
            ensure!(
                epochs.is_finite() && epochs > 0.0,
                "{} must be positive, got {epochs}",
                label!(epochs)
            );
            Duration::Epochs(epochs)
        }
    })
}

/// The projections `--lora-target` names: `all` (or nothing) for all seven, else module names
/// (`q_proj`, ...), read once here.
pub(super) fn lora_targets(given: &[String]) -> Result<Vec<Proj>> {
    let names: Vec<&str> = given
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() || names.iter().any(|&n| n == "all" || n == "all-linear") {
        return Ok(Proj::ALL.to_vec());
    }
    if let Some(bad) = names
        .iter()
        .find(|&&n| !Proj::ALL.iter().any(|p| p.module() == n))
    {
        bail!(
            "{} {bad:?} is not a projection of a Qwen2 layer; choose from {} or all",
            label!(lora_target),
            module_names(&Proj::ALL).join(", ")
        );
    }
    Ok(Proj::ALL
        .into_iter()
        .filter(|p| names.contains(&p.module()))
        .collect())
}

/// PEFT's module names of `targets` (`q_proj`, ...): how targets are written in adapter configs,
/// run summaries and messages.
pub fn module_names(targets: &[Proj]) -> Vec<&'static str> {
    targets.iter().map(|p| p.module()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::llama_factory::{read_llama_factory_yaml, resolve_datasets};
    use crate::train::settings::SETTINGS;

    fn yaml(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("train.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn data_dir(dir: &Path) -> PathBuf {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("sky.json"), "[]").unwrap();
        std::fs::write(
            data.join("dataset_info.json"),
            r#"{"Sky-T1-HQ": {"file_name": "sky.json", "formatting": "sharegpt",
                "columns": {"messages": "conversations", "system": "system"},
                "tags": {"role_tag": "from", "content_tag": "value",
                         "user_tag": "user", "assistant_tag": "assistant"}},
               "alpaca_set": {"file_name": "sky.json"},
               "renamed": {"file_name": "sky.json", "formatting": "sharegpt",
                           "tags": {"role_tag": "speaker"}}}"#,
        )
        .unwrap();
        data
    }

    #[test]
    fn the_documented_paper_recipe_maps_onto_settings() {
        let doc = include_str!("../../docs/training.md");
        let recipe = doc
            .split("```yaml\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let data = data_dir(tmp.path());
        let text = recipe.replace(
            "dataset_dir: data\n",
            &format!("dataset_dir: {}\n", data.display()),
        );
        let path = yaml(tmp.path(), &text);
        let (settings, warnings) =
            read_llama_factory_yaml(&path, &TrainSettings::default()).unwrap();
        assert_eq!(settings.data, [data.join("sky.json")]);
        let line = recipe.lines().position(|l| l.starts_with("bf16:")).unwrap() + 1;
        let bf16 = format!("train.yaml:{line}: bf16 ignored");
        assert!(warnings.iter().any(|w| w.contains(&bf16)), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("deepspeed ignored")));
        assert!(warnings
            .iter()
            .any(|w| w.contains("overwrite_output_dir ignored")));
        assert!(!settings.overwrite);

        // Flags override the file (here the model, which must be a local directory).
        let model = tmp.path().join("qwen");
        std::fs::create_dir(&model).unwrap();
        let flags = TrainSettings {
            model: Some(model),
            ..TrainSettings::default()
        };
        let c = TrainConfig::resolve(flags, Some((settings, warnings))).unwrap();
        assert_eq!(c.optimizer.lr, 1e-4);
        assert_eq!(
            c.method,
            Method::Lora(LoraSettings {
                rank: 64,
                alpha: 128.0,
                dropout: 0.0,
                targets: Proj::ALL.to_vec(),
            })
        );
        assert_eq!((c.batch_size, c.grad_accum), (1, 96));
        assert_eq!(c.duration, Duration::Epochs(3.0));
        assert_eq!(c.warmup, Warmup::Ratio(0.1));
        assert_eq!(c.scheduler, SchedulerKind::Cosine);
        assert_eq!((c.max_len, c.save_steps), (16384, Some(200)));
        assert_eq!(c.max_grad_norm, Some(1.0));
        assert_eq!(c.output, PathBuf::from("saves/Sky-T1-32B-lora"));
        assert!(!c.demo && c.shuffle && !c.warnings.is_empty());
    }

    /// Every LLaMA-Factory key of the settings table is read (a value of the wrong kind is
    /// refused by name, not as an unknown key).
    #[test]
    fn every_yaml_key_of_the_settings_table_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        for key in SETTINGS.iter().flat_map(|s| s.yaml.iter()) {
            let path = yaml(tmp.path(), &format!("{key}: [[1]]\n"));
            let err = read_llama_factory_yaml(&path, &TrainSettings::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{key} = ")) && !err.contains("unknown key"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_line_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let path = yaml(tmp.path(), "learning_rate: 1e-4\nlora_rnak: 8\n");
        let err = read_llama_factory_yaml(&path, &TrainSettings::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.yaml:2") && err.contains("lora_rnak"),
            "{err}"
        );
        for (text, needle) in [
            ("learning_rate: fast\n", "learning_rate"),
            ("stage: dpo\n", "sft"),
            ("packing: true\n", "packing"),
            ("finetuning_type: freeze\n", "freeze"),
            ("lora_target: q_proj,lm_head\n", "lm_head"),
            ("template: llama3\n", "template"),
            ("val_size: 0.1\n", "val_size"),
            ("- a\n- b\n", "mapping"),
            ("a: [\n", "invalid YAML"),
        ] {
            let path = yaml(tmp.path(), text);
            let err = format!(
                "{:#}",
                read_llama_factory_yaml(&path, &TrainSettings::default()).unwrap_err()
            );
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn yaml_value_conventions_of_hf_argument_parser() {
        let tmp = tempfile::tempdir().unwrap();
        // PyYAML reads 1e-4 as a string; max_steps -1 means unset; constant has no warmup.
        let path = yaml(
            tmp.path(),
            "learning_rate: '1e-4'\nmax_steps: -1\nnum_train_epochs: 2\n\
             lr_scheduler_type: constant\nwarmup_ratio: 0.1\nlora_target: [q_proj, v_proj]\n\
             save_strategy: 'no'\nsave_total_limit: 3\n",
        );
        let (s, _) = read_llama_factory_yaml(&path, &TrainSettings::default()).unwrap();
        assert_eq!(s.save_total_limit, Some(3));
        assert_eq!(s.lr, Some(1e-4));
        assert_eq!((s.max_steps, s.epochs), (None, Some(2.0)));
        assert_eq!((s.warmup_steps, s.warmup_ratio), (Some(0), None));
        assert_eq!(s.save_steps, Some(0));
        let c = TrainConfig::resolve(TrainSettings::default(), Some((s, vec![]))).unwrap();
        assert_eq!(c.warmup, Warmup::Steps(0));
        assert_eq!(c.save_steps, None);
        let Method::Lora(lora) = c.method else {
            panic!("lora expected")
        };
        assert_eq!(lora.targets, [Proj::Q, Proj::V]);
    }

    #[test]
    fn datasets_from_dataset_info_or_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let data = data_dir(tmp.path());
        let direct = data.join("sky.json");
        let files = resolve_datasets(&format!("Sky-T1-HQ, {}", direct.display()), &data).unwrap();
        assert_eq!(files, [direct.clone(), direct]);
        for (name, needle) in [
            ("alpaca_set", "alpaca"),
            ("renamed", "speaker"),
            ("missing", "neither"),
        ] {
            let err = format!("{:#}", resolve_datasets(name, &data).unwrap_err());
            assert!(err.contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn lora_settings_under_full_finetuning_are_reported() {
        let s = TrainSettings {
            adapter: Some(AdapterKind::Full),
            lora_dropout: Some(0.1),
            lora_target: vec!["q_proj".into()],
            ..TrainSettings::default()
        };
        let c = TrainConfig::resolve(s, None).unwrap();
        assert_eq!(c.method, Method::Full);
        assert!(
            c.warnings.iter().any(|w| w.contains("--lora-dropout")
                && w.contains("--lora-target")
                && !w.contains("--lora-rank")),
            "{:?}",
            c.warnings
        );
    }

    /// The defaults `--help` and the docs show (the settings table) are the ones resolved.
    #[test]
    fn the_settings_table_shows_the_resolved_defaults() {
        let c = TrainConfig::resolve(TrainSettings::default(), None).unwrap();
        let Method::Lora(lora) = &c.method else {
            panic!("LoRA is the default")
        };
        let o = &c.optimizer;
        let resolved = [
            ("adapter", "lora".to_string()),
            ("lora_rank", lora.rank.to_string()),
            ("lora_dropout", lora.dropout.to_string()),
            ("optimizer", format!("{:?}", o.kind).to_lowercase()),
            ("beta1", o.beta1.to_string()),
            ("beta2", o.beta2.to_string()),
            ("eps", format!("{:e}", o.eps)),
            ("weight_decay", o.weight_decay.to_string()),
            ("scheduler", c.scheduler.name().to_string()),
            ("warmup_ratio", format!("{:?}", c.warmup)),
            ("max_grad_norm", format!("{:?}", c.max_grad_norm.unwrap())),
            ("batch_size", c.batch_size.to_string()),
            ("grad_accum", c.grad_accum.to_string()),
            ("epochs", format!("{:?}", c.duration).replace(".0)", ")")),
            ("max_len", c.max_len.to_string()),
            ("overlong", format!("{:?}", c.overlong).to_lowercase()),
            ("seed", c.seed.to_string()),
            ("save_steps", c.save_steps.unwrap().to_string()),
            ("progress", format!("{:?}", c.progress).to_lowercase()),
        ];
        for (field, value) in resolved {
            let shown = SETTINGS.iter().find(|s| s.field == field).unwrap().default;
            let shown = shown.trim_matches('`');
            assert!(
                value == shown || value.contains(&format!("({shown})")),
                "{field}: the table shows {shown}, resolve gives {value}"
            );
        }
        assert_eq!(lora.alpha, 2.0 * lora.rank as f64, "2 × rank");
    }

    #[test]
    fn defaults_demo_and_validation() {
        let c = TrainConfig::resolve(TrainSettings::default(), None).unwrap();
        assert!(c.demo);
        assert_eq!(c.output, PathBuf::from(DEMO_OUTPUT));
        assert_eq!(c.optimizer.lr, 1e-4);
        assert_eq!(c.save_steps, Some(500));
        let full = TrainSettings {
            adapter: Some(AdapterKind::Full),
            ..TrainSettings::default()
        };
        let c = TrainConfig::resolve(full, None).unwrap();
        assert_eq!((c.method, c.optimizer.lr), (Method::Full, 1e-5));

        let bad = |s: TrainSettings, needle: &str| {
            let err = TrainConfig::resolve(s, None).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        let d = TrainSettings::default;
        bad(
            TrainSettings {
                lr: Some(0.0),
                ..d()
            },
            "--lr",
        );
        bad(
            TrainSettings {
                lora_rank: Some(0),
                ..d()
            },
            "--lora-rank",
        );
        bad(
            TrainSettings {
                beta2: Some(1.0),
                ..d()
            },
            "--beta2",
        );
        bad(
            TrainSettings {
                max_grad_norm: Some(-1.0),
                ..d()
            },
            "--max-grad-norm",
        );
        bad(
            TrainSettings {
                warmup_ratio: Some(2.0),
                ..d()
            },
            "--warmup-ratio",
        );
        bad(
            TrainSettings {
                max_len: Some(1),
                ..d()
            },
            "--max-len",
        );
        bad(
            TrainSettings {
                epochs: Some(0.0),
                ..d()
            },
            "--epochs",
        );
        bad(
            TrainSettings {
                lora_dropout: Some(1.0),
                ..d()
            },
            "--lora-dropout",
        );
        bad(
            TrainSettings {
                data: vec!["x.json".into()],
                ..d()
            },
            "go together",
        );
        let missing_model = TrainSettings {
            model: Some("Qwen/Qwen2.5-32B-Instruct".into()),
            data: vec!["x.json".into()],
            ..d()
        };
        bad(missing_model, "does not download");
        let no_clip = TrainSettings {
            max_grad_norm: Some(0.0),
            ..d()
        };
        assert_eq!(
            TrainConfig::resolve(no_clip, None).unwrap().max_grad_norm,
            None
        );
    }

    #[test]
    fn warmup_and_length_pairs_override_together() {
        let file = TrainSettings {
            warmup_ratio: Some(0.1),
            max_steps: Some(100),
            ..TrainSettings::default()
        };
        let flags = TrainSettings {
            warmup_steps: Some(5),
            epochs: Some(1.0),
            ..TrainSettings::default()
        };
        let c = TrainConfig::resolve(flags, Some((file, vec![]))).unwrap();
        assert_eq!(c.warmup, Warmup::Steps(5));
        assert_eq!(c.duration, Duration::Epochs(1.0));
        // Within one source, a positive warmup_steps wins as in transformers.
        let both = TrainSettings {
            warmup_ratio: Some(0.2),
            warmup_steps: Some(0),
            ..TrainSettings::default()
        };
        assert_eq!(
            TrainConfig::resolve(both, None).unwrap().warmup,
            Warmup::Ratio(0.2)
        );
    }

    #[test]
    fn resume_summary_changes_with_settings_that_change_steps() {
        let a = TrainConfig::resolve(TrainSettings::default(), None).unwrap();
        let b = TrainConfig::resolve(
            TrainSettings {
                grad_accum: Some(4),
                ..TrainSettings::default()
            },
            None,
        )
        .unwrap();
        assert_ne!(a.resume_summary(), b.resume_summary());
        assert_eq!(a.resume_summary()["method"]["rank"], 64);
    }
}
