//! Data-parallel training over MPI (`cargo test --release --features mpi --test mpi`): Open MPI's
//! `mpirun` starts ranks of the `wgtrain` binary on lavapipe (all on its one device, `--device 0`)
//! with tiny-qwen2-tied and six short rows. Two ranks of two micro-batches per step train what one
//! process of four does (LoRA with dropout, and full fine-tuning); a run resumes on another number
//! of ranks; a stop signal to one rank stops every rank after a checkpoint; a rank without its
//! device, or with other data, stops every rank naming it; and `--dry-run` reports each rank's
//! memory and the bytes summed per step.
#![cfg(feature = "mpi")]
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures, losses, max_abs_diff, train_args, wgtrain_cmd};
use wgtrain::train::checkpoint::load_f32_tensors;
use wgtrain::train::NamedTensor;

/// Seconds after which a job counts as hung (a rank waiting for one that is gone).
const JOB_TIMEOUT_S: &str = "600";

/// `mpirun` with one app context per `(ranks, command)`, allowed to run as root (CI) and
/// unbound (lavapipe's threads need every core), under [`JOB_TIMEOUT_S`].
fn mpirun_cmd(apps: &[(usize, Vec<String>)]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args([
        JOB_TIMEOUT_S,
        "mpirun",
        "--oversubscribe",
        "--bind-to",
        "none",
    ]);
    for (i, (ranks, command)) in apps.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", &ranks.to_string()]).args(command);
    }
    with_mpi_env(&mut cmd);
    cmd
}

/// [`mpirun_cmd`] of `wgtrain` with each app's args, run to its end.
fn mpirun(apps: &[(usize, &[String])]) -> Output {
    let apps: Vec<(usize, Vec<String>)> = apps
        .iter()
        .map(|(n, args)| (*n, wgtrain_app(args)))
        .collect();
    let out = mpirun_cmd(&apps).output().expect("run mpirun");
    assert_ne!(out.status.code(), Some(124), "mpirun hung: {}", text(&out));
    out
}

/// The command line of `wgtrain args`.
fn wgtrain_app(args: &[String]) -> Vec<String> {
    [
        vec![env!("CARGO_BIN_EXE_wgtrain").to_string()],
        args.to_vec(),
    ]
    .concat()
}

/// One process, no launcher (MPI makes it a job of one rank).
fn single(args: &[String]) -> Output {
    with_mpi_env(&mut wgtrain_cmd(args)).output().unwrap()
}

fn with_mpi_env(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `args` with `--grad-accum n`.
fn with_accum(args: &[String], n: usize) -> Vec<String> {
    let mut args = args.to_vec();
    args.extend(["--grad-accum".into(), n.to_string()]);
    args
}

/// `args` with `--device 0`: every rank on lavapipe.
fn on_device_0(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    args.extend(["--device".into(), "0".into()]);
    args
}

/// Within 1e-6 of the larger magnitude of the two.
fn assert_close(what: &str, got: f64, want: f64) {
    let tolerance = 1e-6 * got.abs().max(want.abs());
    assert!((got - want).abs() <= tolerance, "{what}: {got} vs {want}");
}

/// Same steps, losses within 1e-6 relative.
fn assert_same_losses(got: &Path, want: &Path) {
    let (got, want) = (losses(got), losses(want));
    eprintln!("losses: {got:?}\n  want: {want:?}");
    assert_eq!(got.len(), want.len());
    for ((step, g), (_, w)) in got.iter().zip(&want) {
        assert_close(&format!("step {step} loss"), *g, *w);
    }
}

/// The same tensors in the safetensors `file` of both directories, each within 1e-6 of its
/// largest magnitude.
fn assert_same_tensors(got: &Path, want: &Path, file: &str) {
    let load = |dir: &Path| load_f32_tensors(&dir.join(file)).unwrap();
    let (got, want) = (load(got), load(want));
    let names = |ts: &[NamedTensor]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want));
    for (g, w) in got.iter().zip(&want) {
        let largest = w.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&g.data, &w.data);
        assert!(
            diff <= 1e-6 * largest,
            "{file}: {} differs by {diff} (largest magnitude {largest})",
            w.name
        );
    }
}

