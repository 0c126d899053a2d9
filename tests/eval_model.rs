//! `wgtrain eval --model` end to end on the tiny random-weight fixture: its answers are wrong, so
//! these tests check the structure of the results, resuming, and refusing to mix runs.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use wgtrain::data::chat::ChatEncoder;
use wgtrain::eval::prompt::{messages, NamedPrompt, SKY_T1_SYSTEM_PROMPT};

mod common;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    repo().join("tests/fixtures/tiny-qwen2-tied")
}

fn shared(path: &str) -> PathBuf {
    common::shared().join(path)
}

fn wgtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run wgtrain")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `wgtrain eval --model tiny --bench .. --output ..` with `extra`; unless `extra` sets them,
/// 4 new tokens and a short system prompt (quick prefill).
fn run_eval(bench: &Path, out: &Path, extra: &[&str]) -> Output {
    let (model, bench, out) = (model(), bench.to_owned(), out.to_owned());
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--bench",
        bench.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    for (flag, value) in [("--max-new-tokens", "4"), ("--system", "Answer briefly.")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend(extra);
    wgtrain(&args)
}

/// `run_eval` that must succeed; returns stdout.
fn eval(bench: &Path, out: &Path, extra: &[&str]) -> String {
    let output = run_eval(bench, out, extra);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    stdout
}

/// `run_eval` that must fail cleanly; returns stderr.
fn eval_error(bench: &Path, out: &Path, extra: &[&str]) -> String {
    let output = run_eval(bench, out, extra);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// Ids of every kind the benchmark files use; answers as strings, numbers and OlympiadBench lists.
fn write_bench(dir: &Path, name: &str) -> PathBuf {
    let rows = [
        json!({"id": "b", "problem": "What is $1+1$?", "answer": "2"}),
        json!({"id": 7, "problem": "What is $2 \\cdot 3$?", "answer": 6}),
        json!({"unique_id": "test/x/1.json", "problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}"}),
        json!({"idx": 3, "question": "Solve $x+1=0$.", "final_answer": ["$-1$"]}),
    ];
    let path = dir.join(name);
    let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Every summary number follows from the rows.
fn check_summary(summary: &Value, rows: &[Value]) {
    let n = rows.len();
    let correct = rows.iter().filter(|r| r["correct"] == true).count();
    let tokens: u64 = rows.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
    let seconds: f64 = rows.iter().map(|r| r["seconds"].as_f64().unwrap()).sum();
    assert_eq!(summary["n"], n);
    assert_eq!(summary["correct"], correct);
    assert_eq!(summary["accuracy"], correct as f64 / n as f64);
    let no_answer = rows.iter().filter(|r| r["extracted"] == "").count();
    assert_eq!(summary["no_answer"], no_answer);
    let mean_tokens = summary["mean_output_tokens"].as_f64().unwrap();
    assert!((mean_tokens - tokens as f64 / n as f64).abs() < 1e-9);
    assert_eq!(summary["generated_tokens"], tokens);
    let rate = summary["tokens_per_second"].as_f64().unwrap();
    assert!(rate > 0.0 && (rate - tokens as f64 / seconds).abs() < 1e-6 * rate);
}

#[test]
fn sky_t1_prompt_is_the_shared_file_byte_for_byte() {
    let path = shared("sky_t1_system_prompt.txt");
    let file = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{} must exist (the shared data directory: $WGTRAIN_SHARED, else ../shared): {e}",
            path.display()
        )
    });
    assert_eq!(SKY_T1_SYSTEM_PROMPT.as_bytes(), file.as_slice());
}

#[test]
fn prompt_is_the_system_prompt_then_the_problem_and_the_generation_prompt() {
    let encoder = ChatEncoder::load(model()).unwrap();
    let rendered = encoder
        .template()
        .render(&messages(SKY_T1_SYSTEM_PROMPT, "What is $1+1$?"), true)
        .unwrap();
    let want = format!(
        "<|im_start|>system\n{SKY_T1_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is $1+1$?\
         <|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(rendered, want);
}

/// The prompt ids of `--prompt sky-t1-harness` are the harness's "Sky-T1" template rendered with
/// the real Qwen2.5 tokenizer (tests/fixtures/harness_prompt_ids.json, by
/// scripts/fixtures/harness_prompt_ids.py); the braced training copy gives other ids.
#[test]
fn harness_prompt_ids_match_the_qwen25_math_harness() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/harness_prompt_ids.json")).unwrap(),
    )
    .unwrap();
    let encoder = ChatEncoder::load(shared("tokenizers/qwen2.5")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let bench = shared(&format!("bench/{}", case["bench"].as_str().unwrap()));
        let problems = wgtrain::eval::bench::load(&bench).unwrap();
        let problem = &problems[case["row"].as_u64().unwrap() as usize].problem;
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect();
        let ids = |prompt: NamedPrompt| {
            encoder
                .apply_chat_template(&messages(&prompt.system(), problem), true)
                .unwrap()
        };
        assert_eq!(ids(NamedPrompt::SkyT1Harness), want, "{}", bench.display());
        assert_ne!(ids(NamedPrompt::SkyT1Train), want);
    }
}

