//! Invariants of the perturbations and of dataset reading/writing, through the library and the
//! `wgtrain perturb` binary.
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use wgtrain::data::perturb::{
    numbers, thought_range, DigitsMode, KeywordMatcher, Perturbation, Perturber, Scope, StepPool,
    StepSplitter,
};
use wgtrain::data::{Dataset, FileFormat, Role};

const SYSTEM: &str = "Your role as an assistant involves thoroughly exploring questions.";

/// Step `i` of row `row`: unique text with digits, and every third one with a reflection keyword.
fn step(row: usize, i: usize) -> String {
    let mut text = format!(
        "Row {row} step {i}: we compute {} + {} = {}.",
        row * 3 + i,
        i + 7,
        row * 3 + 2 * i + 7
    );
    if i % 3 == 1 {
        text.push_str(&format!(
            " Wait, let me check step {i} again. So the sum holds for row {row}."
        ));
    }
    text
}

fn assistant(row: usize, steps: usize) -> String {
    let steps: Vec<String> = (0..steps).map(|i| step(row, i)).collect();
    format!(
        "<|begin_of_thought|>\n\n{}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nSo 12 + {row} gives \\boxed{{{}}}.\n\n<|end_of_solution|>",
        steps.join("\n\n"),
        12 + row
    )
}

/// Sharegpt rows with 6..=14 steps, one row without a thought block, and one `messages` row.
fn rows() -> Vec<Value> {
    let mut rows: Vec<Value> = (0..8)
        .map(|row| {
            json!({
                "id": format!("r{row}"),
                "system": SYSTEM,
                "conversations": [
                    {"from": "user", "value": format!("Return your final response within \\boxed{{}}. What is 12 + {row}?")},
                    {"from": "assistant", "value": assistant(row, 6 + row)}
                ],
                "extra": {"kept": [1, 2.5, "x"]}
            })
        })
        .collect();
    rows.push(json!({
        "system": SYSTEM,
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello! 123"}]
    }));
    rows.push(json!({
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is 12 + 9?"},
            {"role": "assistant", "content": assistant(9, 10)}
        ]
    }));
    rows
}

fn write_jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = rows.iter().map(|row| row.to_string()).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

fn write_json_array(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(rows).unwrap()).unwrap();
    path
}

fn dataset(dir: &Path) -> Dataset {
    Dataset::load(write_jsonl(dir, "in.jsonl", &rows())).unwrap()
}

fn perturber(perturbation: Perturbation, fraction: f64, seed: u64) -> Perturber {
    Perturber {
        perturbation,
        fraction,
        seed,
        splitter: StepSplitter::default(),
    }
}

fn assistant_text(dataset: &Dataset, row: usize) -> String {
    let conversation = dataset.rows()[row].conversation();
    let turn = conversation
        .turns
        .iter()
        .rfind(|t| t.role == Role::Assistant)
        .unwrap();
    turn.content.clone()
}

fn thought(text: &str) -> &str {
    &text[thought_range(text).unwrap()]
}

fn steps_of(text: &str) -> Vec<String> {
    thought(text)
        .split("\n\n")
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Everything but the thought block, for byte-for-byte comparisons.
fn outside_thought(text: &str) -> String {
    let range = thought_range(text).unwrap();
    format!("{}<THOUGHT>{}", &text[..range.start], &text[range.end..])
}

/// The row's JSON with the assistant's thought block cut out.
fn without_thoughts(value: &Value) -> Value {
    let mut value = value.clone();
    for (list, content) in [("conversations", "value"), ("messages", "content")] {
        if let Some(messages) = value.get_mut(list).and_then(Value::as_array_mut) {
            for message in messages {
                let text = message[content].as_str().unwrap().to_string();
                if thought_range(&text).is_some() {
                    message[content] = Value::String(outside_thought(&text));
                }
            }
        }
    }
    value
}

fn assert_only_thoughts_changed(before: &Dataset, after: &Dataset) {
    assert_eq!(before.len(), after.len());
    for (a, b) in before.rows().iter().zip(after.rows()) {
        assert_eq!(
            without_thoughts(a.value()),
            without_thoughts(b.value()),
            "row {}",
            a.index()
        );
    }
}

#[test]
fn shuffle_keeps_the_multiset_of_steps_and_everything_outside_the_thought() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let mut shuffled = original.clone();
    let summary = perturber(Perturbation::Shuffle, 1.0, 7)
        .apply(&mut shuffled)
        .unwrap();
    assert_only_thoughts_changed(&original, &shuffled);
    assert_eq!(
        (summary.rows, summary.perturbed, summary.passed_through),
        (10, 9, 1)
    );
    for row in (0..8).chain([9]) {
        let (before, after) = (
            steps_of(&assistant_text(&original, row)),
            steps_of(&assistant_text(&shuffled, row)),
        );
        let (mut sorted_before, mut sorted_after) = (before.clone(), after.clone());
        sorted_before.sort();
        sorted_after.sort();
        assert_eq!(sorted_before, sorted_after, "row {row}: same steps");
        // F = 1: a derangement, no step stays in place.
        assert!(
            before.iter().zip(&after).all(|(a, b)| a != b),
            "row {row}: every step moved"
        );
        let text = assistant_text(&shuffled, row);
        assert!(
            thought(&text).starts_with("\n\n") && thought(&text).ends_with("\n\n"),
            "separators kept"
        );
    }
    // F = 0.5 moves round(n / 2) steps.
    let mut half = original.clone();
    perturber(Perturbation::Shuffle, 0.5, 7)
        .apply(&mut half)
        .unwrap();
    let (before, after) = (
        steps_of(&assistant_text(&original, 3)),
        steps_of(&assistant_text(&half, 3)),
    );
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(moved, (0.5f64 * 9.0).round() as usize);
}

