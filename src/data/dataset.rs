//! Conversation datasets in the formats users already have: LLaMA-Factory sharegpt (`system`,
//! `conversations` with `from`/`value`) and OpenAI/TRL `messages` (`role`/`content`), in a JSON
//! array or JSON Lines. Each row keeps its original JSON so that a dataset is written back in the
//! same format with every other field untouched.
use super::jsonfile::{self, FileFormat, SourceRow};
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// A row, normalised: the system prompt (sharegpt's `system` field, or a leading system message)
/// and the turns in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Message>,
}

impl Conversation {
    /// The first user turn's text (the problem, in reasoning data).
    pub fn first_user_turn(&self) -> Option<&str> {
        self.turns
            .iter()
            .find(|turn| turn.role == Role::User)
            .map(|turn| turn.content.as_str())
    }
}

/// Which of the two row schemas a row uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// `{"system": ..., "conversations": [{"from": ..., "value": ...}]}`
    ShareGpt,
    /// `{"messages": [{"role": ..., "content": ...}]}`
    Messages,
}

impl Schema {
    fn keys(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Schema::ShareGpt => ("conversations", "from", "value"),
            Schema::Messages => ("messages", "role", "content"),
        }
    }
}

/// One row of a dataset: its conversation and the JSON it came from.
#[derive(Clone, Debug)]
pub struct Row {
    value: Value,
    conversation: Conversation,
    schema: Schema,
    /// Turn i is element i + turn_offset of the message list (1 when a leading system message
    /// became `Conversation::system`).
    turn_offset: usize,
    index: usize,
    line: usize,
}

impl Row {
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// The row as read (with any changes made through `set_turn_content`).
    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn schema(&self) -> Schema {
        self.schema
    }

    /// 0-based position of the row in its file.
    pub fn index(&self) -> usize {
        self.index
    }

    /// 1-based line of the file on which the row starts.
    pub fn line(&self) -> usize {
        self.line
    }

    /// Replaces the text of one turn, in the conversation and in the JSON written back.
    pub fn set_turn_content(&mut self, turn: usize, content: String) {
        let (list_key, _, content_key) = self.schema.keys();
        self.value[list_key][turn + self.turn_offset][content_key] = Value::String(content.clone());
        self.conversation.turns[turn].content = content;
    }

    fn parse(value: Value, index: usize, line: usize) -> Result<Row, String> {
        let object = value.as_object().ok_or("a row must be a JSON object")?;
        let schema = if object.contains_key("conversations") {
            Schema::ShareGpt
        } else if object.contains_key("messages") {
            Schema::Messages
        } else {
            return Err("a row needs \"conversations\" (sharegpt) or \"messages\"".to_string());
        };
        let (list_key, role_key, content_key) = schema.keys();
        let list = object[list_key]
            .as_array()
            .ok_or_else(|| format!("\"{list_key}\" must be an array"))?;
        let mut turns = Vec::with_capacity(list.len());
        for (i, message) in list.iter().enumerate() {
            let field = |key: &str| {
                message
                    .get(key)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{list_key}[{i}] needs a string \"{key}\""))
            };
            let role = match field(role_key)? {
                "user" | "human" => Role::User,
                "assistant" | "gpt" => Role::Assistant,
                "system" => Role::System,
                other => {
                    return Err(format!(
                        "{list_key}[{i}].{role_key} is {other:?}; expected user/human, assistant/gpt or system"
                    ))
                }
            };
            turns.push(Message {
                role,
                content: field(content_key)?.to_string(),
            });
        }
        let mut system = match object.get("system") {
            None | Some(Value::Null) => None,
            Some(Value::String(system)) => Some(system.clone()),
            Some(_) => return Err("\"system\" must be a string".to_string()),
        };
        let mut turn_offset = 0;
        if system.is_none() && turns.first().is_some_and(|turn| turn.role == Role::System) {
            system = Some(turns.remove(0).content);
            turn_offset = 1;
        }
        Ok(Row {
            value,
            conversation: Conversation { system, turns },
            schema,
            turn_offset,
            index,
            line,
        })
    }
}

/// A dataset file, read whole.
#[derive(Clone, Debug)]
pub struct Dataset {
    path: PathBuf,
    format: FileFormat,
    rows: Vec<Row>,
}

impl Dataset {
    /// Reads a JSON array or JSON Lines file of sharegpt or messages rows. A malformed row is an
    /// error naming the file, the line and the row.
    pub fn load(path: impl AsRef<Path>) -> Result<Dataset> {
        let path = path.as_ref();
        let (format, source_rows) = jsonfile::read_rows(path)?;
        let rows = source_rows
            .into_iter()
            .enumerate()
            .map(|(index, SourceRow { value, line })| {
                Row::parse(value, index, line)
                    .map_err(|problem| anyhow!("{}:{line}: row {index}: {problem}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dataset {
            path: path.to_path_buf(),
            format,
            rows,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> FileFormat {
        self.format
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn rows_mut(&mut self) -> &mut [Row] {
        &mut self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Keeps the rows for which `keep` is true, in order.
    pub fn retain(&mut self, keep: impl FnMut(&Row) -> bool) {
        self.rows.retain(keep);
    }

    /// Writes the rows in the format they were read in, atomically; an existing `path` is an
    /// error unless `overwrite`.
    pub fn save(&self, path: impl AsRef<Path>, overwrite: bool) -> Result<()> {
        let values: Vec<&Value> = self.rows.iter().map(Row::value).collect();
        jsonfile::write_rows(path.as_ref(), self.format, &values, overwrite)
    }
}
