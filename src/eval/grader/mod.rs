//! The math grader: agrees with the Qwen2.5-Math evaluation harness that produced the paper's
//! numbers (`extract_answer`, `strip_string`, `math_equal`), in pure Rust. docs/eval.md describes
//! it and the few places it knowingly differs.
mod complex;
mod equal;
mod expr;
mod extract;
mod normalize;

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

/// Grades a generation against a raw ground-truth answer, normalised twice as in the harness
/// (`math_eval.py` stores the normalised answer, `evaluate.py` normalises it again).
pub fn grade(generation: &str, ground_truth: &str) -> Grade {
    let ground_truth = strip_string(&strip_string(ground_truth));
    let mut extracted = extract_answer(generation);
    // Multiple choice, as the harness's `math_eval.py`: a one-letter ground truth re-reads the
    // letter from the whole generation; one made of letters A-E only keeps those letters of the
    // answer. An empty ground truth counts as the latter, so an answer without capitals A-E then
    // matches it (the harness does this; it decides "\text{east}" in MATH-500).
    let is_letter = |c: char| ('A'..='E').contains(&c);
    let is_choices = |s: &str| s.chars().all(is_letter);
    if ground_truth.chars().count() == 1 && is_choices(&ground_truth) {
        if !(extracted.chars().count() == 1 && is_choices(&extracted)) {
            extracted = extract::choice_from_generation(generation);
        }
    } else if is_choices(&ground_truth) && !is_choices(&extracted) {
        extracted = extracted.chars().filter(|c| is_letter(*c)).collect();
    }
    let correct = !generation.is_empty() && math_equal(&extracted, &ground_truth);
    Grade {
        extracted,
        ground_truth,
        correct,
    }
}
