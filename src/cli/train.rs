//! `wgtrain train`'s command line. The settings' flags are `train::settings::TrainSettings`
//! (flattened here), every one optional so that a `--config` YAML value applies unless the flag
//! is given; defaults and validation are `TrainConfig::resolve`'s.
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use wgtrain_kernels::{Gpu, GpuOptions};

use super::device::ModelDeviceArgs;
use super::signals::StopRequest;
use crate::train::config::TrainConfig;
use crate::train::llama_factory::read_llama_factory_yaml;
use crate::train::ranks::{self, agree, local_rank, RankFailed, Ranks};
use crate::train::settings::TrainSettings;
use crate::train::trainer::{self, kept_checkpoint, Outcome};

/// Fine-tune a Qwen2 model (LoRA or full) on a chat dataset.
#[derive(Args, Debug)]
// `--lr -1` reaches the value checks instead of being taken for a flag.
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A LLaMA-Factory training YAML (its key names); flags given here override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: TrainSettings,
    #[command(flatten)]
    pub device: ModelDeviceArgs,
    /// Check that the run fits the device, training nothing: set it up as usual, run one
    /// optimizer step on its largest micro-batch with every tensor allocated but no kernel
    /// executed, print the device memory that takes and exit without touching --output.
    #[arg(long)]
    pub dry_run: bool,
}

impl TrainArgs {
    /// The run's checked settings: the flags over the YAML file, then defaults.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let file = self
            .config
            .as_deref()
            .map(|path| read_llama_factory_yaml(path, &self.settings))
            .transpose()?;
        let file = match self.settings.model.is_none() && self.settings.data.is_empty() {
            true => {
                let (yaml, warnings) = file.unwrap_or_default();
                Some((yaml.over(demo_recipe()), warnings))
            }
            false => file,
        };
        TrainConfig::resolve(self.settings.clone(), file)
    }
}

/// The built-in demo's defaults (under any flag or YAML value): a short run (LoRA, as every run
/// by default) at a high learning rate, so the tiny random model's loss visibly falls within minutes on a CPU device.
fn demo_recipe() -> TrainSettings {
    TrainSettings {
        lr: Some(3e-3),
        batch_size: Some(2),
        max_steps: Some(40),
        warmup_ratio: Some(0.05),
        ..TrainSettings::default()
    }
}

/// `wgtrain train`: runs the training and prints a one-line summary. The first stop signal
/// (Ctrl-C, SIGTERM, SIGHUP) lets the step under way finish and writes a checkpoint, then exits
/// with 128 + the signal; a second one exits at once (checkpoints are written atomically, so none
/// is left half-written under its final name).
///
/// Under an MPI launcher (built with `--features mpi`) every rank runs this; rank 0 alone prints.
/// A failure the ranks agreed on is printed once, with the checkpoint kept; any other error of one
/// rank is printed naming it and ends the whole job.
pub fn run(args: TrainArgs) -> Result<i32> {
    let ranks = ranks::ranks()?;
    let ranks = &*ranks;
    let config = agree(ranks, args.resolve())?;
    let result = train_on_rank(&args, &config, ranks);
    let (rank, size) = (ranks.rank(), ranks.size());
    match result {
        Err(err) if size > 1 => match err.chain().find_map(|e| e.downcast_ref::<RankFailed>()) {
            None => {
                eprintln!("error: rank {rank} of {size}: {err:#}");
                ranks.abort(2)
            }
            Some(_) if rank > 0 => Ok(2),
            // Every rank failing is the run's own error (e.g. the NaN policy, which says what
            // it keeps).
            Some(failed) if failed.failed.len() == size => Err(err),
            Some(_) => Err(anyhow!("{err:#}; {}", kept_checkpoint(&config.output)?)),
        },
        result => result,
    }
}

