//! `wgtrain train` against transformers 4.46.3 / PEFT 0.13.2 on the tiny fixtures
//! (scripts/fixtures/tiny_qwen2.py): one SGD step's LoRA update and full fine-tuning gradients,
//! the 4-step AdamW loss curve, the written adapter reloading to the training loss, refusing to
//! clobber a run, the built-in demo's falling loss, and `--dry-run`'s memory report.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fixtures, metrics, wgtrain};
use serde_json::Value;
use wgtrain::model::{Adapter, Qwen2Config};
use wgtrain::train::config::{AdapterKind, Method, TrainConfig};
use wgtrain::train::llama_factory::read_llama_factory_yaml;
use wgtrain::train::TrainSettings;

fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn reference(name: &str) -> Value {
    let path = model_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every F32 tensor of a safetensors file by name.
fn read_f32(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(name, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, data)
        })
        .collect()
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// `max |got − want| / max |want|`.
fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    diff / scale.max(1e-12)
}

/// The first two rows of the fixture dataset (the reference's SGD batch) in `dir`.
fn two_rows(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("tiny_sft.jsonl")).unwrap();
    let path = dir.join("two.jsonl");
    let rows: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

fn sgd_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--optimizer",
        "sgd",
        "--lr",
        "1",
        "--max-grad-norm",
        "0",
        "--max-steps",
        "1",
        "--scheduler",
        "constant",
        "--warmup-ratio",
        "0",
        "--batch-size",
        "2",
        "--no-shuffle",
        "--progress",
        "plain",
    ]
}

#[test]
fn lora_sgd_step_matches_peft_and_adapter_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_rows(tmp.path());
    let name = "tiny-qwen2-tied";
    let model = model_dir(name);
    let init = model.join("adapter-random");
    let out = tmp.path().join("run");
    let (m, d, o, i) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        init.to_str().unwrap(),
    );
    let mut args = sgd_args(m, d, o);
    args.extend(["--init-adapter", i]);
    ok(wgtrain(&args));

    let old = read_f32(&init.join("adapter_model.safetensors"));
    let new = read_f32(&out.join("adapter_model.safetensors"));
    let reference = read_f32(&model.join("reference.safetensors"));
    assert_eq!(old.len(), new.len());
    let mut worst = 0f64;
    for (key, before) in &old {
        let delta =
            |after: &[f32]| -> Vec<f32> { after.iter().zip(before).map(|(a, b)| a - b).collect() };
        let got = delta(&new[key]);
        let want = delta(&reference[&format!("sgd_adapter.{key}")]);
        let err = rel_error(&got, &want);
        assert!(err < 1e-3, "{key}: update off by {err:.2e} relative");
        worst = worst.max(err);
    }
    eprintln!("LoRA SGD step: worst relative error of an update {worst:.2e}");

    // The adapter loads back, and `wgtrain loss` before the step equals the training loss.
    let config = Qwen2Config::load(&model).unwrap();
    Adapter::load(&out, &config).unwrap();
    let loss: Value = serde_json::from_str(&ok(wgtrain(&[
        "loss",
        "--model",
        m,
        "--adapter",
        i,
        "--data",
        d,
    ])))
    .unwrap();
    let trained = metrics(&out)[0]["loss"].as_f64().unwrap();
    let eval = loss["loss"].as_f64().unwrap();
    assert!(
        (trained - eval).abs() < 1e-4 * eval,
        "training loss {trained} vs wgtrain loss {eval}"
    );

    // A second run into the same directory is refused without --overwrite.
    let refused = wgtrain(&args);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--overwrite"), "{stderr}");
}

