//! Every setting of `wgtrain train`, in one table (the [`settings!`] call below). A row gives the
//! field and its type, the flag's value name, the LLaMA-Factory keys that set it, the default as
//! `--help` and the docs show it, and what it means. From the table come:
//! - [`TrainSettings`], the clap flags: each optional, so that a YAML value applies unless the
//!   flag is given, with `--help` text made of the meaning and the default;
//! - [`TrainSettings::over`], the flags laid over a file's values (pairs such as warmup ratio /
//!   steps are replaced together);
//! - which flag overrides which YAML key ([`overriding_flag`]) and the names in error messages
//!   ([`label!`]: `--lora-rank (lora_rank)`);
//! - the settings table of docs/training.md ([`markdown_table`]; a test checks the file holds it).
//!
//! Reading each YAML key's value is the LLaMA-Factory dialect's ([`super::llama_factory`]);
//! defaults that follow from other settings, and validation, are `TrainConfig::resolve`'s.
use std::path::PathBuf;

use super::batching::Overlong;
use super::config::{AdapterKind, OptimizerKind};
use super::metrics::ProgressMode;
use super::schedule::SchedulerKind;

/// One row of the table.
#[derive(Debug)]
pub struct Setting {
    pub field: &'static str,
    /// The flag's value as the docs show it (`N`, `DIR`, `lora|full`); empty for a switch.
    pub value: &'static str,
    /// The LLaMA-Factory keys that set it.
    pub yaml: &'static [&'static str],
    /// The setting given together with this one (warmup ratio or steps, epochs or max steps):
    /// a flag for either replaces the file's values of both.
    pub pair: Option<&'static str>,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// How a value counts as given and gives way: an option when set, a list when not empty, a
/// switch when on.
trait Given: Sized {
    fn given(&self) -> bool;

    /// `self` if given, else `base`.
    fn or(self, base: Self) -> Self {
        if self.given() {
            self
        } else {
            base
        }
    }
}

impl<T> Given for Option<T> {
    fn given(&self) -> bool {
        self.is_some()
    }
}

impl<T> Given for Vec<T> {
    fn given(&self) -> bool {
        !self.is_empty()
    }
}

impl Given for bool {
    fn given(&self) -> bool {
        *self
    }
}

/// `--help` text: the meaning, capitalised, and the default where there is one.
fn help(meaning: &str, default: &str) -> String {
    let mut text = meaning[..1].to_uppercase() + &meaning[1..];
    if !default.is_empty() {
        text += &format!(" [default: {}]", default.replace('`', ""));
    }
    text
}

/// The flag's value name in `--help` (none for a switch).
fn value_name(value: &'static str) -> Option<&'static str> {
    Some(value).filter(|v| !v.is_empty())
}

macro_rules! settings {
    ($(
        $(#[$arg:meta])*
        $field:ident: $ty:ty, value $value:literal, yaml [$($yaml:literal),*]
            $(, pair $pair:ident)?, default $default:literal, meaning $meaning:literal;
    )*) => {
        /// Every setting of a run, each optional: what the command line or a YAML file gave.
        #[derive(clap::Args, Clone, Debug, Default, PartialEq)]
        pub struct TrainSettings {
            $(
                #[arg(long, value_name = value_name($value), help = help($meaning, $default))]
                $(#[$arg])*
                pub $field: $ty,
            )*
        }

        /// The table's rows, in the order of `--help`.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            field: stringify!($field),
            value: $value,
            yaml: &[$($yaml),*],
            pair: settings!(@pair $($pair)?),
            default: $default,
            meaning: $meaning,
        }),*];

        impl TrainSettings {
            /// Whether the setting `field` (a row of [`SETTINGS`]) is given.
            pub fn given(&self, field: &str) -> bool {
                match field {
                    $(stringify!($field) => Given::given(&self.$field),)*
                    _ => false,
                }
            }

            /// Replaces this value of `field` with `from`'s.
            fn take(&mut self, field: &str, from: &TrainSettings) {
                match field {
                    $(stringify!($field) => self.$field = from.$field.clone(),)*
                    _ => {}
                }
            }

            /// These settings where given, `base`'s elsewhere; a pair (warmup ratio or steps,
            /// epochs or max steps) comes whole from whichever gives either half, so
            /// `--warmup-steps` overrides a file's `warmup_ratio`.
            pub fn over(self, base: TrainSettings) -> TrainSettings {
                let mut merged = TrainSettings {
                    $($field: Given::or(self.$field.clone(), base.$field.clone()),)*
                };
                for s in SETTINGS {
                    if let Some(pair) = s.pair {
                        let whole = self.given(s.field) || self.given(pair);
                        merged.take(s.field, if whole { &self } else { &base });
                    }
                }
                merged
            }
        }
    };
    (@pair) => { None };
    (@pair $pair:ident) => { Some(stringify!($pair)) };
}

