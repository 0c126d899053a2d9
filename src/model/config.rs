//! A Hugging Face Qwen2 `config.json` (Qwen2.5 and the models distilled into it), as transformers
//! 4.4x and 5.x write it, and the optional `generation_config.json`. Every key either version reads
//! that changes the math is honoured or refused by name (sliding-window layers, RoPE scaling,
//! partial rotary, another activation or architecture); docs/architecture.md has the table.
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
    /// `rope_parameters.rope_theta` (transformers 5) or the top-level `rope_theta` (4.x).
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// lm_head shares model.embed_tokens.weight (no lm_head.weight tensor).
    pub tie_word_embeddings: bool,
    /// The length the model was trained for: longer sequences run (as in transformers) with a
    /// warning, see [`Qwen2Config::length_warning`].
    pub max_position_embeddings: usize,
    /// transformers drops attention probabilities only in training, which refuses a non-zero
    /// value ([`Qwen2Config::check_trainable`]); inference is unaffected.
    pub attention_dropout: f64,
    /// `dtype` (transformers 5, which prefers it) or `torch_dtype`.
    pub torch_dtype: Option<TorchDType>,
    /// Recorded for completeness: only used when `use_sliding_window`, which is refused.
    pub sliding_window: Option<usize>,
    pub max_window_layers: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    /// transformers' `nn.Embedding(padding_idx = pad_token_id)`: full fine-tuning gives that
    /// embedding row no gradient from its lookups.
    pub pad_token_id: Option<u32>,
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
        if let Some(q) = obj.get("quantization_config").filter(|v| !v.is_null()) {
            bail!(
                "quantization_config = {q} is not supported: wgtrain loads bf16, f16 or f32 weights"
            );
        }

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
        // transformers' ACT2FN maps both names to the same nn.SiLU.
        ensure!(
            matches!(hidden_act, "silu" | "swish"),
            "hidden_act = {hidden_act:?} is not supported (Qwen2 uses \"silu\")"
        );
        let num_hidden_layers = size(obj, "num_hidden_layers")?;
        check_full_attention(obj, num_hidden_layers)?;
        let attention_dropout = opt_f64(obj, "attention_dropout")?.unwrap_or(0.0);
        ensure!(
            (0.0..1.0).contains(&attention_dropout),
            "attention_dropout = {attention_dropout} must be in [0, 1)"
        );

        // transformers 5 reads `dtype` first.
        let dtype_key = match obj.get("dtype") {
            None | Some(Value::Null) => "torch_dtype",
            Some(_) => "dtype",
        };
        let torch_dtype = match opt_str(obj, dtype_key)? {
            None => None,
            Some("bfloat16") => Some(TorchDType::BF16),
            Some("float16") => Some(TorchDType::F16),
            Some("float32") => Some(TorchDType::F32),
            Some(other) => {
                bail!("{dtype_key} = {other:?} is not supported (bfloat16, float16, float32)")
            }
        };

        let config = Qwen2Config {
            hidden_size,
            intermediate_size: size(obj, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: size(obj, "vocab_size")?,
            rope_theta: rope_theta(obj)?,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: opt_size(obj, "max_position_embeddings")?.unwrap_or(32768),
            attention_dropout,
            torch_dtype,
            sliding_window: opt_count(obj, "sliding_window")?,
            max_window_layers: opt_count(obj, "max_window_layers")?,
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_id: token_ids(obj, "eos_token_id")?,
            pad_token_id: token_ids(obj, "pad_token_id")?.first().copied(),
        };
        if let Some(pad) = config.pad_token_id {
            ensure!(
                (pad as usize) < config.vocab_size,
                "pad_token_id = {pad} is not below vocab_size = {}",
                config.vocab_size
            );
        }
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
            attention_dropout: 0.0,
            torch_dtype: Some(TorchDType::BF16),
            sliding_window: None,
            max_window_layers: None,
            bos_token_id: None,
            eos_token_id: Vec::new(),
            pad_token_id: None,
        })
    }

    /// Refuses what training would compute differently from transformers' train mode: attention
    /// dropout, which wgtrain does not implement.
    pub fn check_trainable(&self) -> Result<()> {
        ensure!(
            self.attention_dropout == 0.0,
            "attention_dropout = {} in config.json: transformers drops attention probabilities \
             while training and wgtrain does not implement it; set it to 0.0 to train without",
            self.attention_dropout
        );
        Ok(())
    }

    /// A warning when a sequence of `tokens` runs past `max_position_embeddings`: RoPE computes
    /// any position (as transformers does, without an error), but the model was not trained there.
    pub fn length_warning(&self, tokens: usize) -> Option<String> {
        (tokens > self.max_position_embeddings).then(|| {
            format!(
                "a sequence of {tokens} tokens runs past max_position_embeddings = {} of \
                 config.json: positions beyond it are computed with plain RoPE, but the model was \
                 not trained on them",
                self.max_position_embeddings
            )
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

/// Refuses every layer transformers would run with sliding-window attention (wgtrain implements
/// full causal attention only). transformers 5 names each layer's kind in `layer_types`; 4.x
/// slides layers `max_window_layers..` when `use_sliding_window` (and 5.x derives `layer_types`
/// so); `sliding_window` alone is inert.
fn check_full_attention(obj: &Map<String, Value>, num_hidden_layers: usize) -> Result<()> {
    if opt_bool(obj, "use_sliding_window")?.unwrap_or(false) {
        bail!(
            "use_sliding_window = true is not supported (sliding_window = {}, max_window_layers = \
             {}): wgtrain implements full causal attention only",
            obj.get("sliding_window").unwrap_or(&Value::Null),
            obj.get("max_window_layers").unwrap_or(&Value::Null)
        );
    }
    let layer_types = match obj.get("layer_types") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(v) => bail!("layer_types = {v} must be a list with one attention kind per layer"),
    };
    ensure!(
        layer_types.len() == num_hidden_layers,
        "layer_types has {} entries but num_hidden_layers = {num_hidden_layers}",
        layer_types.len()
    );
    for (i, kind) in layer_types.iter().enumerate() {
        match kind.as_str() {
            Some("full_attention") => {}
            Some("sliding_attention") => bail!(
                "layer_types[{i}] = \"sliding_attention\" is not supported (sliding_window = {}): \
                 wgtrain implements full causal attention only",
                obj.get("sliding_window").unwrap_or(&Value::Null)
            ),
            _ => bail!(
                "layer_types[{i}] = {kind} is not an attention kind Qwen2 has (\"full_attention\")"
            ),
        }
    }
    Ok(())
}

/// The RoPE base. transformers 5 writes `rope_parameters: {rope_type, rope_theta}`, 4.x a top-level
/// `rope_theta` and an optional `rope_scaling`; 5.x reads either (the dict's theta first, and
/// `rope_scaling` in place of `rope_parameters`). Only plain RoPE (`rope_type` "default") is
/// implemented: every scaling type (YaRN included) is refused, never run unscaled, and so is a
/// layout whose theta the two versions would read differently.
fn rope_theta(obj: &Map<String, Value>) -> Result<f64> {
    let top = opt_f64(obj, "rope_theta")?;
    check_full_rotary(obj.get("partial_rotary_factor"), "partial_rotary_factor")?;
    let mut dicts = Vec::new();
    for key in ["rope_parameters", "rope_scaling"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(dict)) if dict.is_empty() => {}
            Some(Value::Object(dict)) => dicts.push((key, dict)),
            Some(v) => bail!("{key} = {v} must be an object or null"),
        }
    }
    let [(key, dict)] = dicts[..] else {
        ensure!(
            dicts.is_empty(),
            "both rope_parameters and rope_scaling are given: transformers 5 reads rope_scaling \
             only; give the RoPE settings in one of them"
        );
        return Ok(top.unwrap_or(10000.0));
    };
    let rope_type = |name: &str| -> Result<Option<&str>> {
        dict.get(name)
            .map(|v| {
                v.as_str()
                    .with_context(|| format!("{key}.{name} = {v} must be a string"))
            })
            .transpose()
    };
    let (new_name, old_name) = (rope_type("rope_type")?, rope_type("type")?);
    if let (Some(a), Some(b)) = (new_name, old_name) {
        ensure!(
            a == b,
            "{key}.rope_type = {a:?} and {key}.type = {b:?} disagree"
        );
    }
    match new_name.or(old_name).unwrap_or("default") {
        "default" => {}
        other => bail!(
            "{key}.rope_type = {other:?} is not supported: wgtrain implements plain RoPE \
             (rope_type \"default\") only, and refuses scaled RoPE (yarn, dynamic, linear, \
             llama3, longrope, ...) rather than run it unscaled"
        ),
    }
    for (name, value) in dict {
        match name.as_str() {
            "rope_type" | "type" | "rope_theta" => {}
            "partial_rotary_factor" => check_full_rotary(Some(value), &format!("{key}.{name}"))?,
            _ => bail!(
                "{key}.{name} = {value} is not read with rope_type \"default\" (transformers \
                 ignores it with a warning); remove it if plain RoPE is meant"
            ),
        }
    }
    let inner = match dict.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .with_context(|| format!("{key}.rope_theta = {v} must be a number"))?,
        ),
    };
    match (inner, top) {
        (Some(a), Some(b)) if a != b => bail!(
            "{key}.rope_theta = {a} and rope_theta = {b} disagree (transformers 5 reads the first, \
             4.x the second)"
        ),
        // 4.x takes the base from the top-level key only, and its default there.
        (Some(a), None) if key == "rope_scaling" && a != 10000.0 => bail!(
            "rope_scaling.rope_theta = {a} without a top-level rope_theta: transformers 4.x runs \
             theta 10000 there, 5.x {a}; give rope_theta (or rope_parameters)"
        ),
        _ => Ok(inner.or(top).unwrap_or(10000.0)),
    }
}

/// transformers 4.x rotates `partial_rotary_factor` of each head with plain RoPE, 5.x's Qwen2
/// rotates all of it: only 1.0 means the same in both.
fn check_full_rotary(value: Option<&Value>, key: &str) -> Result<()> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_f64() == Some(1.0) => Ok(()),
        Some(v) => bail!("{key} = {v} is not supported: wgtrain rotates the whole head (1.0)"),
    }
}

/// A non-negative integer (fields that may be 0, such as `max_window_layers`).
fn opt_count(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n as usize)),
            None => bail!("{key} = {v} must be a non-negative integer"),
        },
    }
}

fn opt_size(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match opt_count(obj, key)? {
        Some(0) => bail!("{key} = 0 must be a positive integer"),
        n => Ok(n),
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