#[test]
fn adamw_loss_curve_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "tiny-qwen2-untied";
    let model = model_dir(name);
    let init = model.join("adapter-random");
    let data = fixtures().join("tiny_sft.jsonl");
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    ok(wgtrain(&[
        "train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(),
        "--output", out.to_str().unwrap(), "--init-adapter", init.to_str().unwrap(),
        "--optimizer", "adamw", "--lr", "1e-3", "--scheduler", "cosine", "--warmup-ratio", "0.1",
        "--max-grad-norm", "1", "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4",
        "--no-shuffle", "--progress", "plain",
    ]));
    let want: Vec<f64> = reference(name)["adamw"]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got: Vec<f64> = metrics(&out)
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    eprintln!("AdamW losses: wgtrain {got:?}, transformers {want:?}");
    assert_eq!(got.len(), want.len());
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-3 * w,
            "step {}: loss {g} vs {w}",
            step + 1
        );
    }
}

#[test]
fn full_finetuning_gradients_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_rows(tmp.path());
    let name = "tiny-qwen2-untied";
    let model = model_dir(name);
    let out = tmp.path().join("run");
    let mut args = sgd_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    args.extend(["--adapter", "full"]);
    ok(wgtrain(&args));

    // lr 1 SGD: new − old = −grad.
    let base = wgtrain::model::Weights::open(&model).unwrap();
    let new = read_f32(&out.join("model.safetensors"));
    let reference = read_f32(&model.join("reference.safetensors"));
    let grads: Vec<_> = reference
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("full_grad.")?, v)))
        .collect();
    assert!(!grads.is_empty());
    let mut worst = 0f64;
    for (param, want) in grads {
        let old: Vec<f32> = base.get(param).unwrap().values().collect();
        let got: Vec<f32> = old.iter().zip(&new[param]).map(|(o, n)| o - n).collect();
        let err = rel_error(&got, want);
        assert!(err < 1e-3, "{param}: gradient off by {err:.2e} relative");
        worst = worst.max(err);
    }
    eprintln!("full fine-tuning: worst relative gradient error {worst:.2e}");
}

#[test]
fn demo_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    // A shortened demo (the full one runs 40 steps of 2 rows).
    #[rustfmt::skip]
    ok(wgtrain(&[
        "train", "--output", out.to_str().unwrap(), "--batch-size", "1", "--max-steps", "6",
        "--warmup-ratio", "0", "--progress", "plain",
    ]));
    let losses: Vec<f64> = metrics(&out)
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    eprintln!("demo losses {losses:?}");
    assert!(losses[5] < losses[0] - 0.3, "{losses:?}");
    // No --adapter: LoRA, the default of every run, the demo included.
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("loss.svg").is_file());
    assert!(!out.join("model.safetensors").exists());
}

/// The MiB figure on the report line that starts with `label`.
fn report_mib(report: &str, label: &str) -> f64 {
    let line = report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{report}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// `--dry-run` sets the run up, measures one step on its largest micro-batch and writes nothing.
/// Two rows in one micro-batch: the real run's only step pads both to the longer row, the shape the
/// dry run measures, so its peak is the one the real run reports.
#[test]
fn dry_run_reports_the_steps_memory_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_rows(tmp.path());
    let model = model_dir("tiny-qwen2-tied");
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = vec![
        "train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(),
        "--output", out.to_str().unwrap(), "--batch-size", "2", "--max-steps", "1",
        "--progress", "plain",
    ];
    let report = ok(wgtrain(&[args.as_slice(), &["--dry-run"]].concat()));
    eprintln!("{report}");
    assert!(!out.exists(), "a dry run created {}", out.display());
    assert!(report.contains("2 row(s) x"), "{report}");
    let frozen = report_mib(&report, "frozen weights");
    let state = report_mib(&report, "trainable + gradients + optimizer");
    let peak = report_mib(&report, "peak device memory during the step");
    assert!(frozen > 0.0 && state > 0.0, "{report}");
    assert!(peak >= frozen + state, "{report}");

    ok(wgtrain(&args));
    let real = metrics(&out)[0]["peak_mem_mib"].as_f64().unwrap();
    assert!(
        (real - peak).abs() < 0.06,
        "dry run {peak} MiB, real run {real} MiB"
    );
}

