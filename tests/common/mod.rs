//! What the end-to-end tests that drive the `wgtrain` binary share (each test binary uses the
//! ones it needs).
#![allow(dead_code)]
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The shared data directory: `$WGTRAIN_SHARED`, else ../shared beside the repo. Tests that need
/// it fail when it is missing (CI always has it), never skip.
pub fn shared() -> PathBuf {
    std::env::var_os("WGTRAIN_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn wgtrain_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgtrain"));
    cmd.args(args);
    cmd
}

pub fn wgtrain<S: AsRef<OsStr>>(args: &[S]) -> Output {
    wgtrain_cmd(args).output().expect("run wgtrain")
}

/// Every line of a run's metrics.jsonl.
pub fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss) of every line of a run's metrics.jsonl.
pub fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics(dir)
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// A 3-step LoRA run with AdamW, gradient accumulation and dropout from the tied fixture's random
/// adapter, into `dir` with `extra` arguments: the run that the tests comparing two ways of
/// computing the same training share (they set the environment that picks the way).
pub fn lora_dropout_run(dir: &Path, extra: &[&str]) -> Command {
    let init = fixtures().join("tiny-qwen2-tied/adapter-random");
    #[rustfmt::skip]
    let recipe = [
        "--init-adapter", init.to_str().unwrap(), "--optimizer", "adamw", "--lr", "1e-3",
        "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--lora-dropout", "0.1",
    ];
    wgtrain_cmd(&train_args(dir, &[&recipe[..], extra].concat()))
}

/// (loss, grad_norm) of each step of a run's metrics.
pub fn loss_and_norm_steps(dir: &Path) -> Vec<(f64, f64)> {
    metrics(dir)
        .iter()
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Six short conversations (the fixture rows are long for lavapipe) in `dir`.
pub fn short_data(dir: &Path) -> PathBuf {
    let path = dir.join("short.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| {
            let answer = "x".repeat(1 + i % 3);
            format!(
                r#"{{"messages":[{{"role":"user","content":"What is {i} plus {i}?"}},{{"role":"assistant","content":"{i} plus {i} is {}. {answer}"}}]}}"#,
                2 * i
            )
        })
        .collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

/// `wgtrain train` on tiny-qwen2-tied and six short rows (written beside `out`) into `out`,
/// plus `extra`.
pub fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let model = fixtures().join("tiny-qwen2-tied");
    let data = short_data(out.parent().unwrap());
    let mut args: Vec<String> = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--progress",
        "plain",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The largest elementwise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rows of the given lengths (in one batch the shorter are padded), every next token supervised:
/// (ids, targets) with deterministic ids.
pub fn supervised_rows(lens: &[usize]) -> Vec<(Vec<u32>, Vec<u32>)> {
    lens.iter()
        .enumerate()
        .map(|(r, &len)| {
            let ids: Vec<u32> = (0..len)
                .map(|t| ((t * 37 + r * 101 + 5) % 421) as u32)
                .collect();
            let mut targets = ids[1..].to_vec();
            targets.push(wgtrain::model::IGNORE);
            (ids, targets)
        })
        .collect()
}

/// `rows` as the (ids, targets) slices a micro-batch takes.
pub fn as_batch(rows: &[(Vec<u32>, Vec<u32>)]) -> Vec<(&[u32], &[u32])> {
    rows.iter()
        .map(|(i, t)| (i.as_slice(), t.as_slice()))
        .collect()
}
