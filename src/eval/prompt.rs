//! The prompt of the paper's evaluation: the Sky-T1 system prompt, and the problem as the user turn.
use crate::data::{Message, Role};

/// The evaluation prompts known by name (`wgtrain eval --prompt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NamedPrompt {
    /// The Qwen2.5-Math harness's "Sky-T1" prompt type, which produced the paper's tables: the
    /// Sky-T1 system prompt without the braces of the training copy.
    SkyT1Harness,
    /// The Sky-T1 system prompt as the training data has it (`SKY_T1_SYSTEM_PROMPT`).
    SkyT1Train,
}

impl NamedPrompt {
    /// The name as `--prompt` takes it and run.json / summary.json record it.
    pub fn name(self) -> &'static str {
        match self {
            NamedPrompt::SkyT1Harness => "sky-t1-harness",
            NamedPrompt::SkyT1Train => "sky-t1-train",
        }
    }

    pub fn system(self) -> String {
        match self {
            // The harness's template is a Python format string, so its copy of the prompt drops
            // the two `{...}` placeholders' braces and keeps every other byte.
            NamedPrompt::SkyT1Harness => SKY_T1_SYSTEM_PROMPT.replace(['{', '}'], ""),
            NamedPrompt::SkyT1Train => SKY_T1_SYSTEM_PROMPT.to_string(),
        }
    }
}

/// What run.json and summary.json record as the prompt of a run with `--system TEXT`.
pub const CUSTOM_PROMPT: &str = "custom";

/// The Sky-T1 system prompt, byte for byte as in NovaSky's SkyThought repository
/// (<https://github.com/NovaSky-AI/SkyThought>, Apache License 2.0; see
/// ../shared/bench/LICENSE.SkyThought-Apache-2.0). Its typos ("analisying", "backtracing") and
/// the blank line inside the quotes are part of the prompt the models were trained and evaluated
/// with.
pub const SKY_T1_SYSTEM_PROMPT: &str = concat!(
    "Your role as an assistant involves thoroughly exploring questions through a systematic ",
    "long thinking process before providing the final precise and accurate solutions. ",
    "This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, ",
    "reassessment, reflection, backtracing, and iteration to develop well-considered thinking ",
    "process. ",
    "Please structure your response into two main sections: ",
    "Thought and Solution. ",
    "In the Thought section, detail your reasoning process using the specified format: ",
    "<|begin_of_thought|> {thought with steps separated with '\n\n",
    "'} <|end_of_thought|> Each step should include detailed considerations such as analisying ",
    "questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy ",
    "of the current steps, refining any errors, and revisiting previous steps. ",
    "In the Solution section, based on various attempts, explorations, and reflections from ",
    "the Thought section, systematically present the final solution that you deem correct. ",
    "The solution should remain a logical, accurate, concise expression style and detail ",
    "necessary step needed to reach the conclusion, formatted as follows: ",
    "<|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|> ",
    "Now, try to solve the following question through the above guidelines:",
);

/// The conversation whose chat-template rendering (with the generation prompt) is the model's
/// input: the system prompt, then the problem alone as the user turn (paper.md: no instruction
/// added around it), stripped of surrounding whitespace as the harness's `parse_question` does.
pub fn messages(system: &str, problem: &str) -> Vec<Message> {
    vec![
        Message {
            role: Role::System,
            content: system.to_string(),
        },
        Message {
            role: Role::User,
            content: python_strip(problem).to_string(),
        },
    ]
}

/// Python's `str.strip()`: Unicode whitespace and the separators U+001C..U+001F.
fn python_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
