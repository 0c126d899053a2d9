//! Checkpoints, `--resume`, Ctrl-C, the NaN stop and `wgtrain merge`, end to end through the
//! binary on tiny-qwen2-tied with six short rows (so that each test takes seconds on lavapipe).
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{fixtures, losses, short_data, train_args as run_args, wgtrain, wgtrain_cmd};

fn ok(out: Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every tensor of a safetensors file (or sharded checkpoint directory): name → (dtype, shape,
/// values as f32).
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let weights = wgtrain::model::Weights::open(dir).unwrap();
    weights
        .names()
        .into_iter()
        .map(|name| {
            let v = weights.get(name).unwrap();
            let dtype = format!("{:?}", v.dtype);
            (name.to_string(), (dtype, v.shape.to_vec(), v.to_f32()))
        })
        .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn assert_complete_checkpoint(dir: &Path, adamw: bool) {
    assert!(dir.join("train_state.json").is_file(), "{}", dir.display());
    assert_eq!(dir.join("optimizer.safetensors").is_file(), adamw);
}

/// Trains 4 AdamW steps (2 micro-batches each, shuffled, LoRA dropout drawing its masks from the
/// training RNG) with a checkpoint every 2, then resumes the same run from checkpoint-2 in the same
/// directory: steps 3–4 and the adapter are identical.
#[test]
fn lora_resume_continues_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let init = fixtures().join("tiny-qwen2-tied/adapter-random");
    #[rustfmt::skip]
    let args = run_args(&out, &[
        "--init-adapter", init.to_str().unwrap(), "--optimizer", "adamw", "--lr", "1e-3",
        "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2",
        "--lora-dropout", "0.1",
    ]);
    ok(wgtrain(&strs(&args)));
    let adapter_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter_config["lora_dropout"], 0.1);
    for step in [2, 4] {
        let dir = out.join(format!("checkpoint-{step}"));
        assert_complete_checkpoint(&dir, true);
        assert!(dir.join("adapter_model.safetensors").is_file());
    }
    let want = losses(&out);
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(want.len(), 4);

    let checkpoint = out.join("checkpoint-2");
    let mut resumed = args.clone();
    resumed.extend(["--resume".into(), checkpoint.display().to_string()]);
    let stdout = ok(wgtrain(&strs(&resumed)));
    assert!(stdout.contains("done: 4 steps"), "{stdout}");
    let got = losses(&out);
    eprintln!("losses: uninterrupted {want:?}, resumed {got:?}");
    assert_eq!(got, want, "metrics after resuming differ");
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter,
        "the final adapter differs"
    );

    // A setting that changes the steps is refused, naming it.
    let changed: Vec<String> = resumed
        .iter()
        .map(|a| {
            if a == "1e-3" {
                "2e-3".into()
            } else {
                a.clone()
            }
        })
        .collect();
    let err = failed(wgtrain(&strs(&changed)));
    assert!(err.contains("lr: checkpoint 0.001 vs now 0.002"), "{err}");
}

/// Full fine-tuning: resuming from checkpoint-1 gives the uninterrupted step 2 and weights.
#[test]
fn full_resume_continues_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = run_args(&out, &[
        "--adapter", "full", "--optimizer", "adamw", "--lr", "1e-3", "--batch-size", "2",
        "--max-steps", "2", "--save-steps", "1",
    ]);
    ok(wgtrain(&strs(&args)));
    assert_complete_checkpoint(&out.join("checkpoint-1"), true);
    let want = losses(&out);
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();

    // Resuming from the run directory picks its latest complete checkpoint: move checkpoint-2
    // away so that it is checkpoint-1.
    std::fs::rename(out.join("checkpoint-2"), tmp.path().join("done")).unwrap();
    let mut resumed = args.clone();
    resumed.extend(["--resume".into(), out.display().to_string()]);
    ok(wgtrain(&strs(&resumed)));
    assert_eq!(losses(&out), want);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
}

/// `--save-total-limit 2` with a checkpoint every step keeps the two newest.
#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = run_args(&out, &[
        "--optimizer", "sgd", "--lr", "0.1", "--max-steps", "3", "--save-steps", "1",
        "--save-total-limit", "2",
    ]);
    ok(wgtrain(&strs(&args)));
    assert!(!out.join("checkpoint-1").exists());
    for step in [2, 3] {
        assert_complete_checkpoint(&out.join(format!("checkpoint-{step}")), false);
    }
}