settings! {
    model: Option<PathBuf>, value "DIR", yaml ["model_name_or_path"], default "demo",
        meaning "Hugging Face checkpoint directory (config.json, safetensors, tokenizer); without \
                 --model and --data the built-in demo runs (tiny model, synthetic data)";
    data: Vec<PathBuf>, value "FILE", yaml ["dataset", "dataset_dir"], default "demo",
        meaning "dataset file (sharegpt or messages rows, JSON array or JSONL), repeatable; in \
                 YAML, `dataset` names looked up in `dataset_dir` (default `data`)";
    output: Option<PathBuf>, value "DIR", yaml ["output_dir"],
        default "required; `wgtrain-demo` for the demo",
        meaning "run directory: metrics.jsonl, loss.svg, checkpoints, the trained adapter or \
                 weights";
    overwrite: bool, value "", yaml [], default "",
        meaning "replace an earlier wgtrain run in --output";
    #[arg(value_enum)]
    adapter: Option<AdapterKind>, value "lora|full", yaml ["finetuning_type"], default "`lora`",
        meaning "what to train: LoRA factors on the frozen bf16 model, or every weight";
    lora_rank: Option<usize>, value "N", yaml ["lora_rank"], default "64",
        meaning "LoRA rank, at most the smaller side of every targeted projection";
    lora_alpha: Option<f64>, value "X", yaml ["lora_alpha"], default "2 × rank",
        meaning "LoRA alpha: the update is scaled by alpha / rank";
    lora_dropout: Option<f64>, value "P", yaml ["lora_dropout"], default "0",
        meaning "LoRA dropout probability, on the adapter's input as PEFT";
    #[arg(value_delimiter = ',')]
    lora_target: Vec<String>, value "a,b", yaml ["lora_target"],
        default "`all` (the 7 projections)",
        meaning "projections that get LoRA factors (`q_proj`, ...), comma-separated, or all";
    init_adapter: Option<PathBuf>, value "DIR", yaml ["adapter_name_or_path"], default "",
        meaning "PEFT adapter to start LoRA training from; its rank, alpha and targets are the \
                 run's";
    #[arg(value_enum)]
    optimizer: Option<OptimizerKind>, value "adamw|sgd", yaml ["optim"], default "`adamw`",
        meaning "optimizer; YAML `adamw_torch`, `adamw_hf`, `adamw_torch_fused` or `sgd`";
    lr: Option<f64>, value "X", yaml ["learning_rate"], default "1e-4 LoRA, 1e-5 full",
        meaning "peak learning rate";
    beta1: Option<f64>, value "X", yaml ["adam_beta1"], default "0.9", meaning "AdamW beta1";
    beta2: Option<f64>, value "X", yaml ["adam_beta2"], default "0.999", meaning "AdamW beta2";
    eps: Option<f64>, value "X", yaml ["adam_epsilon"], default "1e-8",
        meaning "AdamW epsilon";
    weight_decay: Option<f64>, value "X", yaml ["weight_decay"], default "0",
        meaning "weight decay, decoupled (AdamW) or added to the gradient (SGD)";
    #[arg(value_enum)]
    scheduler: Option<SchedulerKind>, value "cosine|linear|constant", yaml ["lr_scheduler_type"],
        default "`cosine`", meaning "learning-rate schedule after warmup";
    #[arg(conflicts_with = "warmup_steps")]
    warmup_ratio: Option<f64>, value "R", yaml ["warmup_ratio"], pair warmup_steps,
        default "0.1", meaning "warmup as a fraction of all steps: ceil(R × total) steps";
    warmup_steps: Option<usize>, value "N", yaml ["warmup_steps"], pair warmup_ratio,
        default "", meaning "warmup steps, instead of --warmup-ratio";
    max_grad_norm: Option<f64>, value "X", yaml ["max_grad_norm"], default "1.0",
        meaning "clip the gradient to this global norm; 0 disables";
    batch_size: Option<usize>, value "N", yaml ["per_device_train_batch_size"], default "1",
        meaning "rows per micro-batch";
    grad_accum: Option<usize>, value "N", yaml ["gradient_accumulation_steps"], default "1",
        meaning "micro-batches per optimizer step";
    #[arg(conflicts_with = "max_steps")]
    epochs: Option<f64>, value "X", yaml ["num_train_epochs"], pair max_steps, default "3",
        meaning "passes over the data, may be fractional";
    max_steps: Option<usize>, value "N", yaml ["max_steps"], pair epochs, default "",
        meaning "optimizer steps to run, instead of --epochs (wins in YAML; -1 there is unset)";
    max_len: Option<usize>, value "N", yaml ["cutoff_len"], default "16384",
        meaning "longest row in tokens";
    #[arg(value_enum)]
    overlong: Option<Overlong>, value "truncate|drop", yaml [], default "`truncate`",
        meaning "what to do with rows longer than --max-len";
    max_samples: Option<usize>, value "N", yaml ["max_samples"], default "all",
        meaning "train on the first N rows only";
    seed: Option<u64>, value "N", yaml ["seed"], default "42",
        meaning "seed of the data order, LoRA initialisation and dropout";
    save_steps: Option<usize>, value "N", yaml ["save_steps", "save_strategy"], default "500",
        meaning "write a checkpoint every N optimizer steps; 0 (YAML `save_strategy: no`) only \
                 at the end";
    save_total_limit: Option<usize>, value "N", yaml ["save_total_limit"], default "keep all",
        meaning "keep only the N newest checkpoints, deleting older ones; 0 keeps all";
    resume: Option<PathBuf>, value "DIR", yaml ["resume_from_checkpoint"], default "",
        meaning "continue from this checkpoint, taking exactly the steps the uninterrupted run \
                 would have taken";
    no_shuffle: bool, value "", yaml [], default "",
        meaning "keep the data in file order (rows are still grouped by length)";
    #[arg(value_enum)]
    progress: Option<ProgressMode>, value "auto|bar|plain", yaml [], default "`auto`",
        meaning "progress display: a bar on a terminal, else one line per step";
}