const ADAPTER: &str = "adapter_model.safetensors";

/// LoRA with dropout on an adapter whose factors are all non-zero, AdamW, one micro-batch of one
/// row each, 4 steps (6 rows: 4 + 2 micro-batches per epoch), a checkpoint every 2.
fn lora_args(out: &Path) -> Vec<String> {
    let init = fixtures().join("tiny-qwen2-tied/adapter-random");
    #[rustfmt::skip]
    let args = train_args(out, &[
        "--init-adapter", init.to_str().unwrap(), "--optimizer", "adamw", "--lr", "1e-3",
        "--batch-size", "1", "--max-steps", "4", "--save-steps", "2", "--lora-dropout", "0.1",
    ]);
    args
}

/// 2 ranks x 2 micro-batches = 1 process x 4: losses and adapter; the 2-rank job says what it
/// summed. Then the 1-process run resumes from its checkpoint-2 on 2 ranks and ends as it did,
/// and a resume that changes the global batch (2 ranks x 4) is refused naming it.
#[test]
fn lora_on_two_ranks_trains_what_one_process_does_and_resumes_on_either() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(single(&with_accum(&lora_args(&one), 4)));
    let stdout = ok(mpirun(&[(
        2,
        &on_device_0(&with_accum(&lora_args(&two), 2)),
    )]));
    eprintln!("{stdout}");
    assert!(
        stdout.contains("gradients summed across 2 ranks"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("done: 4 steps").count(),
        1,
        "rank 0 alone prints"
    );
    assert_same_losses(&two, &one);
    assert_same_tensors(&two, &one, ADAPTER);

    let want = tmp.path().join("want");
    std::fs::create_dir(&want).unwrap();
    for file in ["metrics.jsonl", ADAPTER] {
        std::fs::copy(one.join(file), want.join(file)).unwrap();
    }
    let resume = [
        "--resume".to_string(),
        one.join("checkpoint-2").display().to_string(),
    ];
    let resumed = [
        on_device_0(&with_accum(&lora_args(&one), 2)),
        resume.to_vec(),
    ]
    .concat();
    let stdout = ok(mpirun(&[(2, &resumed)]));
    assert!(stdout.contains("resuming after step 2"), "{stdout}");
    assert_same_losses(&one, &want);
    assert_same_tensors(&one, &want, ADAPTER);

    let other_batch = [
        on_device_0(&with_accum(&lora_args(&one), 4)),
        resume.to_vec(),
    ]
    .concat();
    let err = failed(mpirun(&[(2, &other_batch)]));
    assert!(err.contains("grad_accum: checkpoint 4 vs now 8"), "{err}");
}

/// Full fine-tuning, SGD without warmup (so the weights carry each step's gradient and step 2's
/// loss the first update), 2 steps: 2 ranks x 2 = 1 process x 4.
#[test]
fn full_fine_tuning_on_two_ranks_trains_what_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    #[rustfmt::skip]
    let args = |out: &Path| train_args(out, &[
        "--adapter", "full", "--optimizer", "sgd", "--lr", "0.1", "--warmup-steps", "0",
        "--batch-size", "1", "--max-steps", "2",
    ]);
    ok(single(&with_accum(&args(&one), 4)));
    let stdout = ok(mpirun(&[(2, &on_device_0(&with_accum(&args(&two), 2)))]));
    eprintln!("{stdout}");
    assert_same_losses(&two, &one);
    assert_same_tensors(&two, &one, "model.safetensors");
}

