//! Math evaluation: answer extraction and grading compatible with the Qwen2.5-Math harness, the
//! benchmark files, and graded results. Generations come from a file today (`wgtrain eval
//! --grade`); model-driven evaluation will produce the same `Generation`s and share `results`.
pub mod bench;
pub mod generations;
pub mod grader;
pub mod results;
pub mod wrong_answers;