/// The flag of a setting: `--lora-rank` for `lora_rank`.
pub fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// The row of `field`.
fn row(field: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.field == field)
}

/// A setting's name in messages: its flag and, if a YAML key sets it, the first such key
/// (`--lora-rank (lora_rank)`).
pub fn label_of(field: &str) -> String {
    match row(field).and_then(|s| s.yaml.first()) {
        Some(key) => format!("{} ({key})", flag(field)),
        None => flag(field),
    }
}

/// [`label_of`] a field of [`TrainSettings`], checked at compile time.
macro_rules! label {
    ($field:ident) => {{
        let _ = |s: &$crate::train::settings::TrainSettings| s.$field.clone();
        $crate::train::settings::label_of(stringify!($field))
    }};
}
pub(crate) use label;

/// The flag that overrides the YAML `key` when `flags` gives it (both flags of a pair).
pub fn overriding_flag(key: &str, flags: &TrainSettings) -> Option<String> {
    let s = SETTINGS.iter().find(|s| s.yaml.contains(&key))?;
    let given = flags.given(s.field) || s.pair.is_some_and(|p| flags.given(p));
    let names = match s.pair {
        Some(pair) => SETTINGS
            .iter()
            .filter(|r| r.field == s.field || r.field == pair)
            .map(|r| flag(r.field))
            .collect::<Vec<_>>()
            .join("/"),
        None => flag(s.field),
    };
    given.then_some(names)
}

/// The settings table of docs/training.md.
pub fn markdown_table() -> String {
    let mut table =
        String::from("| flag | LLaMA-Factory key | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let flag = match s.value {
            "" => format!("`{}`", flag(s.field)),
            value => format!("`{} {}`", flag(s.field), value.replace('|', "\\|")),
        };
        let keys: Vec<String> = s.yaml.iter().map(|k| format!("`{k}`")).collect();
        let keys = if keys.is_empty() {
            "—".to_string()
        } else {
            keys.join(", ")
        };
        let default = if s.default.is_empty() {
            "—"
        } else {
            s.default
        };
        table += &format!("| {flag} | {keys} | {default} | {} |\n", s.meaning);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_hold_the_generated_settings_table() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/training.md"),
        )
        .unwrap();
        assert!(
            docs.contains(&markdown_table()),
            "docs/training.md's settings table differs from the table in src/train/settings.rs; \
             paste this:\n{}",
            markdown_table()
        );
    }

    #[test]
    fn every_field_is_one_row_and_every_yaml_key_one_setting() {
        let fields: Vec<&str> = SETTINGS.iter().map(|s| s.field).collect();
        for (i, f) in fields.iter().enumerate() {
            assert!(!fields[..i].contains(f), "{f} twice");
        }
        let keys: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|s| s.yaml.iter().copied())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(!keys[..i].contains(k), "YAML key {k} sets two settings");
        }
        for s in SETTINGS {
            if let Some(pair) = s.pair {
                assert_eq!(row(pair).and_then(|p| p.pair), Some(s.field), "{}", s.field);
            }
        }
    }

    #[test]
    fn pairs_override_together_and_labels_name_flag_and_key() {
        let flags = TrainSettings {
            warmup_steps: Some(3),
            ..TrainSettings::default()
        };
        assert_eq!(
            overriding_flag("warmup_ratio", &flags).as_deref(),
            Some("--warmup-ratio/--warmup-steps")
        );
        assert_eq!(overriding_flag("seed", &flags), None);
        assert_eq!(overriding_flag("not_a_key", &flags), None);
        let file = TrainSettings {
            warmup_ratio: Some(0.5),
            seed: Some(7),
            ..TrainSettings::default()
        };
        let merged = flags.over(file);
        assert_eq!((merged.warmup_ratio, merged.warmup_steps), (None, Some(3)));
        assert_eq!(merged.seed, Some(7));
        assert_eq!(
            label!(batch_size),
            "--batch-size (per_device_train_batch_size)"
        );
        assert_eq!(label!(overlong), "--overlong");
    }
}
