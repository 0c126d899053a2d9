//! Chat templates and training masks with the real Qwen2.5 tokenizer from shared/, against the ids
//! transformers' `apply_chat_template` gives (tests/fixtures/chat_template_ids.json, written by
//! scripts/fixtures/chat_template_ids.py).
use std::path::PathBuf;

use serde_json::Value;
use wgtrain::data::chat::{messages, ChatEncoder, ChatTemplate, EncodedRow};
use wgtrain::data::{Conversation, Message, Role};
use wgtrain::model::Tokenizer;

const IM_START: u32 = 151644;
const IM_END: u32 = 151645;
const NEWLINE: u32 = 198;

mod common;

/// shared/ with the tokenizer these tests need. Missing data is a failure, not a skip.
fn shared() -> PathBuf {
    let dir = common::shared();
    let tokenizer = dir.join("tokenizers/qwen2.5/tokenizer.json");
    assert!(
        tokenizer.exists(),
        "{} is missing: these tests need the real Qwen2.5 tokenizer from the shared data \
         directory (set WGTRAIN_SHARED to its path)",
        tokenizer.display()
    );
    dir
}

fn tokenizer_dir() -> PathBuf {
    shared().join("tokenizers/qwen2.5")
}

struct Case {
    name: String,
    template: Option<String>,
    messages: Vec<Message>,
    ids: Vec<u32>,
    prompt_ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template_ids.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let sky_t1 = std::fs::read_to_string(shared().join("sky_t1_system_prompt.txt")).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            name: case["name"].as_str().unwrap().to_string(),
            template: case
                .get("template")
                .map(|t| t.as_str().unwrap().to_string()),
            messages: case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message {
                    role: match m["role"].as_str().unwrap() {
                        "system" => Role::System,
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        other => panic!("role {other}"),
                    },
                    content: m["content"]
                        .as_str()
                        .unwrap()
                        .replace("<sky_t1_system_prompt>", &sky_t1),
                })
                .collect(),
            ids: ids(&case["ids"]),
            prompt_ids: ids(&case["prompt_ids"]),
        })
        .collect()
}

fn encoder(case: &Case) -> ChatEncoder {
    match &case.template {
        None => ChatEncoder::load(tokenizer_dir()).unwrap(),
        Some(source) => {
            let tokenizer = Tokenizer::load(tokenizer_dir()).unwrap();
            let template = ChatTemplate::new(source, tokenizer.special_tokens().clone()).unwrap();
            ChatEncoder::new(tokenizer, template)
        }
    }
}

/// The messages before the last assistant turn: a generation prompt.
fn prompt(messages: &[Message]) -> &[Message] {
    match messages.last() {
        Some(m) if m.role == Role::Assistant => &messages[..messages.len() - 1],
        _ => messages,
    }
}

/// Maximal runs of supervised positions.
fn runs(mask: &[bool]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (t, &m) in mask.iter().chain([false].iter()).enumerate() {
        match (m, start) {
            (true, None) => start = Some(t),
            (false, Some(s)) => {
                runs.push(s..t);
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// What each assistant turn looks like once rendered (the reasoning template rewrites it).
fn rendered_replies(case: &Case) -> Vec<String> {
    if case.name == "reasoning_template" {
        return vec!["2".into(), "4".into()];
    }
    case.messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .map(|m| m.content.clone())
        .collect()
}

/// Mask invariants: one supervised run per assistant turn, decoding to (a whitespace tail of the
/// role header and) the reply and its `<|im_end|>`; the newline after it, role headers, system and
/// user tokens unsupervised.
fn check_mask(encoder: &ChatEncoder, case: &Case, row: &EncodedRow) {
    let tok = encoder.tokenizer();
    let runs = runs(&row.labels_mask);
    let replies = rendered_replies(case);
    assert_eq!(runs.len(), replies.len(), "{}: {runs:?}", case.name);
    let headers: Vec<usize> = (0..row.ids.len() - 1)
        .filter(|&t| {
            row.ids[t] == IM_START
                && tok.decode(&row.ids[t + 1..t + 2], false).unwrap() == "assistant"
        })
        .collect();
    assert_eq!(headers.len(), replies.len(), "{}", case.name);
    for ((run, reply), header) in runs.iter().zip(&replies).zip(&headers) {
        // The run starts inside this assistant turn: after its `<|im_start|>assistant`.
        assert!(
            run.start >= header + 2,
            "{}: run {run:?} header {header}",
            case.name
        );
        assert_eq!(row.ids[run.end - 1], IM_END, "{}", case.name);
        assert_eq!(
            row.ids[run.end], NEWLINE,
            "{}: the newline after <|im_end|>",
            case.name
        );
        assert!(!row.labels_mask[run.end]);
        let text = tok.decode(&row.ids[run.clone()], false).unwrap();
        let head = text
            .strip_suffix(&format!("{reply}<|im_end|>"))
            .unwrap_or_else(|| panic!("{}: supervised {text:?}, reply {reply:?}", case.name));
        assert!(
            head.chars().all(char::is_whitespace),
            "{}: {text:?}",
            case.name
        );
    }
    // Everything up to the first assistant reply (system prompt, user turn, headers) is unsupervised.
    assert!(
        row.labels_mask[..headers[0] + 2].iter().all(|&m| !m),
        "{}",
        case.name
    );
}

#[test]
fn ids_match_transformers_apply_chat_template() {
    let cases = cases();
    assert!(cases.len() >= 6);
    for case in &cases {
        let encoder = encoder(case);
        assert_eq!(
            encoder.apply_chat_template(&case.messages, false).unwrap(),
            case.ids,
            "{}: whole conversation",
            case.name
        );
        assert_eq!(
            encoder
                .apply_chat_template(prompt(&case.messages), true)
                .unwrap(),
            case.prompt_ids,
            "{}: generation prompt",
            case.name
        );
    }
}

#[test]
fn training_rows_supervise_assistant_turns_only() {
    for case in &cases() {
        let encoder = encoder(case);
        let row = encoder.encode_messages(&case.messages, 1 << 20).unwrap();
        assert_eq!(row.ids, case.ids, "{}", case.name);
        assert_eq!(row.labels_mask.len(), row.ids.len());
        assert!(!row.truncated);
        check_mask(&encoder, case, &row);
    }
}

#[test]
fn default_system_prompt_is_inserted_and_unsupervised() {
    let case = cases().into_iter().find(|c| c.name == "no_system").unwrap();
    let encoder = encoder(&case);
    let text = encoder.template().render(&case.messages, false).unwrap();
    assert!(text.starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    ));
    let row = encoder.encode_messages(&case.messages, 4096).unwrap();
    let supervised: Vec<u32> = row
        .ids
        .iter()
        .zip(&row.labels_mask)
        .filter(|(_, &m)| m)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        encoder.tokenizer().decode(&supervised, false).unwrap(),
        "12 * 34 = 408.<|im_end|>"
    );
}

#[test]
fn truncation_keeps_the_first_max_len_tokens() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "multi_turn")
        .unwrap();
    let encoder = encoder(&case);
    let full = encoder.encode_messages(&case.messages, 1 << 20).unwrap();
    let exact = encoder.encode_messages(&case.messages, full.len()).unwrap();
    assert_eq!((exact.truncated, &exact), (false, &full));
    let cut = full.len() - 20;
    let row = encoder.encode_messages(&case.messages, cut).unwrap();
    assert!(row.truncated);
    assert_eq!(row.ids, full.ids[..cut]);
    assert_eq!(row.labels_mask, full.labels_mask[..cut]);
    assert!(row.supervised_targets() < full.supervised_targets() && row.supervised_targets() > 0);
    // Cut inside the system prompt: nothing left to learn from.
    let row = encoder.encode_messages(&case.messages, 5).unwrap();
    assert_eq!(
        (row.len(), row.supervised_targets(), row.truncated),
        (5, 0, true)
    );
    assert!(encoder.encode_messages(&case.messages, 0).is_err());
}