/// This rank's part of [`run`]: the device of its local rank (`--device` overrides), the run,
/// and (on rank 0) what is printed.
fn train_on_rank(args: &TrainArgs, config: &TrainConfig, ranks: &dyn Ranks) -> Result<i32> {
    if ranks.rank() == 0 {
        for warning in &config.warnings {
            eprintln!("warning: {warning}");
        }
    }
    let stop = StopRequest::install(
        "finishing this step and writing a checkpoint (a second signal quits at once)",
    )?;
    let mut options = args.device.options()?;
    options.dry_run = args.dry_run;
    let gpu = agree(ranks, open_device(options, ranks))?;
    let outcome = trainer::train(config, &gpu, stop.flag(), ranks)?;
    // Every rank stopped; the exit code is that of the signal, from the rank(s) it reached.
    let stop_code = match &outcome {
        Outcome::Trained(summary) if summary.interrupted => ranks
            .all_gather(&[stop.exit_code() as u8])
            .iter()
            .map(|code| i32::from(code[0]))
            .max(),
        _ => None,
    };
    if ranks.rank() > 0 {
        return Ok(stop_code.unwrap_or(0));
    }
    let summary = match outcome {
        Outcome::Trained(summary) => summary,
        Outcome::DryRun(report, job) => {
            println!(
                "dry run on the run's largest micro-batch (every tensor allocated, no kernel run; \
                 nothing written)\n{report}"
            );
            if let Some(job) = job {
                println!("{job}");
            }
            return Ok(0);
        }
    };
    if summary.interrupted {
        let checkpoint = summary
            .last_checkpoint
            .as_ref()
            .map_or("(none)".to_string(), |c| c.display().to_string());
        eprintln!(
            "interrupted after step {}/{}: checkpoint {checkpoint}\nresume with the same \
             settings plus: --output {} --resume {checkpoint}",
            summary.steps,
            summary.total_steps,
            summary.output.display()
        );
        return Ok(stop_code.unwrap_or(0));
    }
    println!(
        "done: {} steps, loss {:.4} -> {:.4}, {} kernel dispatches, written to {}",
        summary.steps,
        summary.first_loss,
        summary.last_loss,
        gpu.dispatches(),
        summary.output.display()
    );
    if std::env::var_os("WGTRAIN_LAUNCHES").is_some() {
        println!("kernel dispatches by kernel:");
        for (kernel, n) in gpu.dispatches_by_kernel() {
            println!("  {n:8}  {kernel}");
        }
    }
    Ok(0)
}