/// The paper's two LLaMA-Factory YAMLs (tests/fixtures/llama_factory) with `--model` and `--data`:
/// the flags win before the file's `model_name_or_path` (a hub name) or `dataset` (an entry of a
/// `data/dataset_info.json` that is not here) is looked at; everything else comes from the file.
#[test]
fn paper_yamls_take_model_and_data_from_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_rows(tmp.path());
    let flags = TrainSettings {
        model: Some(model_dir("tiny-qwen2-tied")),
        data: vec![data.clone()],
        ..TrainSettings::default()
    };
    for (name, dataset, kind, lr) in [
        (
            "qwen2_lora_config.yaml",
            "Sky-T1-Lora",
            AdapterKind::Lora,
            1e-4,
        ),
        ("qwen2_full_sft.yaml", "Sky-T1-HQ", AdapterKind::Full, 1e-5),
    ] {
        let yaml = fixtures().join("llama_factory").join(name);
        let without = read_llama_factory_yaml(&yaml, &TrainSettings::default()).unwrap_err();
        assert!(
            format!("{without:#}").contains(&format!("{dataset:?} is neither an entry")),
            "{without:#}"
        );

        let (file, warnings) = read_llama_factory_yaml(&yaml, &flags).unwrap();
        assert!(file.data.is_empty() && file.model.is_none(), "{file:?}");
        for key in ["model_name_or_path", "dataset"] {
            let flag = if key == "dataset" {
                "--data"
            } else {
                "--model"
            };
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("{key} overridden by {flag}"))),
                "{warnings:?}"
            );
        }
        assert!(warnings.iter().any(|w| w.contains("deepspeed ignored")));
        let config = TrainConfig::resolve(flags.clone(), Some((file, warnings))).unwrap();
        assert_eq!(config.data, std::slice::from_ref(&data));
        assert_eq!(config.model, flags.model);
        assert_eq!(config.optimizer.lr, lr);
        assert_eq!(config.grad_accum, 12);
        assert_eq!(config.max_len, 16384);
        let lora = matches!(config.method, Method::Lora(_));
        assert_eq!(lora, kind == AdapterKind::Lora, "{name}");
    }
}

/// The fixture adapter (r 8, alpha 16, all seven projections) started from with other LoRA
/// settings: a flag that differs is refused, a YAML value that differs is a warning, and the run
/// records the adapter's own values (run marker, the checkpoint's resume settings).
#[test]
fn init_adapter_values_win_and_conflicting_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = two_rows(tmp.path());
    let model = model_dir("tiny-qwen2-tied");
    let init = model.join("adapter-random");
    let out = tmp.path().join("run");
    let (m, d, o, i) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        init.to_str().unwrap(),
    );
    let mut args = sgd_args(m, d, o);
    args.extend(["--init-adapter", i]);

    for (flag, value, theirs) in [
        ("--lora-rank", "4", "8"),
        ("--lora-alpha", "32", "16"),
        ("--lora-target", "q_proj,v_proj", "q_proj,k_proj,v_proj"),
    ] {
        let mut conflicting = args.clone();
        conflicting.extend([flag, value]);
        let refused = wgtrain(&conflicting);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} {value} conflicts")) && stderr.contains(theirs),
            "{stderr}"
        );
        assert!(!out.exists(), "a refused run writes nothing");
    }

    let yaml = tmp.path().join("run.yaml");
    std::fs::write(&yaml, "lora_rank: 32\nlora_alpha: 64\n").unwrap();
    let mut from_yaml = args.clone();
    from_yaml.extend(["--config", yaml.to_str().unwrap()]);
    let run = wgtrain(&from_yaml);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("lora_rank 32 (YAML) differs") && stderr.contains("lora_alpha 64 (YAML)"),
        "{stderr}"
    );
    let json = |path: PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let marker = json(out.join("wgtrain_run.json"));
    let state = json(out.join("checkpoint-1/train_state.json"));
    for method in [&marker["method"], &state["config"]["method"]] {
        assert_eq!(
            (&method["rank"], &method["alpha"]),
            (&Value::from(8), &Value::from(16.0))
        );
        assert_eq!(method["targets"].as_array().unwrap().len(), 7);
    }
}