#[test]
fn delete_keeps_the_order_of_the_remaining_steps() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let mut deleted = original.clone();
    let summary = perturber(Perturbation::Delete, 0.67, 3)
        .apply(&mut deleted)
        .unwrap();
    assert_only_thoughts_changed(&original, &deleted);
    for row in 0..8 {
        let (before, after) = (
            steps_of(&assistant_text(&original, row)),
            steps_of(&assistant_text(&deleted, row)),
        );
        let n = before.len();
        assert_eq!(
            after.len(),
            n - (0.67 * n as f64).round() as usize,
            "row {row}"
        );
        // A subsequence: every kept step appears, in order.
        let mut rest = before.iter();
        assert!(
            after.iter().all(|step| rest.any(|s| s == step)),
            "row {row}: order kept"
        );
    }
    let (mean_before, mean_after) = summary.mean_steps();
    assert!(mean_after < mean_before * 0.4);
}

#[test]
fn insert_keeps_the_step_count_and_draws_from_other_rows() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let mut inserted = original.clone();
    let pool = StepPool::from_dataset(&original, &StepSplitter::default(), true);
    perturber(Perturbation::Insert(pool), 0.5, 11)
        .apply(&mut inserted)
        .unwrap();
    assert_only_thoughts_changed(&original, &inserted);
    let all_steps: HashSet<String> = (0..8)
        .chain([9])
        .flat_map(|r| steps_of(&assistant_text(&original, r)))
        .collect();
    for row in 0..8 {
        let (before, after) = (
            steps_of(&assistant_text(&original, row)),
            steps_of(&assistant_text(&inserted, row)),
        );
        assert_eq!(before.len(), after.len(), "row {row}: step count kept");
        let own = format!("Row {row} step");
        let foreign: Vec<&String> = after.iter().filter(|s| !s.starts_with(&own)).collect();
        assert_eq!(
            foreign.len(),
            (0.5 * before.len() as f64).round() as usize,
            "row {row}"
        );
        assert!(
            foreign.iter().all(|s| all_steps.contains(*s)),
            "inserted steps come from the file"
        );
    }
}

#[test]
fn same_seed_same_output_and_a_different_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let run = |seed| {
        let mut data = original.clone();
        perturber(Perturbation::Shuffle, 0.67, seed)
            .apply(&mut data)
            .unwrap();
        data.rows()
            .iter()
            .map(|r| r.value().clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));

    // A row's result depends only on the seed and its index, not on the other rows.
    let mut alone = original.clone();
    alone.retain(|row| row.index() == 4);
    perturber(Perturbation::Shuffle, 0.67, 5)
        .apply(&mut alone)
        .unwrap();
    assert_eq!(alone.rows()[0].value(), &run(5)[4]);
}

