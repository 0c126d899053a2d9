//! A checkpoint's tokenizer: `tokenizer.json` (through the `tokenizers` crate, the library behind
//! transformers' fast tokenizers) and, from `tokenizer_config.json`, its special tokens and its Jinja
//! chat template (or `chat_template.jinja`, where newer transformers save it).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Special tokens as tokenizer_config.json names them (their text, not ids); the chat template sees
/// them as `bos_token`, `eos_token`, `pad_token`, `unk_token`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// Token ids and, for each, the byte range of the text it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_template: Option<String>,
    dir: PathBuf,
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json` and the optional `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (which wins over the config's `chat_template`, as in transformers).
    pub fn load(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!("no tokenizer: {} does not exist", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("loading the tokenizer {}: {e}", path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let (special, mut chat_template) = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            parse_tokenizer_config(&text)
                .with_context(|| format!("in {}", config_path.display()))?
        } else {
            (SpecialTokens::default(), None)
        };
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            chat_template = Some(
                std::fs::read_to_string(&jinja_path)
                    .with_context(|| format!("reading {}", jinja_path.display()))?,
            );
        }
        Ok(Tokenizer {
            inner,
            special,
            chat_template,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The checkpoint's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`, with no BOS/EOS added (as `apply_chat_template` tokenizes: the template
    /// writes any special tokens itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.ids)
    }

    /// Token ids of `text` and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoding> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing with {}: {e}", self.dir.display()))?;
        Ok(Encoding {
            ids: encoding.get_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
        })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding with {}: {e}", self.dir.display()))
    }

    /// The id of one token (e.g. "<|im_end|>"), None if the vocabulary lacks it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The eos token's id (Qwen2.5: <|im_end|>), a stop id for generation.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos.as_deref().and_then(|t| self.token_id(t))
    }

    /// Vocabulary size including added tokens (can be below config.json's padded vocab_size).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn parse_tokenizer_config(text: &str) -> Result<(SpecialTokens, Option<String>)> {
    let value: Value = serde_json::from_str(text).context("not valid JSON")?;
    // A token is its text, or an AddedToken object {"content": ...}.
    let token = |key: &str| -> Result<Option<String>> {
        match value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => v
                .get("content")
                .and_then(Value::as_str)
                .map(|s| Some(s.to_string()))
                .with_context(|| format!("{key} = {v} is neither a string nor a token object")),
        }
    };
    let special = SpecialTokens {
        bos: token("bos_token")?,
        eos: token("eos_token")?,
        pad: token("pad_token")?,
        unk: token("unk_token")?,
    };
    // Older checkpoints keep several named templates; transformers uses "default".
    let template = match value.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => {
            let named = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            let source = named
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .context("chat_template is a list without a \"default\" template")?;
            Some(source.to_string())
        }
        Some(v) => bail!("chat_template must be a string or a list of named templates, found {v}"),
    };
    Ok((special, template))
}
