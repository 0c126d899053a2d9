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
    assert!(!files.is_empty(), "no *.jsonl grader cases in {}", dir.display());
    files
}

fn first_string(row: &Value, field: &str) -> String {
    match &row[field] {
        Value::Array(items) => items.first().and_then(Value::as_str).unwrap_or_default().to_string(),
        other => other.as_str().unwrap_or_default().to_string(),
    }
}

#[test]
fn agrees_with_the_harness_on_every_grader_case() {
    let (mut rows, mut agreed, mut same_extraction) = (0, 0, 0);
    for file in grader_case_files() {
        let text = std::fs::read_to_string(&file).expect("read grader cases");
        let (mut file_rows, mut file_agreed, mut file_extracted) = (0, 0, 0);
        for (line, row) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
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
    assert!(agreement >= 0.99, "agreement with the harness {:.2}% < 99%", 100.0 * agreement);
}