#[test]
fn digits_at_one_change_every_digit_only_inside_the_thought_block() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let mut corrupted = original.clone();
    let digits = Perturbation::Digits {
        mode: DigitsMode::Digit,
        scope: DigitsMode::Digit.default_scope(),
    };
    perturber(digits, 1.0, 1).apply(&mut corrupted).unwrap();
    assert_only_thoughts_changed(&original, &corrupted);
    for row in 0..8 {
        let (before, after) = (
            assistant_text(&original, row),
            assistant_text(&corrupted, row),
        );
        let (before, after) = (thought(&before), thought(&after));
        assert_eq!(before.len(), after.len());
        let mut digits = 0;
        for (a, b) in before.chars().zip(after.chars()) {
            if a.is_ascii_digit() {
                digits += 1;
                assert!(
                    b.is_ascii_digit() && b != a,
                    "row {row}: digit {a} became {b}"
                );
            } else {
                assert_eq!(a, b);
            }
        }
        assert!(digits > 20);
    }

    let mut corrupted = original.clone();
    let numbers_in_thought = Perturbation::Digits {
        mode: DigitsMode::Number,
        scope: Scope::Thought,
    };
    perturber(numbers_in_thought, 1.0, 1)
        .apply(&mut corrupted)
        .unwrap();
    assert_only_thoughts_changed(&original, &corrupted);
    let text = assistant_text(&corrupted, 7);
    let values: Vec<u32> = regex::Regex::new("[0-9]+")
        .unwrap()
        .find_iter(thought(&text))
        .map(|m| m.as_str().parse().unwrap())
        .collect();
    assert!(
        !values.is_empty() && values.iter().all(|v| *v <= 10),
        "numbers become 0..=10"
    );
}

/// Byte offset of each char offset of `text` (Python's spans count code points).
fn byte_offset(text: &str, chars: usize) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .nth(chars)
        .unwrap()
}

#[test]
fn number_mode_finds_what_the_released_regex_finds() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/number_pattern.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<(usize, usize, &str)> = case["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let (start, end) = (m[0].as_u64().unwrap(), m[1].as_u64().unwrap());
                let (start, end) = (
                    byte_offset(text, start as usize),
                    byte_offset(text, end as usize),
                );
                (start, end, m[2].as_str().unwrap())
            })
            .collect();
        let got: Vec<(usize, usize, &str)> =
            numbers(text).map(|r| (r.start, r.end, &text[r])).collect();
        assert_eq!(got, want, "in {text:?}");
    }
}

/// A row whose numbers sit at the edges of the released pattern, in every part of the row.
fn edge_row() -> Value {
    json!({
        "system": "Use 2 sections.",
        "conversations": [
            {"from": "user", "value": "What is 12.5 + 3?"},
            {"from": "assistant", "value": "<|begin_of_thought|>\n\nWe add 1.3 + 10.6 = 11.9, with x2 and 2x and -5 and 1,000 and \\frac{1}{2}.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nSo 12.5 + 3 = \\boxed{15.5}.\n\n<|end_of_solution|>"}
        ]
    })
}