/// Without `--device`, each rank opens the device of its local rank: lavapipe is the only one,
/// so rank 1 has none, and both ranks stop with one message naming it; nothing is written.
#[test]
fn a_rank_without_its_device_stops_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let err = failed(mpirun(&[(2, &lora_args(&out))]));
    assert!(
        err.contains("rank 1 of 2 failed, so every rank stopped")
            && err.contains("opening device 1, this rank's local rank"),
        "{err}"
    );
    assert_eq!(err.matches("every rank stopped").count(), 1, "{err}");
    assert!(!out.exists(), "nothing is written");
}

/// SIGTERM to rank 1 alone, mid-run: every rank finishes the same step, rank 0 writes its
/// checkpoint and says how to resume, the job exits with 143; resuming completes the run.
#[test]
fn a_stop_signal_to_one_rank_stops_every_rank_after_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    #[rustfmt::skip]
    let args = on_device_0(&train_args(&out, &[
        "--optimizer", "adamw", "--lora-rank", "4", "--batch-size", "1", "--max-steps", "12",
        "--save-steps", "0",
    ]));
    // Rank 1 writes its pid, then becomes wgtrain.
    let pid_file = tmp.path().join("rank-1.pid");
    let rank_1 = [
        vec![
            "sh".into(),
            "-c".into(),
            r#"echo $$ > "$0" && exec "$@""#.into(),
        ],
        vec![pid_file.display().to_string()],
        wgtrain_app(&args),
    ]
    .concat();
    let job = mpirun_cmd(&[(1, wgtrain_app(&args)), (1, rank_1)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains('\n')) {
        assert!(Instant::now() < deadline, "no metrics line within 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = job.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(143), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("interrupted after step").count(),
        1,
        "{stderr}"
    );
    let steps = losses(&out).len();
    assert!(steps < 12, "the run was not interrupted ({steps} steps)");
    assert!(out
        .join(format!("checkpoint-{steps}/train_state.json"))
        .is_file());
    assert!(!out.join(ADAPTER).exists());

    let resumed = [args, vec!["--resume".into(), out.display().to_string()]].concat();
    ok(mpirun(&[(2, &resumed)]));
    let steps: Vec<u64> = losses(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    assert!(out.join(ADAPTER).is_file());
}

/// Ranks given different data are refused at the start, naming the rank.
#[test]
fn ranks_with_other_data_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = on_device_0(&lora_args(&out));
    let other = tmp.path().join("other.jsonl");
    let rows = std::fs::read_to_string(tmp.path().join("short.jsonl")).unwrap();
    std::fs::write(&other, rows.replace("plus", "and")).unwrap();
    let data = |path: &Path| {
        args.iter()
            .map(|a| match a.ends_with("short.jsonl") {
                true => path.display().to_string(),
                false => a.clone(),
            })
            .collect::<Vec<String>>()
    };
    let err = failed(mpirun(&[
        (1, &data(&tmp.path().join("short.jsonl"))),
        (1, &data(&other)),
    ]));
    assert!(
        err.contains(
            "rank 1 of 2 failed, so every rank stopped: its settings, model or data \
                      differ from rank 0's"
        ),
        "{err}"
    );
}

/// `--dry-run` on 2 ranks: each rank's peak memory and the bytes summed per step, printed once.
#[test]
fn dry_run_reports_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args = on_device_0(&lora_args(&out));
    args.push("--dry-run".into());
    let stdout = ok(mpirun(&[(2, &args)]));
    eprintln!("{stdout}");
    assert_eq!(stdout.matches("peak device memory per rank:").count(), 1);
    // Each rank runs one micro-batch of the same rows: the same memory.
    let peaks = stdout.split("peak device memory per rank:").nth(1).unwrap();
    let words: Vec<&str> = peaks.lines().next().unwrap().split_whitespace().collect();
    let mib: Vec<&str> = words
        .windows(2)
        .filter(|w| w[1] == "MiB")
        .map(|w| w[0])
        .collect();
    assert!(mib.len() == 2 && mib[0] == mib[1], "{peaks}");
    assert!(
        stdout.contains("2 ranks sum") && stdout.contains(" rank 1 "),
        "{stdout}"
    );
    assert!(!out.exists(), "a dry run writes nothing");
}
