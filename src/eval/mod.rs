//! Math evaluation: answer extraction and grading compatible with the Qwen2.5-Math harness.
pub mod grader;
