//! The built-in demo of `wgtrain train` (no --model, no --data): everything it needs is made here,
//! with no download.
//!
//! - Data: synthetic long chain-of-thought rows in the Sky-T1 sharegpt format — a multi-step
//!   arithmetic problem, worked step by step in a `<|begin_of_thought|>` block (steps separated by
//!   blank lines, with occasional re-checks), then a `<|begin_of_solution|>` block ending in
//!   `\boxed{answer}`. Rows vary in length with the number of operations.
//! - Model: a tiny random Qwen2 checkpoint directory — the tiny test tokenizer (byte-level BPE,
//!   414 tokens, Qwen's ChatML template), a small `config.json`, and bf16 weights drawn from a seed
//!   the way transformers initialises Qwen2 (normal(0, 0.02) matrices, norm weights 1, biases 0),
//!   except the (untied) LM head, drawn wider (see [`DEMO_HEAD_STD`]).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::data::jsonfile::{self, FileFormat};
use crate::model::params::names;
use crate::model::{qwen2_tensors, Qwen2Config};

/// The demo rows' system prompt: the first sentence of the Sky-T1 prompt.
pub const DEMO_SYSTEM_PROMPT: &str = "Your role as an assistant involves thoroughly exploring \
questions through a systematic long thinking process before providing the final precise and \
accurate solutions.";

const TOKENIZER_JSON: &str = include_str!("../../tests/fixtures/tiny-tokenizer/tokenizer.json");
const TOKENIZER_CONFIG_JSON: &str =
    include_str!("../../tests/fixtures/tiny-tokenizer/tokenizer_config.json");

/// Rows the demo trains on unless told otherwise.
pub const DEMO_ROWS: usize = 256;

/// A uniform draw in `lo..=hi` (the slight modulo bias is irrelevant for synthetic data, and raw
/// words keep the rows identical across rand versions).
fn draw(rng: &mut ChaCha8Rng, lo: i64, hi: i64) -> i64 {
    lo + (rng.next_u64() % (hi - lo + 1) as u64) as i64
}

/// One arithmetic problem and its worked solution as a sharegpt row.
fn demo_row(rng: &mut ChaCha8Rng) -> Value {
    let operations = draw(rng, 2, 7);
    let mut value = draw(rng, 2, 60);
    let mut expression = value.to_string();
    let mut steps = Vec::new();
    let mut chain = Vec::new();
    for i in 0..operations {
        let (op, operand) = match draw(rng, 0, 2) {
            0 => ('+', draw(rng, 1, 99)),
            1 => ('-', draw(rng, 1, 50)),
            _ => ('*', draw(rng, 2, 9)),
        };
        let result = match op {
            '+' => value + operand,
            '-' => value - operand,
            _ => value * operand,
        };
        expression = if i == 0 {
            format!("{expression} {op} {operand}")
        } else {
            format!("({expression}) {op} {operand}")
        };
        let lead = match i {
            0 => "First, compute the innermost operation:",
            _ if i == operations - 1 => "Finally,",
            _ => ["Next,", "Then", "Now"][draw(rng, 0, 2) as usize],
        };
        steps.push(format!("{lead} {value} {op} {operand} = {result}."));
        if draw(rng, 0, 3) == 0 {
            steps.push(format!(
                "Wait, let me double-check that: {value} {op} {operand} = {result}. Yes, that \
                 is right."
            ));
        }
        chain.push(format!("{value} {op} {operand} = {result}"));
        value = result;
    }
    steps.push(format!("So the value of the expression is {value}."));
    let thought = steps.join("\n\n");
    let solution = format!(
        "Working from the innermost parentheses outwards:\n\n{}\n\nThe final answer is \
         \\boxed{{{value}}}.",
        chain.join(", then ")
    );
    json!({
        "system": DEMO_SYSTEM_PROMPT,
        "conversations": [
            {"from": "user", "value": format!(
                "Return your final response within \\boxed{{}}. Compute {expression}.")},
            {"from": "assistant", "value": format!(
                "<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n\
                 <|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>")},
        ],
    })
}