#[test]
fn eval_writes_graded_rows_in_input_order_and_a_consistent_summary() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write_bench(dir.path(), "tiny.jsonl");
    let out = dir.path().join("out");
    let stdout = eval(&bench, &out, &["--limit", "3"]);

    let rows = rows(&out);
    let ids: Vec<&Value> = rows.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!("b"), &json!(7), &json!("test/x/1.json")]);
    let truths: Vec<&Value> = rows.iter().map(|r| &r["ground_truth"]).collect();
    assert_eq!(truths, [&json!("2"), &json!("6"), &json!("\\frac{1}{2}")]);
    for row in &rows {
        assert!(row["correct"].is_boolean(), "{row}");
        assert!(row["generation"].is_string() && row["extracted"].is_string());
        let tokens = row["tokens"].as_u64().unwrap();
        assert!((1..=4).contains(&tokens), "{row}");
        assert_eq!(row["truncated"], tokens == 4, "{row}");
        assert!(row.get("more_samples").is_none());
    }
    let summary = summary(&out);
    check_summary(&summary, &rows);
    assert_eq!(summary["bench"], "tiny");
    assert_eq!(summary["samples_per_problem"], 1);
    assert_eq!(summary["mean_sample_accuracy"], summary["accuracy"]);
    assert_eq!(summary["generated_this_run"], 3);

    assert!(
        stdout.contains("tiny: 3 problems, 1 sample(s) each"),
        "{stdout}"
    );
    assert!(
        stdout.contains("accuracy") && stdout.contains("mean tokens"),
        "{stdout}"
    );
    let table_row = format!("     3  {:>7}", summary["correct"].as_u64().unwrap());
    assert!(stdout.contains(&table_row), "{stdout}");
    assert!(
        stdout.contains("tokens/s (3 generated now, 0 resumed)"),
        "{stdout}"
    );

    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["bench"], "tiny");
    assert_eq!(run["bench_problems"], 4);
    assert_eq!(run["system_prompt"], "Answer briefly.");
    assert_eq!(
        (&run["prompt"], &summary["prompt"]),
        (&json!("custom"), &json!("custom"))
    );
    let both = run_eval(&bench, &out, &["--prompt", "sky-t1-train"]);
    assert!(
        !both.status.success(),
        "--prompt and --system together are refused"
    );
}

