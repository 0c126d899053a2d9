//! Final-answer extraction from a generation, as the harness's `extract_answer` does it for each
//! benchmark, followed by its second `strip_string` (applied again in `run_execute`).
use super::benchmark::Benchmark;
use super::normalize::strip_string;
use regex::Regex;
use std::sync::LazyLock;

static LAST_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d*\.?\d+").expect("number pattern"));
static NEWLINE_AND_INDENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\n\s*").expect("newline pattern"));

/// The normalised final answer of `generation` as `run_execute` stores it: the harness's
/// `extract_answer` normalised once more; empty when there is none.
pub fn extract_answer(generation: &str, benchmark: Benchmark) -> String {
    if generation.is_empty() {
        return String::new();
    }
    strip_string(
        &harness_extract_answer(generation, benchmark),
        benchmark.skip_unit(),
    )
}

/// The harness's `extract_answer(text, data_name)`. Multiple-choice benchmarks read a letter
/// (mmlu_stem, sat_math, aqua: `choice_answer_clean`; gpqa, mmlu: the last letter A-D), every
/// other one, in order: Minerva's "final answer is $...$. I hope"; the text after the last "boxed"
/// (a balanced `{...}` group, or up to the next `$` for `\boxed 5`); then, beyond the harness, the
/// last `\fbox{...}`; "...he answer is X"; "final answer is X"; "答案是"; else the last number. The
/// answer is normalised once, keeping unit words for minerva_math and carp_en.
pub(super) fn harness_extract_answer(generation: &str, benchmark: Benchmark) -> String {
    let text = generation.replace("\u{43a}\u{438}", "");
    if benchmark.is(&["mmlu_stem", "sat_math", "aqua"]) {
        return choice_from_generation(&text);
    }
    if benchmark.is(&["gpqa", "mmlu"]) {
        return last_choice_letter(&text);
    }
    let raw = if let Some(answer) = minerva_answer(&text) {
        answer
    } else if let Some(after) = text
        .rsplit("boxed")
        .next()
        .filter(|_| text.contains("boxed"))
    {
        if after.is_empty() {
            return String::new();
        }
        after_box(after)
    } else if let Some(after) = text
        .rsplit("\\fbox")
        .next()
        .filter(|_| text.contains("\\fbox"))
    {
        after_box(after)
    } else if text.contains("he answer is") {
        last_part(&text, "he answer is").trim().to_string()
    } else if text.contains("final answer is") {
        last_part(&text, "final answer is").trim().to_string()
    } else if let Some((_, after)) = text.split_once("答案是") {
        let after = after.trim();
        after
            .split("\n\n")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    } else {
        let without_commas = text.replace(',', "");
        LAST_NUMBER
            .find_iter(&without_commas)
            .last()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default()
    };

    let mut answer = NEWLINE_AND_INDENT.replace_all(&raw, "").into_owned();
    if let Some(rest) = answer.strip_prefix(':') {
        answer = rest.to_string();
    }
    if let Some(rest) = answer.strip_suffix('.') {
        answer = rest.to_string();
    }
    if let Some(rest) = answer.strip_suffix('/') {
        answer = rest.to_string();
    }
    strip_string(&answer, benchmark.skip_unit())
}

static CHOICE_LETTER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(A|B|C|D|E)\b").expect("choice pattern"));
static CHOICE_LETTER_A_TO_D: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(A|B|C|D)\b").expect("choice pattern"));
static CHOICE_TRIGGER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("choice is|answer is").expect("trigger pattern"));

/// The harness's `choice_answer_clean` on a whole generation: the letter after the last "answer
/// is" / "choice is" (the first letter there), else the last standalone letter A-E.
pub(super) fn choice_from_generation(generation: &str) -> String {
    let mut text = generation.trim_matches('\n');
    // Several triggers mean few-shot examples follow the answer: keep the first paragraph.
    if ["choice is", "answer is"]
        .iter()
        .any(|t| text.matches(t).count() > 1)
    {
        text = text.split("\n\n").next().unwrap_or_default();
    }
    let after_trigger = CHOICE_TRIGGER
        .split(text)
        .last()
        .filter(|_| CHOICE_TRIGGER.is_match(text));
    let text = after_trigger
        .unwrap_or(text)
        .trim_matches('\n')
        .trim_end_matches('.')
        .trim_end_matches('/')
        .trim_matches(' ')
        .trim_start_matches(':');
    let upper = text.to_uppercase();
    let mut letters = CHOICE_LETTER
        .find_iter(&upper)
        .map(|m| m.as_str().to_string());
    let choice = if after_trigger.is_some() {
        letters.next()
    } else {
        letters.last()
    };
    let choice = choice.unwrap_or_else(|| text.trim().trim_matches('.').to_string());
    choice
        .trim_end_matches('.')
        .trim_end_matches('/')
        .to_string()
}