/// `n` synthetic rows, the same for the same seed.
pub fn demo_rows(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| demo_row(&mut rng)).collect()
}

/// Writes `demo_rows(n, seed)` as a JSON Lines file (replacing `path`).
pub fn write_demo_dataset(path: &Path, n: usize, seed: u64) -> Result<()> {
    let rows = demo_rows(n, seed);
    let refs: Vec<&Value> = rows.iter().collect();
    jsonfile::write_rows(path, FileFormat::JsonLines, &refs, true)
}

/// The demo model's `config.json`: a Qwen2 with 2 layers of width 128 (2 heads of 64, one KV
/// head) over the tiny tokenizer's vocabulary (414 tokens, padded to 421 as the test fixtures).
pub fn demo_config_json() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 421,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": null,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    })
}

/// Writes the demo model into `dir` (created if missing): tokenizer, configs and weights drawn
/// from `seed`.
pub fn write_demo_model(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = demo_config_json();
    let generation = json!({"eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": false});
    for (name, text) in [
        ("tokenizer.json", TOKENIZER_JSON.to_string()),
        ("tokenizer_config.json", TOKENIZER_CONFIG_JSON.to_string()),
        ("config.json", serde_json::to_string_pretty(&config)?),
        (
            "generation_config.json",
            serde_json::to_string_pretty(&generation)?,
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let config = Qwen2Config::parse(&config.to_string()).context("the demo config")?;
    write_random_weights(dir, &config, seed)
}

/// A standard normal draw (Box–Muller on raw ChaCha8 words).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // 53-bit uniforms in (0, 1]: ln(u1) stays finite.
    let uniform = |rng: &mut ChaCha8Rng| ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Standard deviation of the demo's LM head. After the final RMSNorm the hidden state has norm
/// sqrt(hidden), so a frozen head of std 0.02 (transformers' default) caps every logit near
/// ±0.02·hidden ≈ ±2.6: no adapter could make a confident prediction, and LoRA, which trains
/// neither the head nor the embedding, could barely lower the loss. At 0.1 logits reach ±13. The
/// head is untied: tied to so wide an embedding, each token would predict itself at logit ~13.
pub const DEMO_HEAD_STD: f64 = 0.1;

/// Writes `dir/model.safetensors` with every tensor of `config`'s Qwen2 in bf16, initialised as
/// transformers' `Qwen2PreTrainedModel._init_weights` does with initializer_range 0.02, but for the
/// LM head, of std [`DEMO_HEAD_STD`].
pub fn write_random_weights(dir: &Path, config: &Qwen2Config, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let specs = qwen2_tensors(config);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let value = |rng: &mut ChaCha8Rng| {
                if spec.name.ends_with("norm.weight") {
                    1.0
                } else if spec.name.ends_with(".bias") {
                    0.0
                } else if spec.name == names::LM_HEAD {
                    DEMO_HEAD_STD * normal(rng)
                } else {
                    0.02 * normal(rng)
                }
            };
            (0..n)
                .flat_map(|_| half::bf16::from_f64(value(&mut rng)).to_le_bytes())
                .collect()
        })
        .collect();
    let views = specs
        .iter()
        .zip(&data)
        .map(|(spec, bytes)| {
            TensorView::new(Dtype::BF16, spec.shape.clone(), bytes)
                .map(|view| (spec.name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("preparing the demo weights: {e}"))?;
    let path = dir.join("model.safetensors");
    // transformers refuses safetensors files without format metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    crate::data::jsonfile::set_created_mode(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::ChatEncoder;
    use crate::data::Dataset;
    use crate::model::Weights;

    #[test]
    fn rows_are_deterministic_varied_and_in_sky_t1_format() {
        let rows = demo_rows(50, 3);
        assert_eq!(rows, demo_rows(50, 3));
        assert_ne!(rows, demo_rows(50, 4));
        let answers: Vec<&str> = rows
            .iter()
            .map(|r| r["conversations"][1]["value"].as_str().unwrap())
            .collect();
        for answer in &answers {
            assert!(answer.starts_with("<|begin_of_thought|>\n\n"));
            assert!(answer.contains("\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"));
            assert!(answer.ends_with(".\n\n<|end_of_solution|>"));
            assert!(answer.contains("\\boxed{"));
        }
        let lengths: Vec<usize> = answers.iter().map(|a| a.len()).collect();
        let (min, max) = (lengths.iter().min().unwrap(), lengths.iter().max().unwrap());
        assert!(max > &(2 * min), "lengths {min}..{max}");
    }

    #[test]
    fn answers_are_correct() {
        // The boxed answer equals the expression, evaluated independently of the generator.
        for row in demo_rows(30, 9) {
            let question = row["conversations"][0]["value"].as_str().unwrap();
            let expression = question
                .split("Compute ")
                .nth(1)
                .unwrap()
                .trim_end_matches('.');
            let answer = row["conversations"][1]["value"].as_str().unwrap();
            let boxed = answer
                .split("\\boxed{")
                .nth(1)
                .unwrap()
                .split('}')
                .next()
                .unwrap();
            assert_eq!(
                eval(expression),
                boxed.parse::<i64>().unwrap(),
                "{expression}"
            );
        }
    }

    /// Left-to-right evaluation of `((a op b) op c) ...` as the generator writes it.
    fn eval(expression: &str) -> i64 {
        let tokens: Vec<&str> = expression
            .split_whitespace()
            .map(|t| t.trim_matches(|c| c == '(' || c == ')'))
            .collect();
        let mut value: i64 = tokens[0].parse().unwrap();
        for pair in tokens[1..].chunks(2) {
            let operand: i64 = pair[1].parse().unwrap();
            value = match pair[0] {
                "+" => value + operand,
                "-" => value - operand,
                _ => value * operand,
            };
        }
        value
    }

    #[test]
    fn the_demo_model_loads_and_the_rows_encode() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        write_demo_model(&model, 1).unwrap();
        let config = Qwen2Config::load(&model).unwrap();
        assert_eq!(
            (config.hidden_size, config.head_dim, config.vocab_size),
            (128, 64, 421)
        );
        let weights = Weights::open(&model).unwrap();
        weights.validate(&config).unwrap();
        let norm = weights
            .get("model.layers.1.post_attention_layernorm.weight")
            .unwrap();
        assert!(norm.to_f32().iter().all(|&x| x == 1.0));
        let bias = weights.get("model.layers.0.self_attn.k_proj.bias").unwrap();
        assert!(bias.to_f32().iter().all(|&x| x == 0.0));
        let std = |name: &str| {
            let v = weights.get(name).unwrap().to_f32();
            (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let head = std("lm_head.weight");
        assert!((head - DEMO_HEAD_STD).abs() < 0.005, "lm_head std {head}");
        let embed = std("model.embed_tokens.weight");
        assert!((embed - 0.02).abs() < 0.001, "embedding std {embed}");
        let q = std("model.layers.0.self_attn.q_proj.weight");
        assert!((q - 0.02).abs() < 0.001, "q_proj std {q}");

        let again = tmp.path().join("again");
        write_demo_model(&again, 1).unwrap();
        let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(bytes(&model), bytes(&again));

        let data = tmp.path().join("demo.jsonl");
        write_demo_dataset(&data, 20, 7).unwrap();
        let dataset = Dataset::load(&data).unwrap();
        assert_eq!(dataset.len(), 20);
        let encoder = ChatEncoder::load(&model).unwrap();
        let vocab = config.vocab_size as u32;
        for row in dataset.rows() {
            assert_eq!(
                row.conversation().system.as_deref(),
                Some(DEMO_SYSTEM_PROMPT)
            );
            let encoded = encoder.encode_row(row.conversation(), 4096).unwrap();
            assert!(!encoded.truncated);
            assert!(encoded.supervised_targets() > 20);
            assert!(encoded.ids.iter().all(|&id| id < vocab));
        }
    }
}