#[test]
fn number_mode_corrupts_the_whole_response_like_the_released_script() {
    let dir = tempfile::tempdir().unwrap();
    let original = Dataset::load(write_jsonl(dir.path(), "in.jsonl", &[edge_row()])).unwrap();
    let before = assistant_text(&original, 0);
    let mode = DigitsMode::Number;
    let mut corrupted = original.clone();
    let released = Perturbation::Digits {
        mode,
        scope: mode.default_scope(),
    };
    assert_eq!(released.scope(), Scope::Response);
    perturber(released, 1.0, 3).apply(&mut corrupted).unwrap();
    let after = assistant_text(&corrupted, 0);
    // Every number, decimals whole and the boxed answer included, is now an integer 0..=10.
    let found =
        |text: &str| -> Vec<String> { numbers(text).map(|r| text[r].to_string()).collect() };
    assert_eq!(found(&before).len(), 11, "{:?}", found(&before));
    assert_eq!(found(&after).len(), 11, "{after}");
    for number in found(&after) {
        assert!(
            number.parse::<u32>().is_ok_and(|n| n <= 10),
            "{number} in {after}"
        );
    }
    assert!(after.contains(" x2 and 2x and -"), "{after}");
    let boxed = |text: &str| {
        text.split("\\boxed{")
            .nth(1)
            .unwrap()
            .split('}')
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(boxed(&after), "15.5");
    // The system prompt and the user turn never change.
    let row = corrupted.rows()[0].value();
    assert_eq!(row["system"], edge_row()["system"]);
    assert_eq!(row["conversations"][0], edge_row()["conversations"][0]);

    // --scope thought keeps the solution block.
    let mut in_thought = original.clone();
    let thought_only = Perturbation::Digits {
        mode,
        scope: Scope::Thought,
    };
    perturber(thought_only, 1.0, 3)
        .apply(&mut in_thought)
        .unwrap();
    let after = assistant_text(&in_thought, 0);
    assert_ne!(thought(&after), thought(&before));
    assert_eq!(outside_thought(&after), outside_thought(&before));
}

#[test]
fn keywords_removes_only_sentences_with_keywords() {
    let dir = tempfile::tempdir().unwrap();
    let original = dataset(dir.path());
    let matcher = KeywordMatcher::default();
    for fraction in [1.0, 0.5] {
        let mut removed = original.clone();
        perturber(Perturbation::Keywords(matcher.clone()), fraction, 2)
            .apply(&mut removed)
            .unwrap();
        assert_only_thoughts_changed(&original, &removed);
        for row in 0..8 {
            let (before, after) = (
                assistant_text(&original, row),
                assistant_text(&removed, row),
            );
            let sentences = |text: &str| -> Vec<String> {
                thought(text)
                    .split(['\n'])
                    .flat_map(|line| line.split_inclusive(". "))
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            let (before, after) = (sentences(&before), sentences(&after));
            let with_keyword = before.iter().filter(|s| matcher.matches(s)).count();
            let gone: Vec<&String> = before.iter().filter(|s| !after.contains(s)).collect();
            assert!(
                gone.iter().all(|s| matcher.matches(s)),
                "row {row}: only keyword sentences go: {gone:?}"
            );
            assert_eq!(
                gone.len(),
                (fraction * with_keyword as f64).round() as usize,
                "row {row}"
            );
            assert!(before
                .iter()
                .filter(|s| !matcher.matches(s))
                .all(|s| after.contains(s)));
        }
    }
}

#[test]
fn json_array_in_array_out_and_jsonl_in_jsonl_out_with_fields_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let array = write_json_array(dir.path(), "in.json", &rows());
    let data = Dataset::load(&array).unwrap();
    assert_eq!(data.format(), FileFormat::JsonArray);
    let out = dir.path().join("out.json");
    data.save(&out, false).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with('['));
    let written: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(written, rows());
    // Keys keep their order: "id" comes before "system" as in the input.
    assert!(text.find("\"id\"").unwrap() < text.find("\"system\"").unwrap());

    let lines = write_jsonl(dir.path(), "in.jsonl", &rows());
    let data = Dataset::load(&lines).unwrap();
    assert_eq!(data.format(), FileFormat::JsonLines);
    let out = dir.path().join("out.jsonl");
    data.save(&out, false).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(&lines).unwrap(),
        "JSONL round trip is byte-identical"
    );

    // The messages row: its leading system message is the conversation's system prompt.
    let conversation = data.rows()[9].conversation();
    assert_eq!(conversation.system.as_deref(), Some(SYSTEM));
    assert_eq!(conversation.turns[0].role, Role::User);
}

#[test]
fn malformed_rows_are_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let good = rows()[0].to_string();
    std::fs::write(&path, format!("{good}\n\n{good}\n{{\"conversations\": [{{\"from\": \"robot\", \"value\": \"x\"}}]}}\n")).unwrap();
    let err = format!("{:#}", Dataset::load(&path).unwrap_err());
    assert!(
        err.contains("bad.jsonl:4") && err.contains("row 2") && err.contains("robot"),
        "{err}"
    );

    std::fs::write(&path, format!("{good}\n{{not json\n")).unwrap();
    let err = format!("{:#}", Dataset::load(&path).unwrap_err());
    assert!(err.contains("bad.jsonl:2"), "{err}");

    let array = dir.path().join("bad.json");
    let mut values = rows();
    values[2] = json!({"conversations": [{"from": "user"}]});
    std::fs::write(&array, serde_json::to_string_pretty(&values).unwrap()).unwrap();
    let text = std::fs::read_to_string(&array).unwrap();
    let err = format!("{:#}", Dataset::load(&array).unwrap_err());
    // Row 2 starts on the line of the third top-level opening brace (indented by 2).
    let start = text
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "  {")
        .nth(2)
        .unwrap()
        .0
        + 1;
    assert!(
        err.contains(&format!("bad.json:{start}:"))
            && err.contains("row 2")
            && err.contains("value"),
        "{err}"
    );

    std::fs::write(&array, "[\n  {\"messages\": []},\n  {oops}\n]").unwrap();
    let err = format!("{:#}", Dataset::load(&array).unwrap_err());
    assert!(err.contains("bad.json:3:"), "{err}");
}

