//! A Hugging Face Qwen2 `config.json` (Qwen2.5 and the models distilled into it) and the optional
//! `generation_config.json`. Anything the forward pass would silently get wrong (sliding-window
//! attention, RoPE scaling, dropout, another activation or architecture) is refused here, by name.
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use wgtrain_kernels::bench::ModelShape;

/// The Qwen2.5 checkpoints' sizes: (name, [hidden, intermediate, layers, heads, KV heads,
/// vocabulary], tied embeddings). See [`Qwen2Config::qwen25`].
pub const QWEN25_SIZES: [(&str, [usize; 6], bool); 6] = [
    ("0.5B", [896, 4864, 24, 14, 2, 151936], true),
    ("1.5B", [1536, 8960, 28, 12, 2, 151936], true),
    ("3B", [2048, 11008, 36, 16, 2, 151936], true),
    ("7B", [3584, 18944, 28, 28, 4, 152064], false),
    ("14B", [5120, 13824, 48, 40, 8, 152064], false),
    ("32B", [5120, 27648, 64, 40, 8, 152064], false),
];

/// Storage dtype the checkpoint was saved in (`torch_dtype`, or `dtype` in newer transformers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDType {
    BF16,
    F16,
    F32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim` when the config gives it, else hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// lm_head shares model.embed_tokens.weight (no lm_head.weight tensor).
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub torch_dtype: Option<TorchDType>,
    /// Recorded for completeness: only used when `use_sliding_window`, which is refused.
    pub sliding_window: Option<usize>,
    pub max_window_layers: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

// Defaults are transformers' `Qwen2Config` defaults; the sizes that define the tensors have none.
impl Qwen2Config {
    pub fn load(dir: impl AsRef<Path>) -> Result<Qwen2Config> {
        let path = dir.as_ref().join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the model config {}", path.display()))?;
        Qwen2Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Qwen2Config> {
        let value: Value = serde_json::from_str(json).context("config.json is not valid JSON")?;
        let Some(obj) = value.as_object() else {
            bail!("config.json must be a JSON object");
        };
        check_architecture(obj)?;

        let hidden_size = size(obj, "hidden_size")?;
        let num_attention_heads = size(obj, "num_attention_heads")?;
        let num_key_value_heads =
            opt_size(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_size(obj, "head_dim")? {
            Some(d) => d,
            None => {
                ensure!(
                    hidden_size % num_attention_heads == 0,
                    "num_attention_heads = {num_attention_heads} does not divide hidden_size = \
                     {hidden_size} (and no head_dim is given)"
                );
                hidden_size / num_attention_heads
            }
        };
        ensure!(
            head_dim % 2 == 0,
            "head_dim = {head_dim} is odd; rotary embeddings rotate pairs of dimensions"
        );
        ensure!(
            num_attention_heads % num_key_value_heads == 0,
            "num_key_value_heads = {num_key_value_heads} does not divide num_attention_heads = \
             {num_attention_heads}"
        );

        let hidden_act = opt_str(obj, "hidden_act")?.unwrap_or("silu");
        ensure!(
            hidden_act == "silu",
            "hidden_act = {hidden_act:?} is not supported (Qwen2 uses \"silu\")"
        );
        if opt_bool(obj, "use_sliding_window")?.unwrap_or(false) {
            bail!(
                "use_sliding_window = true is not supported (sliding_window = {}): wgtrain \
                 implements full causal attention only",
                obj.get("sliding_window").unwrap_or(&Value::Null)
            );
        }
        match obj.get("rope_scaling") {
            None | Some(Value::Null) => {}
            Some(v) => {
                bail!("rope_scaling = {v} is not supported (only null: plain RoPE with rope_theta)")
            }
        }
        let attention_dropout = opt_f64(obj, "attention_dropout")?.unwrap_or(0.0);
        ensure!(
            attention_dropout == 0.0,
            "attention_dropout = {attention_dropout} is not supported (wgtrain trains without \
             dropout)"
        );

        let torch_dtype = match opt_str(obj, "torch_dtype")?.or(opt_str(obj, "dtype")?) {
            None => None,
            Some("bfloat16") => Some(TorchDType::BF16),
            Some("float16") => Some(TorchDType::F16),
            Some("float32") => Some(TorchDType::F32),
            Some(other) => {
                bail!("torch_dtype = {other:?} is not supported (bfloat16, float16, float32)")
            }
        };

        let config = Qwen2Config {
            hidden_size,
            intermediate_size: size(obj, "intermediate_size")?,
            num_hidden_layers: size(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: size(obj, "vocab_size")?,
            rope_theta: opt_f64(obj, "rope_theta")?.unwrap_or(10000.0),
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: opt_size(obj, "max_position_embeddings")?.unwrap_or(32768),
            torch_dtype,
            sliding_window: opt_size(obj, "sliding_window")?,
            max_window_layers: opt_size(obj, "max_window_layers")?,
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_id: token_ids(obj, "eos_token_id")?,
        };
        ensure!(
            config.rope_theta > 0.0 && config.rms_norm_eps > 0.0,
            "rope_theta = {} and rms_norm_eps = {} must be positive",
            config.rope_theta,
            config.rms_norm_eps
        );
        Ok(config)
    }

    /// The dimensions that set this model's kernel shapes, for the kernel benchmarks.
    pub fn kernel_shape(&self, name: &'static str) -> ModelShape {
        ModelShape {
            name,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab: self.vocab_size,
        }
    }

    /// The config of a Qwen2.5 checkpoint by size name (`QWEN25_SIZES`: "0.5B" to "32B", the
    /// paper's student): benchmarks and memory estimates at real shapes without a download. The sizes are the
    /// checkpoints'; token ids and sliding-window fields, which no tensor depends on, are left out.
    pub fn qwen25(name: &str) -> Result<Qwen2Config> {
        let Some(&(_, [hidden, inter, layers, heads, kv_heads, vocab], tied)) =
            QWEN25_SIZES.iter().find(|s| s.0 == name)
        else {
            let names: Vec<&str> = QWEN25_SIZES.iter().map(|s| s.0).collect();
            bail!(
                "no Qwen2.5 size {name:?}: expected one of {}",
                names.join(", ")
            );
        };
        Ok(Qwen2Config {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            vocab_size: vocab,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tied,
            max_position_embeddings: 32768,
            torch_dtype: Some(TorchDType::BF16),
            sliding_window: None,
            max_window_layers: None,
            bos_token_id: None,
            eos_token_id: Vec::new(),
        })
    }

    /// Width of the concatenated query heads (q_proj's output).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (k_proj's / v_proj's output).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn check_architecture(obj: &Map<String, Value>) -> Result<()> {
    let model_type = opt_str(obj, "model_type")?;
    let architectures: Vec<&str> = match obj.get("architectures") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(v) => bail!("architectures = {v} must be a list of names"),
    };
    if let Some(other) = architectures.iter().find(|a| **a != "Qwen2ForCausalLM") {
        bail!("unsupported architecture {other:?}: wgtrain loads Qwen2ForCausalLM (Qwen2 / Qwen2.5) checkpoints");
    }
    match model_type {
        Some("qwen2") => Ok(()),
        None if !architectures.is_empty() => Ok(()),
        None => bail!("config.json names neither model_type nor architectures; expected qwen2 / Qwen2ForCausalLM"),
        Some(other) => bail!("unsupported model_type {other:?}: wgtrain loads qwen2 (Qwen2ForCausalLM) checkpoints"),
    }
}

fn opt_size(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n as usize)),
            _ => bail!("{key} = {v} must be a positive integer"),
        },
    }
}

fn size(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    opt_size(obj, key)?.with_context(|| format!("{key} is missing"))
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("{key} = {v} must be a number")),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("{key} = {v} must be true or false")),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .with_context(|| format!("{key} = {v} must be a string")),
    }
}

/// A token id field that may be absent, null, one integer or a list of integers.
fn token_ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{key} = {v} must be a token id or a list of token ids"))
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// `generation_config.json`: the token ids that end a generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// Every id that stops generation (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; the file is optional, and without it the stop ids are
    /// config.json's `eos_token_id`, as transformers does.
    pub fn load(dir: impl AsRef<Path>, config: &Qwen2Config) -> Result<GenerationConfig> {
        let path = dir.as_ref().join("generation_config.json");
        if !path.exists() {
            return Ok(GenerationConfig {
                bos_token_id: config.bos_token_id,
                eos_token_ids: config.eos_token_id.clone(),
                pad_token_id: None,
            });
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        GenerationConfig::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<GenerationConfig> {
        let value: Value =
            serde_json::from_str(json).context("generation_config.json is not valid JSON")?;
        let Some(obj) = value.as_object() else {
            bail!("generation_config.json must be a JSON object");
        };
        Ok(GenerationConfig {
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, "eos_token_id")?,
            pad_token_id: token_ids(obj, "pad_token_id")?.first().copied(),
        })
    }

    /// The stop ids: the configured eos ids plus `extra` (e.g. the tokenizer's eos token), without
    /// duplicates, in order.
    pub fn stop_ids(&self, extra: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut ids = self.eos_token_ids.clone();
        for id in extra {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen25_sizes_by_name() {
        let c = Qwen2Config::qwen25("7B").unwrap();
        assert_eq!((c.hidden_size, c.head_dim, c.kv_dim()), (3584, 128, 512));
        assert!(!c.tie_word_embeddings && c.vocab_size == 152064);
        assert_eq!(Qwen2Config::qwen25("0.5B").unwrap().head_dim, 64);
        let err = Qwen2Config::qwen25("13B").unwrap_err().to_string();
        assert!(
            err.contains("\"13B\"") && err.contains("0.5B, 1.5B, 3B, 7B, 14B, 32B"),
            "{err}"
        );
    }
}