#[test]
fn eval_on_aime24_uses_the_harness_sky_t1_prompt_by_default() {
    let bench = shared("bench/aime24.jsonl");
    assert!(
        bench.exists(),
        "{} must exist (the shared data directory: $WGTRAIN_SHARED, else ../shared)",
        bench.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("aime");
    let (model, bench_arg, out_arg) = (model(), bench.to_str().unwrap(), out.to_str().unwrap());
    let output = wgtrain(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--bench",
        bench_arg,
        "--output",
        out_arg,
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let rows = rows(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!((&rows[0]["id"], &rows[1]["id"]), (&json!(60), &json!(61)));
    assert_eq!(
        (&rows[0]["ground_truth"], &rows[1]["ground_truth"]),
        (&json!("204"), &json!("113"))
    );
    let summary = summary(&out);
    check_summary(&summary, &rows);
    assert_eq!(summary["bench"], "aime24");
    assert_eq!(summary["prompt"], "sky-t1-harness");
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["prompt"], "sky-t1-harness");
    assert_eq!(run["system_prompt"], NamedPrompt::SkyT1Harness.system());
    assert!(!NamedPrompt::SkyT1Harness.system().contains('{'));
    assert_eq!(run["bench_problems"], 30);
}

/// Same rows as a fresh run except for timings (of every sample).
fn without_seconds(mut rows: Vec<Value>) -> Vec<Value> {
    for row in &mut rows {
        row.as_object_mut().unwrap().remove("seconds");
        let samples = row.get_mut("more_samples").and_then(Value::as_array_mut);
        for sample in samples.into_iter().flatten() {
            sample.as_object_mut().unwrap().remove("seconds");
        }
    }
    rows
}

#[test]
fn eval_resumes_after_finished_rows_and_refuses_other_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write_bench(dir.path(), "tiny.jsonl");
    let out = dir.path().join("out");
    eval(&bench, &out, &["--limit", "2"]);
    let first = std::fs::read_to_string(out.join("results.jsonl")).unwrap();

    let stdout = eval(&bench, &out, &["--limit", "3"]);
    let resumed = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert!(resumed.starts_with(&first), "{first}\n{resumed}");
    assert_eq!(summary(&out)["generated_this_run"], 1);
    assert!(stdout.contains("(1 generated now, 2 resumed)"), "{stdout}");
    check_summary(&summary(&out), &rows(&out));

    // A row cut off by a crash is dropped and generated again.
    let cut = resumed.len() - resumed.lines().last().unwrap().len() / 2 - 1;
    std::fs::write(out.join("results.jsonl"), &resumed[..cut]).unwrap();
    eval(&bench, &out, &["--limit", "3"]);
    assert_eq!(summary(&out)["generated_this_run"], 1);
    let resumed_rows = rows(&out);
    assert_eq!(resumed_rows.len(), 3);

    // Greedy resumed rows equal those of one uninterrupted run.
    let fresh = dir.path().join("fresh");
    eval(&bench, &fresh, &["--limit", "3"]);
    assert_eq!(without_seconds(resumed_rows), without_seconds(rows(&fresh)));

    // Nothing left to do: no generation, same summary.
    eval(&bench, &out, &["--limit", "3"]);
    assert_eq!(summary(&out)["generated_this_run"], 0);
    assert_eq!(summary(&out)["n"], 3);

    // Another benchmark, or other decoding settings, into the same directory.
    let other = write_bench(dir.path(), "other.jsonl");
    let err = eval_error(&other, &out, &["--limit", "3"]);
    assert!(
        err.contains("different run") && err.contains("bench: was \"tiny\""),
        "{err}"
    );
    let err = eval_error(&bench, &out, &["--limit", "3", "--max-new-tokens", "5"]);
    assert!(err.contains("max_new_tokens: was 4, now 5"), "{err}");
    assert_eq!(
        rows(&out).len(),
        3,
        "a refused run leaves the results alone"
    );

    // --overwrite starts over.
    eval(&other, &out, &["--limit", "1", "--overwrite"]);
    assert_eq!(rows(&out).len(), 1);
    assert_eq!(summary(&out)["generated_this_run"], 1);

    // A directory not written by eval --model is never mixed into.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = eval_error(&bench, &foreign, &[]);
    assert!(err.contains("has no run.json"), "{err}");
}

/// Each (problem, sample) sequence has its own slot and sampler: the rows are the same whether
/// the sequences are generated one at a time or together (greedy, and sampled), and so are the
/// rows of a run resumed with another batch size.
#[test]
fn rows_do_not_depend_on_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write_bench(dir.path(), "tiny.jsonl");
    let sampled = ["--samples", "2", "--temperature", "1.0", "--seed", "3"];
    for (name, extra) in [("greedy", &[][..]), ("sampled", &sampled[..])] {
        let run = |out: &str, batch_size: &str| {
            let out = dir.path().join(format!("{name}-{out}"));
            let args = [
                extra,
                &["--max-new-tokens", "6", "--batch-size", batch_size],
            ]
            .concat();
            eval(&bench, &out, &args);
            without_seconds(rows(&out))
        };
        let one = run("one", "1");
        assert_eq!(one.len(), 4);
        assert_eq!(run("all", "16"), one, "{name}");
        let out = dir.path().join(format!("{name}-resumed"));
        let args = [extra, &["--max-new-tokens", "6"]].concat();
        eval(&bench, &out, &[&args[..], &["--limit", "1"]].concat());
        let stdout = eval(&bench, &out, &[&args[..], &["--batch-size", "2"]].concat());
        assert!(stdout.contains("(3 generated now, 1 resumed)"), "{stdout}");
        assert_eq!(without_seconds(rows(&out)), one, "{name} resumed");
    }
}

#[test]
fn samples_add_more_generations_and_a_mean_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write_bench(dir.path(), "tiny.jsonl");
    let out = dir.path().join("out");
    let args = ["--limit", "1", "--samples", "3", "--temperature", "1.0"];
    let stdout = eval(&bench, &out, &[&args[..], &["--seed", "5"]].concat());
    let rows = rows(&out);
    assert_eq!(rows.len(), 1);
    let more = rows[0]["more_samples"].as_array().unwrap();
    assert_eq!(more.len(), 2);
    for sample in more {
        assert!(sample["correct"].is_boolean() && sample["generation"].is_string());
    }
    let summary = summary(&out);
    assert_eq!(summary["samples_per_problem"], 3);
    let correct = more.iter().filter(|s| s["correct"] == true).count()
        + usize::from(rows[0]["correct"] == true);
    assert_eq!(summary["mean_sample_accuracy"], correct as f64 / 3.0);
    assert!(
        stdout.contains("mean accuracy over all samples"),
        "{stdout}"
    );

    let err = eval_error(&bench, &dir.path().join("greedy"), &["--samples", "2"]);
    assert!(err.contains("--temperature"), "{err}");
}