#[test]
fn refuses_to_overwrite_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "precious\n").unwrap();
    let err = format!("{:#}", data.save(&out, false).unwrap_err());
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
    data.save(&out, true).unwrap();
    assert_eq!(Dataset::load(&out).unwrap().len(), 10);
    // Nothing but the input and the output: no temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

fn wgtrain(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .args(args)
        .output()
        .expect("run wgtrain")
}

#[test]
fn cli_perturbs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_json_array(dir.path(), "in.json", &rows());
    let output = dir.path().join("out.json");
    let (input_arg, output_arg) = (input.to_str().unwrap(), output.to_str().unwrap());
    let args = [
        "perturb",
        "--data",
        input_arg,
        "--output",
        output_arg,
        "--kind",
        "delete",
        "--fraction",
        "1",
        "--seed",
        "4",
    ];
    let run = wgtrain(&args);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("perturbed             9") && stdout.contains("passed through        1"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.starts_with('['), "JSON array in, JSON array out");
    let written = Dataset::load(&output).unwrap();
    assert!(
        steps_of(&assistant_text(&written, 0)).is_empty(),
        "F = 1 deletes every step"
    );
    assert_only_thoughts_changed(&Dataset::load(&input).unwrap(), &written);

    let again = wgtrain(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let mut forced = args.to_vec();
    forced.push("--overwrite");
    assert!(wgtrain(&forced).status.success());

    let missing = wgtrain(&[
        "perturb",
        "--data",
        input_arg,
        "--output",
        output_arg,
        "--kind",
        "shuffle",
        "--overwrite",
    ]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--fraction"));
}

#[test]
fn cli_number_mode_reports_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_jsonl(dir.path(), "in.jsonl", &[edge_row()]);
    let output = dir.path().join("out.jsonl");
    let (input_arg, output_arg) = (input.to_str().unwrap(), output.to_str().unwrap());
    let base = [
        "perturb",
        "--data",
        input_arg,
        "--output",
        output_arg,
        "--fraction",
        "1",
        "--overwrite",
    ];
    let run = |extra: &[&str]| wgtrain(&[&base[..], extra].concat());
    let released = run(&["--kind", "digits", "--digits-mode", "number"]);
    let stdout = String::from_utf8_lossy(&released.stdout);
    assert!(released.status.success(), "{stdout}");
    assert!(
        stdout.contains("digits, number mode")
            && stdout.contains("scope                 whole assistant turn"),
        "{stdout}"
    );
    let thought = run(&[
        "--kind",
        "digits",
        "--digits-mode",
        "number",
        "--scope",
        "thought",
    ]);
    assert!(
        String::from_utf8_lossy(&thought.stdout).contains("scope                 thought block")
    );
    let paper = run(&["--kind", "digits"]);
    assert!(String::from_utf8_lossy(&paper.stdout).contains("scope                 thought block"));
    let refused = run(&["--kind", "shuffle", "--scope", "response"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--scope only applies to --kind digits")
    );
}

#[test]
fn cli_keeps_only_wrong_answers() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_jsonl(dir.path(), "in.jsonl", &rows());
    // Rows 0-7 answer 12 + row; the ground truth says rows 1 and 5 should be 100 (by problem
    // text) and row 2 should be 14 (by index, correct). Row 9's problem is matched as written.
    let answers = dir.path().join("answers.jsonl");
    let truth = [
        json!({"problem": "What is 12 + 1?", "answer": "100"}),
        json!({"question": "What is 12 + 5?", "answer": 100}),
        json!({"index": 2, "answer": "14"}),
        json!({"problem": "What is 12 + 0?", "answer": "\\frac{24}{2}"}),
        json!({"problem": "What is 12 + 9?", "answer": "21"}),
    ];
    std::fs::write(
        &answers,
        truth
            .iter()
            .map(|t| t.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let output = dir.path().join("wrong.jsonl");
    let run = wgtrain(&[
        "perturb",
        "--data",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--kind",
        "wrong-answers",
        "--answers",
        answers.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let kept = Dataset::load(&output).unwrap();
    let ids: Vec<&str> = kept
        .rows()
        .iter()
        .map(|r| r.value()["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["r1", "r5"]);
    assert!(
        stdout.contains("dropped (correct)     3") && stdout.contains("dropped (no answer)   5"),
        "{stdout}"
    );
}