/// SIGINT mid-run: the step finishes, a checkpoint is written, the exit code is 130, and
/// resuming from the run directory completes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = run_args(&out, &[
        "--optimizer", "adamw", "--lora-rank", "4", "--batch-size", "1", "--max-steps", "12",
        "--save-steps", "0",
    ]);
    let child = wgtrain_cmd(&strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains('\n')) {
        assert!(Instant::now() < deadline, "no metrics line within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    let steps = losses(&out).len();
    assert!(steps < 12, "the run was not interrupted ({steps} steps)");
    let checkpoint = out.join(format!("checkpoint-{steps}"));
    assert_complete_checkpoint(&checkpoint, true);
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!out.join("adapter_model.safetensors").exists());

    let mut resumed = args.clone();
    resumed.extend(["--resume".into(), out.display().to_string()]);
    ok(wgtrain(&strs(&resumed)));
    let steps: Vec<u64> = losses(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// A learning rate that blows the weights up: the run stops at the first non-finite step, names
/// it, and keeps the checkpoint before it.
#[test]
fn a_non_finite_step_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = run_args(&out, &[
        "--adapter", "full", "--optimizer", "sgd", "--lr", "1e30", "--max-grad-norm", "0",
        "--scheduler", "constant", "--warmup-ratio", "0", "--batch-size", "2", "--max-steps", "3",
        "--save-steps", "1",
    ]);
    let err = failed(wgtrain(&strs(&args)));
    assert!(err.contains("step 2: the loss"), "{err}");
    assert!(err.contains("checkpoint (step 1) is kept"), "{err}");
    assert_complete_checkpoint(&out.join("checkpoint-1"), false);
    assert!(!out.join("checkpoint-2").exists());
}

/// The merged checkpoint has the base's tensors, and its loss equals the unmerged adapter's.
#[test]
fn merged_model_matches_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-qwen2-tied");
    let adapter = model.join("adapter-random");
    let data = short_data(tmp.path());
    let merged = tmp.path().join("merged");
    let sharded = tmp.path().join("sharded");
    let (m, a, d) = (
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let merge = |out: &Path, extra: &[&str]| {
        let mut args = vec!["merge", "--model", m, "--adapter", a, "--output"];
        args.push(out.to_str().unwrap());
        args.extend(extra);
        wgtrain(&args)
    };
    ok(merge(&merged, &[]));
    ok(merge(&sharded, &["--max-shard-mib", "1"]));
    assert!(sharded.join("model.safetensors.index.json").is_file());

    let base = tensors(&model);
    for dir in [&merged, &sharded] {
        let got = tensors(dir);
        let shapes = |t: &BTreeMap<String, (String, Vec<usize>, Vec<f32>)>| {
            t.iter()
                .map(|(k, (d, s, _))| (k.clone(), d.clone(), s.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(shapes(&got), shapes(&base));
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_ne!(got[q].2, base[q].2, "the adapter changed nothing");
        let e = "model.embed_tokens.weight";
        assert_eq!(got[e].2, base[e].2);
        assert!(dir.join("tokenizer.json").is_file() && dir.join("config.json").is_file());
    }

    let loss = |args: &[&str]| -> f64 {
        let v: Value = serde_json::from_str(&ok(wgtrain(args))).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let unmerged = loss(&["loss", "--model", m, "--adapter", a, "--data", d]);
    for dir in [&merged, &sharded] {
        let dir = dir.to_str().unwrap();
        let got = loss(&["loss", "--model", dir, "--data", d]);
        eprintln!("loss: merged {got}, base + adapter {unmerged}");
        // Rounding each merged weight to bf16 moves it by at most 2^-9 relative, as rounding the
        // base did; the loss moves far less than 1%.
        assert!(
            (got - unmerged).abs() < 1e-2 * unmerged,
            "merged loss {got} vs {unmerged}"
        );
    }

    let err = failed(merge(&merged, &[]));
    assert!(err.contains("--overwrite"), "{err}");
    ok(merge(&merged, &["--overwrite"]));
    let foreign = tmp.path().join("notes");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("a.txt"), "keep").unwrap();
    let err = failed(merge(&foreign, &["--overwrite"]));
    assert!(err.contains("refusing"), "{err}");
    assert!(foreign.join("a.txt").is_file());
}
