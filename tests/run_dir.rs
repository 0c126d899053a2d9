//! What a run directory guarantees, end to end through the binary on tiny-qwen2-tied with six
//! short rows: one run at a time, `--overwrite` that loses nothing on a failed start, stop signals
//! that checkpoint, resume over a cut metrics line, files with the user's umask.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures, losses, train_args, wgtrain, wgtrain_cmd};

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn failed(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "expected a refusal: {stderr}");
    stderr
}

/// A LoRA AdamW run of `steps` one-row steps into `out` (data written beside it), checkpointed
/// every `save_steps` (0: at the end), plus `extra`.
fn run_args(out: &Path, steps: usize, save_steps: usize, extra: &[&str]) -> Vec<String> {
    let (save_steps, steps) = (save_steps.to_string(), steps.to_string());
    let mut args = train_args(
        out,
        &[
            "--lora-rank",
            "4",
            "--batch-size",
            "1",
            "--save-steps",
            &save_steps,
            "--max-steps",
            &steps,
        ],
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = args.to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Every file under `dir` (but the lock file, which names its latest holder) and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().unwrap() != "wgtrain.lock" {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Starts a run and waits for its first metrics line (it then holds the directory).
fn spawn_until_first_step(args: &[String], out: &Path) -> Child {
    let child = wgtrain_cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains('\n')) {
        assert!(Instant::now() < deadline, "no metrics line within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A second run into a directory a run is writing, with or without --overwrite or --resume, is
/// refused at once naming the holder; the first run's metrics are whole: steps 1..N.
#[test]
fn a_second_run_into_a_busy_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = run_args(&out, 30, 0, &[]);
    let first = spawn_until_first_step(&args, &out);
    let holder = format!("pid {}", first.id());
    for extra in [
        &[][..],
        &["--overwrite"],
        &["--resume", out.to_str().unwrap()],
    ] {
        let err = failed(wgtrain(&with(
            &run_args(&out, 30, 0, &["--seed", "7"]),
            extra,
        )));
        assert!(err.contains("in use by another run"), "{extra:?}: {err}");
        assert!(err.contains(&holder), "{extra:?}: {err}");
    }
    ok(first.wait_with_output().unwrap());
    let steps: Vec<u64> = losses(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// `--overwrite` that fails to start leaves the earlier run byte for byte: a missing or broken
/// data file (refused before the directory is touched), a missing init adapter's files (refused
/// after the earlier run was moved aside: it is moved back), and a model inside the output.
#[test]
fn a_failed_overwrite_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = run_args(&out, 2, 0, &[]);
    ok(wgtrain(&args));
    let before = snapshot(&out);
    assert!(before.contains_key(Path::new("adapter_model.safetensors")));

    let broken = tmp.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"messages\": [\n").unwrap();
    let empty_adapter = tmp.path().join("no-adapter");
    std::fs::create_dir(&empty_adapter).unwrap();
    #[rustfmt::skip]
    let failures: [(&str, &Path, &str); 3] = [
        ("--data", Path::new("missing.jsonl"), "missing.jsonl"),
        ("--data", &broken, "broken.jsonl:1"),
        ("--init-adapter", &empty_adapter, "no-adapter"),
    ];
    for (flag, path, named) in failures {
        let mut args = run_args(&out, 1, 0, &["--overwrite"]);
        match flag {
            "--data" => args[4] = path.display().to_string(),
            _ => args.extend([flag.to_string(), path.display().to_string()]),
        }
        let err = failed(wgtrain(&args));
        assert!(err.contains(named), "{flag}: {err}");
        assert!(
            snapshot(&out) == before,
            "{flag} changed the earlier run: {err}"
        );
    }

    // The model to train lies inside the output: refused, the model intact.
    let model = fixtures().join("tiny-qwen2-tied");
    let inside = out.join("model");
    std::fs::create_dir(&inside).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, inside.join(path.file_name().unwrap())).unwrap();
        }
    }
    let before = snapshot(&out);
    let mut args = run_args(&out, 1, 0, &["--overwrite"]);
    args[2] = inside.display().to_string();
    let err = failed(wgtrain(&args));
    assert!(err.contains("holds --model"), "{err}");
    assert!(
        snapshot(&out) == before,
        "the model inside the output changed"
    );
}

/// SIGTERM mid-run: the step finishes, a checkpoint is written, the exit code is 143, and
/// resuming gives the losses of an uninterrupted run.
#[cfg(unix)]
#[test]
fn sigterm_checkpoints_and_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    ok(wgtrain(&run_args(&reference, 12, 0, &[])));

    let out = tmp.path().join("run");
    let args = run_args(&out, 12, 0, &[]);
    let child = spawn_until_first_step(&args, &out);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("SIGTERM: finishing this step"), "{stderr}");
    let steps = losses(&out).len();
    assert!(steps < 12, "the run was not interrupted ({steps} steps)");
    assert!(out
        .join(format!("checkpoint-{steps}/train_state.json"))
        .is_file());

    ok(wgtrain(&with(&args, &["--resume", out.to_str().unwrap()])));
    assert_eq!(losses(&out), losses(&reference));
}

/// A metrics line cut by a kill: --resume warns, drops it, keeps the lines before the checkpoint
/// byte for byte and redoes the rest.
#[test]
fn resume_drops_a_cut_last_metrics_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = run_args(&out, 4, 2, &[]);
    ok(wgtrain(&args));
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let cut = format!("{}{}", lines[..3].concat(), &lines[3][..lines[3].len() / 2]);
    std::fs::write(&metrics, cut).unwrap();

    let checkpoint = out.join("checkpoint-2");
    let stderr = ok(wgtrain(&with(
        &args,
        &["--resume", checkpoint.to_str().unwrap()],
    )));
    assert!(
        stderr.contains("warning:") && stderr.contains("damaged last line"),
        "{stderr}"
    );
    let resumed = std::fs::read_to_string(&metrics).unwrap();
    assert!(resumed.starts_with(&lines[..2].concat()), "{resumed}");
    let steps: Vec<u64> = losses(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

/// Files of a run get the mode a plain `File::create` gets (0666 less the umask), not 0600.
#[cfg(unix)]
#[test]
fn run_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(wgtrain(&run_args(&out, 2, 1, &[])));
    let plain = tmp.path().join("plain");
    std::fs::File::create(&plain).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "loss.svg",
        "wgtrain_run.json",
        "checkpoint-1/optimizer.safetensors",
        "checkpoint-1/adapter_model.safetensors",
    ] {
        assert_eq!(mode(&out.join(file)), mode(&plain), "{file}");
    }
}
