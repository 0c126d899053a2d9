//! The grader against its oracle: every row of ../shared/grader-cases, graded by the Qwen2.5-Math
//! harness itself (`pred[0]` its extracted answer, `score[0]` its verdict).
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use wgtrain::eval::grader::{self, Benchmark, GroundTruth};

mod common;
use common::shared as shared_dir;

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

/// The benchmark of a grader-case file named `<model>_<data_name>.jsonl` (the longest harness
/// name that ends the stem, so `x_minerva_math` is minerva_math, not math).
fn benchmark_of(file: &Path) -> Benchmark {
    let stem = file.file_stem().unwrap().to_string_lossy();
    grader::BENCHMARK_NAMES
        .iter()
        .filter(|name| stem.ends_with(&format!("_{name}")))
        .max_by_key(|name| name.len())
        .and_then(|name| Benchmark::named(name))
        .unwrap_or_else(|| {
            panic!(
                "{}: no harness benchmark name ends the file name",
                file.display()
            )
        })
}

#[test]
fn agrees_with_the_harness_on_every_grader_case() {
    let (mut rows, mut agreed, mut same_extraction) = (0, 0, 0);
    for file in grader_case_files() {
        let text = std::fs::read_to_string(&file).expect("read grader cases");
        let benchmark = benchmark_of(&file);
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
            let ground_truth = GroundTruth {
                answer: row["gt"].as_str().expect("gt is a string").to_string(),
                cot: row["gt_cot"].as_str().map(str::to_string),
            };

            let grade = grader::grade_for(&generation, &ground_truth, benchmark);
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
        let file_agreement = file_agreed as f64 / file_rows as f64;
        println!(
            "{:<45} rows {:>4}  agreement {:>4} ({:.1}%)  same extraction {:>4} ({:.1}%)",
            file.file_name().unwrap().to_string_lossy(),
            file_rows,
            file_agreed,
            100.0 * file_agreement,
            file_extracted,
            100.0 * file_extracted as f64 / file_rows as f64
        );
        assert!(
            file_agreement >= 0.99,
            "{}: agreement with the harness {:.2}% < 99%",
            file.display(),
            100.0 * file_agreement
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
        agreement >= 0.995,
        "agreement with the harness {:.2}% < 99.5%",
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

fn named(name: &str) -> Benchmark {
    Benchmark::named(name).unwrap_or_else(|| panic!("{name} is a harness benchmark"))
}

/// Grades a generation against a benchmark row the way the harness does: `parse_ground_truth`
/// on the row, then extraction and comparison with that benchmark's rules.
fn grade_row(generation: &str, row: &Value, benchmark: &str) -> grader::Grade {
    let benchmark = named(benchmark);
    let ground_truth = grader::parse_ground_truth(row, benchmark).unwrap();
    grader::grade_for(generation, &ground_truth, benchmark)
}

#[test]
fn minerva_math_keeps_variables_that_look_like_units() {
    // Minerva's ground truth is the boxed answer of its `solution`, kept as extracted.
    let cases = [
        (
            "\\boxed{\\frac{1}{s}}",
            "The period is $\\boxed{\\frac{1}{s}}$.",
        ),
        ("\\boxed{e^{t}}", "So $x(t) = \\boxed{e^{t}}$."),
        ("\\boxed{2 c d}", "The final answer is $\\boxed{2cd}$."),
        (
            "\\boxed{\\frac{m}{s}}",
            "The final answer is $\\frac{m}{s}$. I hope it is correct.",
        ),
    ];
    for (solution, generation) in cases {
        let row = json!({"solution": solution});
        let minerva = grade_row(generation, &row, "minerva_math");
        assert!(minerva.correct, "{generation}: {minerva:?}");
        assert!(
            ["s}", "t}", "cd", "m}"]
                .iter()
                .any(|v| minerva.extracted.contains(v)),
            "{minerva:?}"
        );
    }
    // The unit words still go in `math`: 1/s loses its s, and a wrong 1/t then equals it.
    let row = json!({"solution": "$\\boxed{\\frac{1}{s}}$"});
    let wrong = "$\\boxed{\\frac{1}{t}}$";
    assert!(grade_row(wrong, &row, "math").correct);
    assert!(!grade_row(wrong, &row, "minerva_math").correct);
    // Units in a trailing \text{} are dropped for Minerva too.
    let row = json!({"solution": "The answer is $\\boxed{4.5}$."});
    assert!(grade_row("$\\boxed{4.5 \\text{ s}}$", &row, "minerva_math").correct);
}

#[test]
fn ground_truths_are_parsed_per_benchmark() {
    // math reads the boxed answer of `solution`; math500 its `answer`.
    let row = json!({"solution": "Hence $\\boxed{\\frac{3}{4}}$.", "answer": "7"});
    let math = grader::parse_ground_truth(&row, named("math")).unwrap();
    assert_eq!(math.answer, "\\frac{3}{4}");
    assert_eq!(
        grader::parse_ground_truth(&row, named("math500"))
            .unwrap()
            .answer,
        "7"
    );
    assert!(grade_row("\\boxed{0.75}", &row, "math").correct);
    assert!(!grade_row("\\boxed{0.75}", &row, "math500").correct);
    // gsm8k: the text after "####".
    let row = json!({"answer": "3 + 4 = 7 apples\n#### 1,250"});
    let gsm8k = grader::parse_ground_truth(&row, named("gsm8k")).unwrap();
    assert_eq!(gsm8k.answer, "1,250");
    assert!(grade_row("So she has 1250 apples.", &row, "gsm8k").correct);
    assert!(!grade_row("So she has 7 apples.", &row, "gsm8k").correct);
    // olympiadbench: the first item of `final_answer` without its `$`.
    let row = json!({"final_answer": ["$\\frac{1}{2 n+2}$", "$7$"]});
    let olympiad = grader::parse_ground_truth(&row, named("olympiadbench")).unwrap();
    assert_eq!(olympiad.answer, "\\frac{1}{2n+2}");
    assert!(grade_row("\\boxed{\\frac{1}{2n+2}}", &row, "olympiadbench").correct);
    // Multiple choice: aqua's `correct`, mmlu's index into ABCD.
    let row = json!({"correct": "C"});
    assert!(grade_row("Option (C) is right.", &row, "aqua").correct);
    let row = json!({"answer": 3});
    assert!(grade_row("It must be D.", &row, "mmlu_stem").correct);
    // asdiv drops parenthesised units, tabmwp turns numeric answers into floats.
    let row = json!({"formula": "5*3=15", "answer": "15 (apples)"});
    assert!(grade_row("\\boxed{15}", &row, "asdiv").correct);
    let row = json!({"solution": "", "answer": "3/4", "ans_type": "decimal_number"});
    assert_eq!(
        grader::parse_ground_truth(&row, named("tabmwp"))
            .unwrap()
            .answer,
        "0.75"
    );
}

#[test]
fn a_benchmark_row_without_its_reference_key_is_an_error() {
    let row = json!({"answer": "5"});
    for (benchmark, key) in [
        ("math", "solution"),
        ("minerva_math", "solution"),
        ("aqua", "correct"),
    ] {
        let err = grader::parse_ground_truth(&row, named(benchmark)).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains(benchmark) && message.contains(key),
            "{message}"
        );
    }
    let row = json!({"answer": "no marker"});
    let err = grader::parse_ground_truth(&row, named("gsm8k")).unwrap_err();
    assert!(format!("{err:#}").contains("####"), "{err:#}");
}

#[test]
fn harness_rows_of_math_take_the_reference_from_gt_cot() {
    // evaluate.py re-extracts a `math` reference from the stored solution, and keeps a
    // minerva_math one as stored (no second normalisation).
    let ground_truth = GroundTruth {
        answer: "stale".to_string(),
        cot: Some("so $\\boxed{12}$".to_string()),
    };
    assert!(grader::grade_for("\\boxed{12}", &ground_truth, named("math")).correct);
    assert!(!grader::grade_for("\\boxed{12}", &ground_truth, named("math500")).correct);
    let stored = GroundTruth {
        answer: "\\frac{1}{s}".to_string(),
        cot: Some("None".to_string()),
    };
    assert_eq!(stored.reference(named("minerva_math")), "\\frac{1}{s}");
    assert_eq!(stored.reference(named("math500")), "\\frac{1}{}");
}

fn write_harness_rows(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let row = json!({"idx": 0, "gt_cot": "$\\boxed{\\frac{1}{s}}$", "gt": "\\frac{1}{s}",
        "code": ["The answer is $\\boxed{\\frac{1}{s}}$."], "pred": ["\\frac{1}{s}"], "score": [true]});
    std::fs::write(path, format!("{row}\n")).unwrap();
}

fn graded(output: &Path) -> Value {
    let results = std::fs::read_to_string(output.join("results.jsonl")).unwrap();
    serde_json::from_str(results.lines().next().unwrap()).unwrap()
}

#[test]
fn eval_grade_takes_the_benchmark_name_or_the_harness_directory() {
    let dir = tempfile::tempdir().unwrap();
    // The harness's own layout: <output_dir>/<data_name>/test_<prompt_type>_..._s0_e-1.jsonl.
    let harness = dir
        .path()
        .join("minerva_math/test_qwen25-math-cot_-1_seed0_t0.0_s0_e-1.jsonl");
    write_harness_rows(&harness);
    let inferred = dir.path().join("inferred");
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        harness.as_os_str(),
        "--output".as_ref(),
        inferred.as_os_str(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("minerva_math rules"));
    assert_eq!(graded(&inferred)["extracted"], "\\frac{1}{s}");
    assert_eq!(graded(&inferred)["correct"], true);

    // Elsewhere the default rules apply, and say so; --name picks the benchmark's.
    let elsewhere = dir.path().join("minerva.jsonl");
    write_harness_rows(&elsewhere);
    let default = dir.path().join("default");
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        elsewhere.as_os_str(),
        "--output".as_ref(),
        default.as_os_str(),
    ]);
    assert!(run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("default rules"));
    assert_eq!(graded(&default)["extracted"], "\\frac{1}{}");
    let named_output = dir.path().join("named");
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        elsewhere.as_os_str(),
        "--name".as_ref(),
        "minerva_math".as_ref(),
        "--output".as_ref(),
        named_output.as_os_str(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(graded(&named_output)["extracted"], "\\frac{1}{s}");

    // An unknown name is refused, naming the known ones; nothing is written.
    let refused = dir.path().join("refused");
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        elsewhere.as_os_str(),
        "--name".as_ref(),
        "minerva".as_ref(),
        "--output".as_ref(),
        refused.as_os_str(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("\"minerva\"") && stderr.contains("minerva_math"),
        "{stderr}"
    );
    assert!(!refused.exists());

    // Simple rows are parsed with the benchmark's ground-truth rules: math needs `solution`.
    let simple = dir.path().join("simple.jsonl");
    std::fs::write(&simple, r#"{"generation": "\\boxed{2}", "answer": "2"}"#).unwrap();
    let run = wgtrain(&[
        "eval".as_ref(),
        "--grade".as_ref(),
        simple.as_os_str(),
        "--name".as_ref(),
        "math".as_ref(),
        "--output".as_ref(),
        dir.path().join("simple").as_os_str(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("simple.jsonl:1") && stderr.contains("\"solution\""),
        "{stderr}"
    );
}
