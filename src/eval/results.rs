//! Graded results, written the same way whether the generations came from a file
//! (`wgtrain eval --grade`) or from a model: `results.jsonl` (one row per generation, in order)
//! and `summary.json` in an output directory.
use super::generations::Generation;
use super::grader;
use crate::data::jsonfile;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A graded generation: a row of `results.jsonl` (read back when `wgtrain eval --model` resumes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradedRow {
    pub id: Value,
    pub generation: String,
    /// The normalised final answer extracted from the generation ("" when none).
    pub extracted: String,
    /// The normalised reference answer it was compared with.
    pub ground_truth: String,
    pub correct: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

impl GradedRow {
    pub fn grade(generation: &Generation, benchmark: grader::Benchmark) -> GradedRow {
        let grade = grader::grade_for(&generation.text, &generation.ground_truth, benchmark);
        GradedRow {
            id: generation.id.clone(),
            generation: generation.text.clone(),
            extracted: grade.extracted,
            ground_truth: grade.ground_truth,
            correct: grade.correct,
            tokens: generation.tokens,
        }
    }
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub correct: usize,
    /// correct / n (0 when n = 0).
    pub accuracy: f64,
    /// Generations in which no answer was found.
    pub no_answer: usize,
    pub mean_output_chars: f64,
    /// Present when every generation's token count is known.
    pub mean_output_tokens: Option<f64>,
}

impl Summary {
    pub fn of(rows: &[GradedRow]) -> Summary {
        let n = rows.len();
        let mean = |total: f64| if n == 0 { 0.0 } else { total / n as f64 };
        let correct = rows.iter().filter(|row| row.correct).count();
        let tokens: Option<u64> = rows.iter().map(|row| row.tokens).sum();
        Summary {
            n,
            correct,
            accuracy: mean(correct as f64),
            no_answer: rows.iter().filter(|row| row.extracted.is_empty()).count(),
            mean_output_chars: mean(
                rows.iter()
                    .map(|row| row.generation.chars().count() as f64)
                    .sum(),
            ),
            mean_output_tokens: tokens.filter(|_| n > 0).map(|total| mean(total as f64)),
        }
    }

    /// A two-line table for the terminal.
    pub fn table(&self) -> String {
        let tokens = self
            .mean_output_tokens
            .map_or("-".to_string(), |t| format!("{t:.1}"));
        format!(
            "{:>6}  {:>7}  {:>8}  {:>9}  {:>10}  {:>11}\n{:>6}  {:>7}  {:>7.1}%  {:>9}  {:>10.1}  {:>11}",
            "n", "correct", "accuracy", "no answer", "mean chars", "mean tokens",
            self.n, self.correct, 100.0 * self.accuracy, self.no_answer, self.mean_output_chars, tokens
        )
    }
}

/// An output directory for results; refuses to reuse an existing directory unless told to.
#[derive(Clone, Debug)]
pub struct ResultsDir {
    path: PathBuf,
}

impl ResultsDir {
    pub fn create(path: impl AsRef<Path>, overwrite: bool) -> Result<ResultsDir> {
        let path = path.as_ref();
        if path.exists() && !overwrite {
            bail!("{} already exists; refusing to overwrite it (pass --overwrite to replace its results)", path.display());
        }
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ResultsDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `results.jsonl` and `summary.json`; returns the summary.
    pub fn write(&self, rows: &[GradedRow]) -> Result<Summary> {
        let summary = Summary::of(rows);
        let mut results = String::new();
        for row in rows {
            results.push_str(&serde_json::to_string(row)?);
            results.push('\n');
        }
        // The directory is new or the caller allowed replacing what is in it.
        let replace = true;
        jsonfile::write_atomically(
            &self.path.join("results.jsonl"),
            results.as_bytes(),
            replace,
        )?;
        let summary_json = serde_json::to_string_pretty(&summary)? + "\n";
        jsonfile::write_atomically(
            &self.path.join("summary.json"),
            summary_json.as_bytes(),
            replace,
        )?;
        Ok(summary)
    }
}
