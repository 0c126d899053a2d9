//! The math grader: agrees with the Qwen2.5-Math evaluation harness that produced the paper's
//! numbers (`extract_answer`, `strip_string`, `math_equal`), in pure Rust. docs/eval.md describes
//! it and the few places it knowingly differs.
mod benchmark;
mod complex;
mod equal;
mod expr;
mod extract;
mod normalize;

pub(crate) use benchmark::python_str;
pub use benchmark::{parse_ground_truth, Benchmark, GroundTruth, BENCHMARK_NAMES};
pub use equal::math_equal;
pub use extract::extract_answer;
pub use normalize::strip_string;

/// The verdict on one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Grade {
    /// The normalised final answer found in the generation ("" when none).
    pub extracted: String,
    /// The normalised ground truth it was compared with.
    pub ground_truth: String,
    pub correct: bool,
}

/// Grades a generation against a raw reference answer under the default rules.
pub fn grade(generation: &str, answer: &str) -> Grade {
    grade_for(
        generation,
        &GroundTruth::from_answer(answer),
        Benchmark::DEFAULT,
    )
}

/// Grades a generation as the harness grades a row of `benchmark`: the prediction `run_execute`
/// extracts, the multiple-choice fix-up of `math_eval.py` (against the stored ground truth), then
/// `math_equal` against the reference `evaluate.py` parses from it.
pub fn grade_for(generation: &str, ground_truth: &GroundTruth, benchmark: Benchmark) -> Grade {
    let stored = &ground_truth.answer;
    let mut extracted = extract_answer(generation, benchmark);
    // Multiple choice, as the harness's `math_eval.py`: a one-letter ground truth re-reads the
    // letter from the whole generation; one made of letters A-E only keeps those letters of the
    // answer. An empty ground truth counts as the latter, so an answer without capitals A-E then
    // matches it (the harness does this; it decides "\text{east}" in MATH-500).
    let is_letter = |c: char| ('A'..='E').contains(&c);
    let is_choices = |s: &str| s.chars().all(is_letter);
    if stored.chars().count() == 1 && is_choices(stored) {
        if !(extracted.chars().count() == 1 && is_choices(&extracted)) {
            extracted = extract::choice_from_generation(generation);
        }
    } else if is_choices(stored) && !is_choices(&extracted) {
        extracted = extracted.chars().filter(|c| is_letter(*c)).collect();
    }
    let ground_truth = ground_truth.reference(benchmark);
    let correct = !generation.is_empty() && math_equal(&extracted, &ground_truth);
    Grade {
        extracted,
        ground_truth,
        correct,
    }
}
