//! The harness's per-benchmark rules (`data_name` in Qwen2.5-Math's `parser.py` and `math_eval.py`,
//! as SkyThought ships them): which benchmarks keep unit words, which read a choice letter, and how
//! each one's ground truth is parsed from its dataset row (`parse_ground_truth`).
use super::extract::harness_extract_answer;
use super::normalize::strip_string;
use crate::eval::bench;
use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use std::fmt;
use std::sync::LazyLock;

/// Every `data_name` the harness's `parse_ground_truth` accepts (any other raises there).
pub const BENCHMARK_NAMES: &[&str] = &[
    "aime24",
    "amc23",
    "aqua",
    "asdiv",
    "carp_en",
    "cmath",
    "cn_middle_school",
    "college_math",
    "gaokao2023en",
    "gaokao2024_I",
    "gaokao2024_II",
    "gaokao2024_mix",
    "gaokao_math_cloze",
    "gaokao_math_qa",
    "gpqa",
    "gsm8k",
    "imo2024",
    "math",
    "math500",
    "mawps",
    "minerva_math",
    "mmlu",
    "mmlu_stem",
    "olympiadbench",
    "sat_math",
    "svamp",
    "tabmwp",
];

/// The harness's `STRIP_EXCEPTIONS`: answers keep their unit words and the ground truth is not
/// normalised.
const STRIP_EXCEPTIONS: &[&str] = &["carp_en", "minerva_math"];

/// Which benchmark's rules grade a generation. The default rules are the harness's generic branch
/// (those of aime24, amc23, math500, olympiadbench, ...), with the answer read from `answer` or
/// `final_answer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Benchmark(Option<&'static str>);

impl Benchmark {
    pub const DEFAULT: Benchmark = Benchmark(None);

    /// The rules of a harness `data_name`; `None` for a name the harness does not know.
    pub fn named(name: &str) -> Option<Benchmark> {
        BENCHMARK_NAMES
            .iter()
            .find(|known| **known == name)
            .map(|known| Benchmark(Some(known)))
    }

    pub fn name(self) -> Option<&'static str> {
        self.0
    }

    pub(super) fn is(self, names: &[&str]) -> bool {
        self.0.is_some_and(|name| names.contains(&name))
    }

    /// `strip_string(..., skip_unit=...)` for predictions.
    pub(super) fn skip_unit(self) -> bool {
        self.is(STRIP_EXCEPTIONS)
    }
}

impl fmt::Display for Benchmark {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0.unwrap_or("default"))
    }
}

/// A ground truth as `math_eval.py` stores it in its output rows: `gt` (the parsed answer) and
/// `gt_cot` (the reference solution, "None" when the benchmark has none).
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    pub answer: String,
    pub cot: Option<String>,
}

impl GroundTruth {
    /// A raw reference answer under the default rules.
    pub fn from_answer(answer: &str) -> GroundTruth {
        GroundTruth {
            answer: strip_string(answer, false),
            cot: None,
        }
    }

    /// The reference `math_equal` compares with: `evaluate.py` parses the stored ground truth
    /// again (`parse_ground_truth` on a row with `gt_cot` and `gt`): `math` re-extracts it from
    /// the solution, the strip exceptions keep it as it is, every other benchmark normalises it
    /// once more.
    pub fn reference(&self, benchmark: Benchmark) -> String {
        match &self.cot {
            Some(cot) if benchmark.is(&["math"]) => harness_extract_answer(cot, benchmark),
            _ if benchmark.skip_unit() => self.answer.clone(),
            _ => strip_string(&self.answer, false),
        }
    }
}

static PARENTHESISED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(.*?\)").expect("parenthesis pattern"));

