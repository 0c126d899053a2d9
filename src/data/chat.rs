//! Conversations → token ids and a supervision mask, through the checkpoint's own chat template.
//!
//! The template is the Jinja `chat_template` a checkpoint ships, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`, the special tokens as variables), so the ids equal
//! `apply_chat_template(messages, tokenize=True)`. The built-in Qwen2.5 ChatML template is the
//! fallback for a checkpoint without one.
//!
//! Masking is template-generic: assistant turn i spans from where the render of messages[..=i]
//! departs from the render of messages[..i] with the generation prompt, to the end of the render of
//! messages[..=i] less trailing whitespace. So its content and its end token (`<|im_end|>`) are
//! supervised, and the role header, the newline after the end token, and system and user turns
//! are not. A template that renders earlier turns differently once later ones follow (Qwen3 drops
//! the reasoning of earlier turns) cannot be masked this way and is an error for such rows.
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};

use super::dataset::{Conversation, Message, Role};
use crate::model::tokenizer::{Encoding, SpecialTokens, Tokenizer};

/// Qwen2.5-Instruct's template for conversations without tools, including the default system
/// prompt it inserts when the conversation has none.
pub const QWEN2_5_CHAT_TEMPLATE: &str = concat!(
    "{%- for message in messages %}",
    "{%- if loop.first and message['role'] != 'system' %}",
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. ",
    "You are a helpful assistant.<|im_end|>\\n' }}",
    "{%- endif %}",
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{%- endfor %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
);

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl ChatTemplate {
    pub fn new(source: &str, special: SpecialTokens) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers compiles chat templates with these two options.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .context("building the Jinja syntax configuration")?,
        );
        // .strip(), .split(), .startswith() ... as called by Qwen3 and DeepSeek-R1-Distill templates.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| anyhow!("the chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate { env, special })
    }

    /// The built-in Qwen2.5 ChatML template.
    pub fn qwen2_5() -> ChatTemplate {
        let special = SpecialTokens {
            eos: Some("<|im_end|>".into()),
            pad: Some("<|endoftext|>".into()),
            ..SpecialTokens::default()
        };
        ChatTemplate::new(QWEN2_5_CHAT_TEMPLATE, special).expect("the built-in template compiles")
    }

    /// The tokenizer's own template, or the built-in Qwen2.5 one when the checkpoint has none.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        match tokenizer.chat_template() {
            Some(source) => ChatTemplate::new(source, tokenizer.special_tokens().clone())
                .with_context(|| format!("chat template of {}", tokenizer.dir().display())),
            None => Ok(ChatTemplate::qwen2_5()),
        }
    }

    /// The conversation as text, as transformers renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Value = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(role_name(m.role))),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        // Like transformers: tools/documents are None, and a special token that is not set is
        // undefined rather than empty.
        let mut ctx = vec![
            ("messages", messages),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        for (key, token) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("pad_token", &self.special.pad),
            ("unk_token", &self.special.unk),
        ] {
            if let Some(token) = token {
                ctx.push((key, Value::from(token.as_str())));
            }
        }
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(Value::from_pairs(ctx)))
            .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }
}

/// The system prompt (if any) followed by the turns: the `messages` a chat template takes.
pub fn messages(conversation: &Conversation) -> Vec<Message> {
    let system = conversation.system.as_ref().map(|content| Message {
        role: Role::System,
        content: content.clone(),
    });
    system
        .into_iter()
        .chain(conversation.turns.iter().cloned())
        .collect()
}

/// A training row. `labels_mask[t]` says whether token t is a target of the loss (predicted from
/// position t - 1; the trainer shifts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedRow {
    pub ids: Vec<u32>,
    pub labels_mask: Vec<bool>,
    /// The row was cut to `max_len` tokens.
    pub truncated: bool,
}

impl EncodedRow {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of tokens that are targets of the loss: supervised tokens after the first (token 0
    /// has nothing before it to be predicted from); 0 when truncation cut every assistant turn
    /// away.
    pub fn supervised_targets(&self) -> usize {
        self.labels_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// A tokenizer with its chat template.
pub struct ChatEncoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl ChatEncoder {
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate) -> ChatEncoder {
        ChatEncoder {
            tokenizer,
            template,
        }
    }

    /// The checkpoint's (or tokenizer directory's) tokenizer and chat template.
    pub fn load(dir: impl AsRef<Path>) -> Result<ChatEncoder> {
        let tokenizer = Tokenizer::load(dir)?;
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        Ok(ChatEncoder::new(tokenizer, template))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// `tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`: the ids
    /// of a prompt for generation (with `add_generation_prompt`) or of a whole conversation.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(&self.template.render(messages, add_generation_prompt)?)
    }

    /// A training row from a dataset conversation: every assistant turn supervised.
    pub fn encode_row(&self, conversation: &Conversation, max_len: usize) -> Result<EncodedRow> {
        self.encode_messages(&messages(conversation), max_len)
    }

    /// A training row: the ids of the whole conversation and which of them are supervised, cut to
    /// the first `max_len` tokens.
    pub fn encode_messages(&self, messages: &[Message], max_len: usize) -> Result<EncodedRow> {
        ensure!(max_len > 0, "max_len must be positive");
        let text = self.template.render(messages, false)?;
        let spans = self.assistant_spans(messages, &text)?;
        let Encoding { mut ids, offsets } = self.tokenizer.encode_with_offsets(&text)?;
        // A token is supervised if any of its bytes lie in an assistant span (transformers'
        // char_to_token rule for assistant masks, at the span's edges).
        let mut labels_mask: Vec<bool> = offsets
            .iter()
            .map(|&(start, end)| spans.iter().any(|s| start < s.end && end > s.start))
            .collect();
        let truncated = ids.len() > max_len;
        ids.truncate(max_len);
        labels_mask.truncate(max_len);
        Ok(EncodedRow {
            ids,
            labels_mask,
            truncated,
        })
    }

    /// Byte ranges of `text` (the whole conversation rendered) holding each assistant turn.
    fn assistant_spans(&self, messages: &[Message], text: &str) -> Result<Vec<Range<usize>>> {
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != Role::Assistant {
                continue;
            }
            ensure!(
                i > 0,
                "message 0 is an assistant turn; a conversation must open with a system or user \
                 message"
            );
            let before = self.template.render(&messages[..i], false)?;
            let prompt = self.template.render(&messages[..i], true)?;
            let through = self.template.render(&messages[..=i], false)?;
            // The turn starts where it departs from the generation prompt: a prompt may end with
            // text the rendered turn does not repeat (DeepSeek-R1-Distill's "<think>\n").
            let start = common_prefix(&prompt, &through);
            if !(text.starts_with(&through)
                && through.starts_with(&before)
                && start >= before.len())
            {
                bail!(
                    "the chat template does not render message {i} (assistant) as an extension of \
                     the messages before it, so its tokens cannot be located for the loss mask"
                );
            }
            let end = through.trim_end().len().max(start);
            spans.push(start..end);
        }
        Ok(spans)
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}
