//! Generations to grade, read from a file: rows of the Qwen2.5-Math harness's output or simple
//! `{"generation": ..., "answer": ...}` rows.
use super::bench;
use crate::data::jsonfile;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One model output with the answer it should reach.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub id: Value,
    pub text: String,
    /// Raw reference answer.
    pub ground_truth: String,
    /// Output length in tokens, when known.
    pub tokens: Option<u64>,
}

/// Reads generations to grade: harness rows (`code[0]` the generation, `gt` the reference) or
/// simple rows (`generation`, and `answer` or `final_answer`), with an optional `id`/`idx` and
/// `tokens`. A JSON array or JSON Lines.
pub fn load_generations(path: impl AsRef<Path>) -> Result<Vec<Generation>> {
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
                Some(Value::String(gt)) => Some(gt.clone()),
                _ => bench::reference_answer(value),
            }
            .with_context(|| {
                format!("{}: needs a reference \"answer\" (or harness \"gt\")", at())
            })?;
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