#[test]
fn dataset_conversations_encode_with_their_system_prompt() {
    let case = cases().into_iter().find(|c| c.name == "sky_t1").unwrap();
    let encoder = encoder(&case);
    let conversation = Conversation {
        system: Some(case.messages[0].content.clone()),
        turns: case.messages[1..].to_vec(),
    };
    assert_eq!(messages(&conversation), case.messages);
    let row = encoder.encode_row(&conversation, 16384).unwrap();
    assert_eq!(row.ids, case.ids);
    assert!(row.supervised_targets() > 50);
}

#[test]
fn builtin_template_is_the_fallback_and_matches_qwen2_5() {
    let builtin = ChatTemplate::qwen2_5();
    let own = ChatEncoder::load(tokenizer_dir()).unwrap();
    for case in cases().iter().filter(|c| c.template.is_none()) {
        for generation in [false, true] {
            assert_eq!(
                builtin.render(&case.messages, generation).unwrap(),
                own.template().render(&case.messages, generation).unwrap(),
                "{}",
                case.name
            );
        }
    }
    // A tokenizer directory without tokenizer_config.json falls back to the built-in template; a
    // chat_template.jinja file is used when present.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tokenizer_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let case = cases().into_iter().find(|c| c.name == "no_system").unwrap();
    let fallback = ChatEncoder::load(dir.path()).unwrap();
    assert!(fallback.tokenizer().chat_template().is_none());
    assert_eq!(
        fallback.apply_chat_template(&case.messages, false).unwrap(),
        case.ids
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ messages[0]['content'] }}",
    )
    .unwrap();
    let custom = ChatEncoder::load(dir.path()).unwrap();
    assert_eq!(
        custom.template().render(&case.messages, false).unwrap(),
        "What is 12 * 34?"
    );
}

#[test]
fn template_errors_are_reported() {
    let tokenizer = || Tokenizer::load(tokenizer_dir()).unwrap();
    let msgs = [Message {
        role: Role::User,
        content: "hi".into(),
    }];
    let e = ChatTemplate::new("{% if %}", Default::default())
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("does not compile"), "{e:#}");
    let raising =
        ChatTemplate::new("{{ raise_exception('no tools here') }}", Default::default()).unwrap();
    let e = raising.render(&msgs, false).unwrap_err();
    assert!(format!("{e:#}").contains("no tools here"), "{e:#}");
    // A template whose earlier output depends on later messages cannot be masked by prefixes.
    let unstable = ChatTemplate::new(
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        Default::default(),
    )
    .unwrap();
    let encoder = ChatEncoder::new(tokenizer(), unstable);
    let conversation = [
        msgs[0].clone(),
        Message {
            role: Role::Assistant,
            content: "hello".into(),
        },
    ];
    let e = encoder.encode_messages(&conversation, 100).unwrap_err();
    assert!(format!("{e:#}").contains("message 1 (assistant)"), "{e:#}");
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = ChatEncoder::load(dir.path()).err().unwrap();
    assert!(format!("{e:#}").contains("tokenizer.json"), "{e:#}");
    let tok = Tokenizer::load(tokenizer_dir()).unwrap();
    assert_eq!(tok.token_id("<|im_end|>"), Some(IM_END));
    assert_eq!(tok.eos_id(), Some(IM_END));
    assert_eq!(tok.vocab_size(), 151665);
}
