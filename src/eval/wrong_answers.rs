//! The "wrong answers" variant of the paper: keep only the traces whose final answer is wrong.
//!
//! Ground truth comes from an answers file, JSON Lines or a JSON array; each row holds the answer
//! (`answer`, or OlympiadBench's `final_answer` list) and says which dataset row it belongs to by
//! its problem text (`problem` or `question`: matched against the row's first user turn, also
//! without a leading or trailing instruction sentence such as Sky-T1's "Return your final response
//! within \boxed{}.") or, failing that, by `index` (0-based row of the dataset). A benchmark file
//! such as ../shared/bench/math500.jsonl is a valid answers file.
use super::{bench, grader};
use crate::data::{jsonfile, Dataset, Role};
use anyhow::{anyhow, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

static SENTENCE_END: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("[.?!:] ").expect("sentence end"));

pub const BEGIN_SOLUTION: &str = "<|begin_of_solution|>";
pub const END_SOLUTION: &str = "<|end_of_solution|>";

/// Reference answers by problem text and by row index.
#[derive(Clone, Debug, Default)]
pub struct GroundTruth {
    by_problem: HashMap<String, String>,
    by_index: HashMap<usize, String>,
}

/// Whitespace-insensitive key for problem texts.
fn normalize_problem(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl GroundTruth {
    pub fn load(path: impl AsRef<Path>) -> Result<GroundTruth> {
        let path = path.as_ref();
        let (_, rows) = jsonfile::read_rows(path)?;
        let mut truth = GroundTruth::default();
        for (i, row) in rows.iter().enumerate() {
            let at = || format!("{}:{}: row {i}", path.display(), row.line);
            let answer = bench::reference_answer(&row.value)
                .ok_or_else(|| anyhow!("{}: no \"answer\" or \"final_answer\"", at()))?;
            let problem = ["problem", "question"]
                .iter()
                .find_map(|key| row.value.get(*key).and_then(Value::as_str));
            if let Some(problem) = problem {
                truth.by_problem.insert(normalize_problem(problem), answer);
            } else if let Some(index) = row.value.get("index").and_then(Value::as_u64) {
                truth.by_index.insert(index as usize, answer);
            } else {
                return Err(anyhow!(
                    "{}: needs \"problem\"/\"question\" text or an \"index\"",
                    at()
                ));
            }
        }
        Ok(truth)
    }

    /// The reference answer for a dataset row, by its first user turn, else its index.
    pub fn answer_for(&self, problem: Option<&str>, index: usize) -> Option<&str> {
        problem
            .and_then(|text| self.by_text(text))
            .or_else(|| self.by_index.get(&index))
            .map(String::as_str)
    }

    fn by_text(&self, text: &str) -> Option<&String> {
        let text = normalize_problem(text);
        if let Some(answer) = self.by_problem.get(&text) {
            return Some(answer);
        }
        // Without up to three leading or trailing instruction sentences.
        let boundaries: Vec<usize> = SENTENCE_END.find_iter(&text).map(|m| m.end()).collect();
        let leading = boundaries.iter().take(3).map(|&i| &text[i..]);
        let trailing = boundaries
            .iter()
            .rev()
            .take(3)
            .map(|&i| text[..i].trim_end());
        leading
            .chain(trailing)
            .find_map(|candidate| self.by_problem.get(candidate))
    }
}

/// The text graded for a trace: its solution block, or the whole turn when it has none.
fn solution_text(content: &str) -> &str {
    let Some(start) = content
        .find(BEGIN_SOLUTION)
        .map(|i| i + BEGIN_SOLUTION.len())
    else {
        return content;
    };
    let end = content[start..]
        .find(END_SOLUTION)
        .map_or(content.len(), |i| start + i);
    &content[start..end]
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrongAnswerSummary {
    pub rows: usize,
    /// Kept: the last assistant turn's answer is wrong.
    pub wrong: usize,
    /// Dropped: the answer is right.
    pub correct: usize,
    /// Dropped: no ground truth for the row (or no assistant turn).
    pub without_ground_truth: usize,
}

/// Keeps the rows whose last assistant turn reaches a wrong answer, graded like the benchmarks.
pub fn keep_wrong_answers(dataset: &mut Dataset, truth: &GroundTruth) -> WrongAnswerSummary {
    let mut summary = WrongAnswerSummary {
        rows: dataset.len(),
        ..WrongAnswerSummary::default()
    };
    dataset.retain(|row| {
        let conversation = row.conversation();
        let answer = truth.answer_for(conversation.first_user_turn(), row.index());
        let response = conversation
            .turns
            .iter()
            .rev()
            .find(|turn| turn.role == Role::Assistant);
        let (Some(answer), Some(response)) = (answer, response) else {
            summary.without_ground_truth += 1;
            return false;
        };
        let correct = grader::grade(solution_text(&response.content), answer).correct;
        if correct {
            summary.correct += 1;
        } else {
            summary.wrong += 1;
        }
        !correct
    });
    summary
}
