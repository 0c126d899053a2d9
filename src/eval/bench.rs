//! Benchmark files as in ../shared/bench (AIME 2024, AMC 2023, MATH-500, OlympiadBench): JSON
//! Lines (or a JSON array) with the problem in `problem` or `question` and the answer in `answer`
//! or OlympiadBench's `final_answer` list.
use crate::data::jsonfile;
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::path::Path;

/// One benchmark problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// `id`, `unique_id` or `idx` as written in the file (JSON), else the row's position.
    pub id: Value,
    pub problem: String,
    /// The reference answer, raw (the grader normalises it).
    pub answer: String,
}

/// Reads every problem of a benchmark file; a row without a problem or an answer is an error
/// naming the file and line.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<Problem>> {
    let path = path.as_ref();
    let (_, rows) = jsonfile::read_rows(path)?;
    rows.into_iter()
        .enumerate()
        .map(|(index, row)| {
            let at = || format!("{}:{}: row {index}", path.display(), row.line);
            let problem = ["problem", "question"]
                .iter()
                .find_map(|key| row.value.get(*key).and_then(Value::as_str))
                .ok_or_else(|| anyhow!("{}: no \"problem\" or \"question\" text", at()))?;
            let answer = reference_answer(&row.value)
                .ok_or_else(|| anyhow!("{}: no \"answer\" or \"final_answer\"", at()))?;
            Ok(Problem {
                id: row_id(&row.value).unwrap_or_else(|| Value::from(index)),
                problem: problem.to_string(),
                answer,
            })
        })
        .collect()
}

/// The reference answer of a row: `answer` (a string, or a number as Python prints it), else
/// the first element of `final_answer` without its `$` delimiters (how the harness reads
/// OlympiadBench).
pub fn reference_answer(row: &Value) -> Option<String> {
    match row.get("answer") {
        Some(Value::String(answer)) => return Some(answer.clone()),
        Some(Value::Number(answer)) => return Some(answer.to_string()),
        _ => {}
    }
    let first = row.get("final_answer")?.as_array()?.first()?;
    Some(first.as_str()?.trim_matches('$').to_string())
}

/// `id`, `unique_id` or `idx`, whichever the row has first.
pub fn row_id(row: &Value) -> Option<Value> {
    ["id", "unique_id", "idx"].iter().find_map(|key| {
        row.get(*key)
            .filter(|id| id.is_string() || id.is_number())
            .cloned()
    })
}
