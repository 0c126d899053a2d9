//! The prompt of the paper's evaluation: the Sky-T1 system prompt, and the problem as the user turn.
use crate::data::{Message, Role};

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
/// added around it).
pub fn messages(system: &str, problem: &str) -> Vec<Message> {
    vec![
        Message {
            role: Role::System,
            content: system.to_string(),
        },
        Message {
            role: Role::User,
            content: problem.to_string(),
        },
    ]
}
