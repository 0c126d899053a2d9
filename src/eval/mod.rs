//! Math evaluation: answer extraction and grading compatible with the Qwen2.5-Math harness, the
//! benchmark files, and graded results. Generations come from a file (`wgtrain eval --grade`) or
//! from a model (`run`, `wgtrain eval --model`); both write results through `results`.
pub mod bench;
pub mod generations;
pub mod grader;
pub mod prompt;
pub mod results;
pub mod run;
pub mod wrong_answers;