/// The device `options` name or, with several ranks and no `--device`, the one at this rank's
/// local rank (each process on a machine takes its own).
fn open_device(mut options: GpuOptions, ranks: &dyn Ranks) -> Result<Gpu> {
    if options.device.is_some() || ranks.size() == 1 {
        return Gpu::new(&options);
    }
    let Some(local) = local_rank()? else {
        return Gpu::new(&options);
    };
    options.device = Some(local.to_string());
    Gpu::new(&options).with_context(|| {
        format!("opening device {local}, this rank's local rank (--device chooses another)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proj;
    use crate::train::batching::{Duration, Overlong};
    use crate::train::config::{Method, OptimizerKind};
    use crate::train::schedule::{SchedulerKind, Warmup};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(args: &[&str]) -> Result<TrainArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("train").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn every_flag_parses() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().display().to_string();
        let args = parse(&[
            "--model",
            &model,
            "--data",
            "a.jsonl",
            "--data",
            "b.json",
            "--output",
            "run",
            "--overwrite",
            "--adapter",
            "lora",
            "--lora-rank",
            "16",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0.05",
            "--lora-target",
            "q_proj,v_proj",
            "--init-adapter",
            "init",
            "--optimizer",
            "sgd",
            "--lr",
            "3e-4",
            "--beta1",
            "0.8",
            "--beta2",
            "0.95",
            "--eps",
            "1e-6",
            "--weight-decay",
            "0.01",
            "--scheduler",
            "linear",
            "--warmup-steps",
            "7",
            "--max-grad-norm",
            "0",
            "--batch-size",
            "2",
            "--grad-accum",
            "3",
            "--max-steps",
            "9",
            "--max-len",
            "512",
            "--overlong",
            "drop",
            "--max-samples",
            "100",
            "--seed",
            "5",
            "--save-steps",
            "4",
            "--resume",
            "ckpt",
            "--no-shuffle",
            "--progress",
            "plain",
            "--backend",
            "vulkan",
        ])
        .unwrap();
        let c = args.resolve().unwrap();
        assert_eq!(c.data, [PathBuf::from("a.jsonl"), PathBuf::from("b.json")]);
        assert!(c.overwrite && !c.shuffle && !c.demo);
        let Method::Lora(lora) = &c.method else {
            panic!("lora expected")
        };
        assert_eq!((lora.rank, lora.alpha, lora.dropout), (16, 8.0, 0.05));
        assert_eq!(lora.targets, [Proj::Q, Proj::V]);
        assert_eq!(c.optimizer.kind, OptimizerKind::Sgd);
        assert_eq!(
            (c.optimizer.lr, c.optimizer.beta1, c.optimizer.beta2),
            (3e-4, 0.8, 0.95)
        );
        assert_eq!((c.optimizer.eps, c.optimizer.weight_decay), (1e-6, 0.01));
        assert_eq!(
            (c.scheduler, c.warmup),
            (SchedulerKind::Linear, Warmup::Steps(7))
        );
        assert_eq!(c.max_grad_norm, None);
        assert_eq!((c.batch_size, c.grad_accum), (2, 3));
        assert_eq!(c.duration, Duration::Steps(9));
        assert_eq!((c.max_len, c.overlong), (512, Overlong::Drop));
        assert_eq!(
            (c.max_samples, c.seed, c.save_steps),
            (Some(100), 5, Some(4))
        );
        assert_eq!(c.resume, Some(PathBuf::from("ckpt")));
        assert_eq!(c.init_adapter, Some(PathBuf::from("init")));
    }

    #[test]
    fn conflicting_or_invalid_flags_are_rejected() {
        assert!(parse(&["--epochs", "2", "--max-steps", "10"]).is_err());
        assert!(parse(&["--warmup-ratio", "0.1", "--warmup-steps", "10"]).is_err());
        assert!(parse(&["--scheduler", "cosine_with_restarts"]).is_err());
        assert!(parse(&["--adapter", "freeze"]).is_err());
        assert!(parse(&["--lr", "fast"]).is_err());
    }

    #[test]
    fn flags_override_the_yaml_file() {
        let tmp = tempfile::tempdir().unwrap();
        let yaml = tmp.path().join("lora.yaml");
        std::fs::write(
            &yaml,
            "finetuning_type: full\nlearning_rate: 1.0e-5\nnum_train_epochs: 3.0\nbf16: true\n",
        )
        .unwrap();
        let yaml = yaml.display().to_string();
        let args = parse(&["--config", &yaml, "--adapter", "lora", "--epochs", "1"]).unwrap();
        let c = args.resolve().unwrap();
        assert!(matches!(c.method, Method::Lora(_)));
        assert_eq!(c.optimizer.lr, 1e-5);
        assert_eq!(c.duration, Duration::Epochs(1.0));
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        for note in [
            "finetuning_type overridden by --adapter",
            "num_train_epochs overridden by --epochs/--max-steps",
            "bf16 ignored",
        ] {
            assert!(c.warnings.iter().any(|w| w.contains(note)), "{note}");
        }
        assert_eq!(
            parse(&["--config", &yaml]).unwrap().settings.adapter,
            None,
            "the file's value is applied by resolve, not by clap"
        );
        let from_file = parse(&["--config", &yaml]).unwrap().resolve().unwrap();
        assert_eq!(from_file.method, Method::Full);
    }

    #[test]
    fn the_demo_needs_no_flags() {
        let c = parse(&["--adapter", "lora"]).unwrap().resolve().unwrap();
        assert!(c.demo && c.model.is_none() && c.data.is_empty());
    }

    #[test]
    fn lora_is_the_default_adapter_of_the_demo_and_of_a_run() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().display().to_string();
        for args in [
            vec![],
            vec!["--model", &model, "--data", "a.jsonl", "--output", "o"],
        ] {
            let c = parse(&args).unwrap().resolve().unwrap();
            assert!(matches!(c.method, Method::Lora(_)), "{args:?}");
        }
    }

    #[test]
    fn negative_numbers_reach_the_value_checks() {
        for (flag, message) in [
            ("--lr", "--lr (learning_rate) must be positive, got -1"),
            (
                "--max-grad-norm",
                "--max-grad-norm (max_grad_norm) must be at least 0",
            ),
            (
                "--weight-decay",
                "--weight-decay (weight_decay) must be at least 0, got -1",
            ),
        ] {
            let args = parse(&[flag, "-1"]).unwrap_or_else(|e| panic!("{flag} -1: {e}"));
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(message), "{flag}: {err}");
        }
    }
}