/// The harness's `gpqa_choice_answer_clean`: the last standalone letter A-D, else the text.
fn last_choice_letter(text: &str) -> String {
    let choice = CHOICE_LETTER_A_TO_D
        .find_iter(&text.to_uppercase())
        .last()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| text.trim().trim_matches('.').to_string());
    choice
        .trim_end_matches('.')
        .trim_end_matches('/')
        .to_string()
}

fn minerva_answer(text: &str) -> Option<String> {
    if !text.contains("$. I hope") {
        return None;
    }
    let (_, after) = text.split_once("final answer is $")?;
    let answer = after
        .split_once("$. I hope")
        .map_or(after, |(answer, _)| answer);
    Some(answer.trim().to_string())
}

fn last_part<'a>(text: &'a str, marker: &str) -> &'a str {
    text.rsplit(marker).next().unwrap_or_default()
}

/// The argument of a box: a `{...}` group with balanced braces (to the end if never closed), or
/// for `\boxed 5` everything up to the next `$`.
fn after_box(after: &str) -> String {
    let Some(group) = after.strip_prefix('{') else {
        return after
            .split('$')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
    };
    let mut depth = 1;
    let mut answer = String::new();
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        answer.push(c);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::super::Benchmark;
    use super::extract_answer;

    fn extract(generation: &str) -> String {
        extract_answer(generation, Benchmark::DEFAULT)
    }

    fn extract_for(generation: &str, benchmark: &str) -> String {
        extract_answer(
            generation,
            Benchmark::named(benchmark).expect("a harness benchmark"),
        )
    }

    #[test]
    fn extraction_follows_the_harness() {
        assert_eq!(extract("so \\boxed{\\frac{1}{2}} and \\boxed{3}."), "3");
        assert_eq!(
            extract("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$"),
            "(3,\\frac{\\pi}{2})"
        );
        assert_eq!(extract("The answer is $\\boxed 5$."), "5");
        assert_eq!(extract("thus \\fbox{12}"), "12");
        assert_eq!(extract("The answer is 42."), "42");
        assert_eq!(extract("we get 1,234 and then -7.5 apples"), "-7.5");
        assert_eq!(extract("no numbers"), "");
        assert_eq!(extract(""), "");
    }

    #[test]
    fn minerva_and_carp_keep_single_letter_variables() {
        let generation = "The rate is $\\boxed{\\frac{1}{s}}$.";
        assert_eq!(extract_for(generation, "minerva_math"), "\\frac{1}{s}");
        assert_eq!(extract_for(generation, "carp_en"), "\\frac{1}{s}");
        assert_eq!(extract(generation), "\\frac{1}{}");
        let generation = "Final Answer: The final answer is $e^{t} c$. I hope it is correct.";
        assert_eq!(extract_for(generation, "minerva_math"), "e^{t}c");
        assert_eq!(extract_for(generation, "math"), "e^{}");
        // A trailing \text{} unit is removed for every benchmark.
        let generation = "\\boxed{3.8 \\text{ days}}";
        assert_eq!(extract_for(generation, "minerva_math"), "3.8");
    }

    #[test]
    fn choice_benchmarks_read_a_letter() {
        let generation = "Options (A) and (C) fail, so the answer is (B), not 12.";
        assert_eq!(extract_for(generation, "aqua"), "B");
        assert_eq!(extract_for(generation, "sat_math"), "B");
        assert_eq!(extract_for(generation, "mmlu_stem"), "B");
        assert_eq!(extract(generation), "(B),not12");
        // gpqa and mmlu: the last standalone A-D anywhere, E is not a choice.
        let generation = "A looks right, but \\boxed{D}. E";
        assert_eq!(extract_for(generation, "gpqa"), "D");
        assert_eq!(extract_for(generation, "mmlu"), "D");
        assert_eq!(extract_for("no letter here.", "gpqa"), "noletterhere");
    }
}
