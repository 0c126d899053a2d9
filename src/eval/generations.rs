//! Generations to grade, read from a file: rows of the Qwen2.5-Math harness's output or simple
//! `{"generation": ..., "answer": ...}` rows.
use super::bench;
use super::grader::{parse_ground_truth, python_str, Benchmark, GroundTruth};
use crate::data::jsonfile;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One model output with the answer it should reach.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub id: Value,
    pub text: String,
    pub ground_truth: GroundTruth,
    /// Output length in tokens, when known.
    pub tokens: Option<u64>,
}

/// Reads generations to grade: harness rows (`code[0]` the generation, `gt` and `gt_cot` the
/// ground truth as the harness stored it) or simple rows (`generation` and the benchmark's own
/// reference fields, parsed by `benchmark`'s rules: `answer` or `final_answer` by default), with
/// an optional `id`/`idx` and `tokens`. A JSON array or JSON Lines.
pub fn load_generations(path: impl AsRef<Path>, benchmark: Benchmark) -> Result<Vec<Generation>> {
    let path = path.as_ref();
    let (_, rows) = jsonfile::read_rows(path)?;
    rows.into_iter()
        .enumerate()
        .map(|(index, row)| {
            let at = || format!("{}:{}: row {index}", path.display(), row.line);
            let value = &row.value;
            let text = match (value.get("generation"), value.get("code")) {
                (Some(Value::String(text)), _) | (None, Some(Value::String(text))) => text.clone(),
                (None, Some(Value::Array(samples))) => samples
                    .first()
                    .and_then(Value::as_str)
                    .with_context(|| format!("{}: \"code\" must hold a string first", at()))?
                    .to_string(),
                _ => bail!(
                    "{}: needs a string \"generation\" (or harness \"code\")",
                    at()
                ),
            };
            let ground_truth = match value.get("gt") {
                Some(gt) => GroundTruth {
                    answer: python_str(Some(gt)).with_context(|| {
                        format!("{}: harness \"gt\" must be a string or a number", at())
                    })?,
                    cot: python_str(value.get("gt_cot")),
                },
                None => parse_ground_truth(value, benchmark)
                    .with_context(|| format!("{}: no harness \"gt\", so the reference", at()))?,
            };
            let tokens = ["tokens", "output_tokens"]
                .iter()
                .find_map(|key| value.get(*key).and_then(Value::as_u64));
            Ok(Generation {
                id: bench::row_id(value).unwrap_or_else(|| Value::from(index)),
                text,
                ground_truth,
                tokens,
            })
        })
        .collect()
}