/// The harness's `parse_ground_truth` on a benchmark's dataset row; the error names the key the
/// benchmark reads.
pub fn parse_ground_truth(row: &Value, benchmark: Benchmark) -> Result<GroundTruth> {
    let Some(name) = benchmark.name() else {
        let answer = bench::reference_answer(row)
            .context("needs a reference \"answer\" (or OlympiadBench's \"final_answer\")")?;
        return Ok(GroundTruth::from_answer(&answer));
    };
    let text = |key: &str| field(row, key, name);
    let solution = || text("solution").map(|s| s.trim().to_string());
    let (cot, answer) = match name {
        "math" | "minerva_math" => {
            let solution = solution()?;
            let answer = harness_extract_answer(&solution, benchmark);
            (Some(solution), answer)
        }
        "math500" => (Some(solution()?), text("answer")?),
        "gsm8k" => {
            let full = text("answer")?;
            let parts: Vec<&str> = full.split("####").collect();
            let [cot, answer] = parts[..] else {
                bail!(
                    "{name}: \"answer\" must hold one \"####\" before the final answer, found {}",
                    parts.len() - 1
                );
            };
            (Some(cot.trim().to_string()), answer.to_string())
        }
        "svamp" => (Some(text("Equation")?), text("Answer")?),
        "asdiv" => (
            Some(text("formula")?),
            PARENTHESISED.replace_all(&text("answer")?, "").into_owned(),
        ),
        "mawps" => (None, text("target")?),
        "tabmwp" => (Some(solution()?), tabmwp_answer(row)?),
        "carp_en" => (Some(text("steps")?), text("answer")?),
        "mmlu" | "mmlu_stem" => {
            let index = row.get("answer").and_then(Value::as_u64);
            let letter = index.and_then(|i| "ABCD".chars().nth(i as usize));
            let letter = letter
                .ok_or_else(|| anyhow!("{name}: \"answer\" must be a choice index 0-3 (A-D)"))?;
            (None, letter.to_string())
        }
        "sat_math" | "gpqa" => (None, text("Answer")?),
        "aqua" => (None, text("correct")?),
        "gaokao2023en" | "college_math" | "gaokao_math_cloze" => {
            (None, text("answer")?.replace('$', "").trim().to_string())
        }
        "gaokao_math_qa" => (None, text("label")?),
        "gaokao2024_mix" | "cn_middle_school" => match text("choice_answer") {
            Ok(choice) if !choice.is_empty() => (None, choice),
            _ => (None, text("answer")?),
        },
        "olympiadbench" => {
            let first = row
                .get("final_answer")
                .and_then(Value::as_array)
                .and_then(|answers| answers.first())
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    anyhow!("{name}: needs \"final_answer\", a list whose first item is a string")
                })?;
            (None, first.trim_matches('$').to_string())
        }
        _ => (None, text("answer")?),
    };
    let answer = if benchmark.skip_unit() {
        answer
            .replace("\\neq", "\\ne")
            .replace("\\leq", "\\le")
            .replace("\\geq", "\\ge")
    } else {
        strip_string(&answer, false)
    };
    Ok(GroundTruth { answer, cot })
}

/// A row's field as Python's `str()` gives it (numbers as Python prints them).
fn field(row: &Value, key: &str, benchmark: &str) -> Result<String> {
    python_str(row.get(key))
        .ok_or_else(|| anyhow!("{benchmark}: needs \"{key}\" (a string or a number)"))
}

/// `str(value)` for the JSON values a dataset holds: a string as it is, a number as Python prints
/// it (`27.0` stays `27.0`).
pub(crate) fn python_str(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// TabMWP's numeric answers become floats (`3/4` → 0.75, `1,000` → 1000.0, `5%` → 0.05).
fn tabmwp_answer(row: &Value) -> Result<String> {
    let answer = field(row, "answer", "tabmwp")?;
    let numeric = matches!(
        row.get("ans_type").and_then(Value::as_str),
        Some("integer_number" | "decimal_number")
    );
    if !numeric {
        return Ok(answer);
    }
    let bad = || anyhow!("tabmwp: numeric \"answer\" {answer:?} is not a number");
    let float = |text: &str| text.trim().parse::<f64>().map_err(|_| bad());
    let value = if let Some((numerator, denominator)) = answer.split_once('/') {
        let integer = |text: &str| text.trim().parse::<i64>().map_err(|_| bad());
        integer(numerator)? as f64 / integer(denominator)? as f64
    } else if answer.contains(',') {
        float(&answer.replace(',', ""))?
    } else if let Some((percent, _)) = answer.split_once('%') {
        float(percent)? / 100.0
    } else {
        float(&answer)?
    };
    Ok(python_float(value))
}

/// Python's `str(float)`: integral values keep a `.0`.
fn python_float(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}
