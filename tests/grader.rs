//! The grader against its oracle: every row of ../shared/grader-cases, graded by the Qwen2.5-Math
//! harness itself (`pred[0]` its extracted answer, `score[0]` its verdict).
use serde_json::Value;
use std::path::{Path, PathBuf};
use wgtrain::eval::grader;

fn shared_dir() -> PathBuf {
    match std::env::var_os("WGTRAIN_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

fn grader_case_files() -> Vec<PathBuf> {
    let dir = shared_dir().join("grader-cases");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| {
        panic!(
            "the grader's oracle is missing: cannot read {} ({err}); set WGTRAIN_SHARED to the \
             shared data directory",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.jsonl grader cases in {}",
        dir.display()
    );
    files
}

fn first_string(row: &Value, field: &str) -> String {
    match &row[field] {
        Value::Array(items) => items
            .first()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        other => other.as_str().unwrap_or_default().to_string(),
    }
}

#[test]
fn agrees_with_the_harness_on_every_grader_case() {
    let (mut rows, mut agreed, mut same_extraction) = (0, 0, 0);
    for file in grader_case_files() {
        let text = std::fs::read_to_string(&file).expect("read grader cases");
        let (mut file_rows, mut file_agreed, mut file_extracted) = (0, 0, 0);
        for (line, row) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let row: Value = serde_json::from_str(row)
                .unwrap_or_else(|err| panic!("{}:{}: {err}", file.display(), line + 1));
            let generation = first_string(&row, "code");
            let harness_answer = first_string(&row, "pred");
            let harness_verdict = row["score"][0].as_bool().expect("score[0] is a boolean");
            let gt = row["gt"].as_str().expect("gt is a string");

            let grade = grader::grade(&generation, gt);
            file_rows += 1;
            file_extracted += usize::from(grade.extracted == harness_answer);
            if grade.correct == harness_verdict {
                file_agreed += 1;
            } else {
                println!(
                    "  disagreement {}:{} idx {}: gt {:?} ours {:?} -> {} | harness {:?} -> {}",
                    file.file_name().unwrap().to_string_lossy(),
                    line + 1,
                    row["idx"],
                    grade.ground_truth,
                    grade.extracted,
                    grade.correct,
                    harness_answer,
                    harness_verdict
                );
            }
        }
        println!(
            "{:<45} rows {:>4}  agreement {:>4} ({:.1}%)  same extraction {:>4} ({:.1}%)",
            file.file_name().unwrap().to_string_lossy(),
            file_rows,
            file_agreed,
            100.0 * file_agreed as f64 / file_rows as f64,
            file_extracted,
            100.0 * file_extracted as f64 / file_rows as f64
        );
        rows += file_rows;
        agreed += file_agreed;
        same_extraction += file_extracted;
    }
    let agreement = agreed as f64 / rows as f64;
    println!(
        "overall: rows {rows}  agreement {agreed} ({:.2}%)  same extraction {same_extraction} ({:.2}%)",
        100.0 * agreement,
        100.0 * same_extraction as f64 / rows as f64
    );
    assert!(
        agreement >= 0.99,
        "agreement with the harness {:.2}% < 99%",
        100.0 * agreement
    );
}

fn wgtrain(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .args(args)
        .output()
        .expect("run wgtrain")
}

#[test]
fn eval_grade_writes_results_and_summary_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    for file in grader_case_files() {
        let rows: Vec<Value> = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let harness_correct = rows
            .iter()
            .filter(|r| r["score"][0] == Value::Bool(true))
            .count();
        let output = dir.path().join(file.file_stem().unwrap());
        let run = wgtrain(&[
            "eval".as_ref(),
            "--grade".as_ref(),
            file.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            stdout.contains("accuracy") && stdout.contains(&rows.len().to_string()),
            "{stdout}"
        );

        let results: Vec<Value> = std::fs::read_to_string(output.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(results.len(), rows.len(), "one result per input row");
        for (result, row) in results.iter().zip(&rows) {
            assert_eq!(result["id"], row["idx"], "results keep the input order");
            assert_eq!(result["generation"], row["code"][0]);
            assert!(result["correct"].is_boolean() && result["extracted"].is_string());
        }
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(output.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["n"], rows.len());
        let correct = summary["correct"].as_u64().unwrap() as usize;
        assert_eq!(
            correct,
            results.iter().filter(|r| r["correct"] == true).count()
        );
        assert!(
            correct.abs_diff(harness_correct) * 100 <= rows.len(),
            "{}: {correct} correct, the harness says {harness_correct}",
            file.display()
        );
        let accuracy = summary["accuracy"].as_f64().unwrap();
        assert!((accuracy - correct as f64 / rows.len() as f64).abs() < 1e-12);

        // The output directory is not reused without --overwrite.
        let again = wgtrain(&[
            "eval".as_ref(),
            "--grade".as_ref(),
            file.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    }
}

#[test]
fn eval_grade_reads_simple_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("generations.jsonl");
    let rows = [
        r#"{"id": "a", "generation": "So $x = \\boxed{\\dfrac{1}{2}}$.", "answer": "0.5", "tokens": 12}"#,
        r#"{"id": "b", "generation": "The answer is 27.", "answer": 27.0, "tokens": 8}"#,
        r#"{"generation": "\\boxed{3}", "final_answer": ["$\\sqrt{9}+1$"], "tokens": 4}"#,
    ];
    std::fs::write(&input, rows.join("\n")).unwrap();
    let output = dir.path().join("out");
    std::fs::create_dir(&output).unwrap();
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        input.as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
        "--overwrite".as_ref(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Vec<Value> = std::fs::read_to_string(output.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdicts: Vec<(&Value, bool)> = results
        .iter()
        .map(|r| (&r["id"], r["correct"] == true))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (&Value::from("a"), true),
            (&Value::from("b"), true),
            (&Value::from(2), false)
        ]
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["correct"], 2);
    assert_eq!(summary["mean_output_tokens"], 8.0);
}

#[test]
fn benchmark_files_load_and_math500_solutions_grade_correct() {
    let bench = shared_dir().join("bench");
    let expected = [
        ("aime24", 30),
        ("amc23", 40),
        ("math500", 500),
        ("olympiadbench", 675),
    ];
    for (name, count) in expected {
        let problems = wgtrain::eval::bench::load(bench.join(format!("{name}.jsonl")))
            .unwrap_or_else(|err| {
                panic!("{name}: {err:#} (set WGTRAIN_SHARED to the shared data directory)")
            });
        assert_eq!(problems.len(), count, "{name}");
        assert!(
            problems
                .iter()
                .all(|p| !p.problem.is_empty() && !p.answer.is_empty()),
            "{name}"
        );
    }
    let olympiad = wgtrain::eval::bench::load(bench.join("olympiadbench.jsonl")).unwrap();
    assert_eq!(
        olympiad[1].answer, "\\frac{1}{2 n+2}",
        "final_answer[0] without its $"
    );
    let amc = wgtrain::eval::bench::load(bench.join("amc23.jsonl")).unwrap();
    assert_eq!(amc[0].answer, "27.0", "numbers as Python prints them");

    // MATH-500's reference solutions end in \boxed{answer}: the grader must accept them.
    let text = std::fs::read_to_string(bench.join("math500.jsonl")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let accepted = rows
        .iter()
        .filter(|row| {
            grader::grade(
                row["solution"].as_str().unwrap(),
                row["answer"].as_str().unwrap(),
            )
            .correct
        })
        .count();
    println!(
        "MATH-500 reference solutions graded correct: {accepted}/{}",
        rows.len()
    );
    assert_eq!(accepted, rows.len());
}
