//! The Qwen2 forward pass, masked loss and KV-cached generation against transformers 4.46.3 / PEFT
//! 0.13.2 on the tiny fixtures (scripts/fixtures/tiny_qwen2.py): logits, `wgtrain loss` with and
//! without an adapter, greedy `wgtrain generate`, the supervision masks, cached decoding against the
//! full forward, and bad inputs.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use wgtrain::data::chat::ChatEncoder;
use wgtrain::data::Dataset;
use wgtrain::model::{Adapter, KvCache, Qwen2};
use wgtrain_kernels::Gpu;

mod common;
use common::max_abs_diff;

const MODELS: [&str; 2] = ["tiny-qwen2-untied", "tiny-qwen2-tied"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn reference(name: &str) -> Value {
    let path = model_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The transformers logits of the reference sequence, [37 * vocab].
fn reference_logits(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(model_dir(name).join("reference.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("logits").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn wgtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .args(args)
        .output()
        .expect("run wgtrain")
}

/// Runs wgtrain, expecting success and one JSON object on the last line of stdout.
fn wgtrain_json(args: &[&str]) -> Value {
    let out = wgtrain(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wgtrain {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn logits_match(name: &str) {
    let gpu = Gpu::from_env().unwrap();
    let model = Qwen2::load(&gpu, model_dir(name)).unwrap();
    let seq = ids(&reference(name)["logits_ids"]);
    let ours = model.logits(&gpu, &seq, 0..seq.len()).unwrap();
    let err = max_abs_diff(&ours, &reference_logits(name));
    println!("{name}: max |logit - transformers| = {err:.3e}");
    assert!(err < 1e-3, "{name}: max logit error {err}");
}

#[test]
fn logits_match_transformers_untied_sharded() {
    logits_match("tiny-qwen2-untied");
}

#[test]
fn logits_match_transformers_tied() {
    logits_match("tiny-qwen2-tied");
}

/// Prefill 60 tokens, then decode the rest one at a time across the 64-key tile boundary: each
/// step's logits equal the full forward's at that position (with a LoRA applied, so the fused path
/// runs on both).
#[test]
fn cached_decoding_matches_the_full_forward() {
    let name = "tiny-qwen2-tied";
    let gpu = Gpu::from_env().unwrap();
    let mut model = Qwen2::load(&gpu, model_dir(name)).unwrap();
    let adapter = Adapter::load(model_dir(name).join("adapter-random"), &model.config).unwrap();
    model.apply_adapter(&gpu, &adapter).unwrap();
    let seq = ids(&reference(name)["logits_ids"]).repeat(2);
    let vocab = model.config.vocab_size;
    let full = model.logits(&gpu, &seq, 0..seq.len()).unwrap();
    let prefill = 60;
    let mut cache = KvCache::new(&gpu, &model, seq.len()).unwrap();
    let mut worst = 0.0f32;
    for t in prefill - 1..seq.len() {
        let new = if t == prefill - 1 {
            &seq[..prefill]
        } else {
            &seq[t..=t]
        };
        let step = model.forward_cached(&gpu, &mut cache, new).unwrap();
        worst = worst.max(max_abs_diff(&step, &full[t * vocab..(t + 1) * vocab]));
    }
    assert_eq!(cache.len(), seq.len());
    println!("{name}: max |cached - full| = {worst:.3e}");
    assert!(worst < 1e-4, "cached decoding differs by {worst}");
    // A full cache refuses more tokens instead of writing past it.
    assert!(model.forward_cached(&gpu, &mut cache, &[1]).is_err());
}

fn loss_matches(name: &str, adapter: bool, batch_size: &str) {
    let dir = model_dir(name);
    let data = fixtures().join("tiny_sft.jsonl");
    let adapter_dir = dir.join("adapter-random");
    let mut args = vec![
        "loss",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        batch_size,
    ];
    if adapter {
        args.extend(["--adapter", adapter_dir.to_str().unwrap()]);
    }
    let out = wgtrain_json(&args);
    let key = if adapter { "loss_with_adapter" } else { "loss" };
    let want = &reference(name)[key];
    let (loss, want_loss) = (
        out["loss"].as_f64().unwrap(),
        want["loss"].as_f64().unwrap(),
    );
    let rel = (loss - want_loss).abs() / want_loss;
    println!("{name} {key}: {loss} vs {want_loss}, relative error {rel:.2e}");
    assert_eq!(out["tokens"], want["tokens"]);
    assert_eq!(out["rows"], 6);
    assert!(rel < 1e-4, "{name} {key}: {loss} vs {want_loss}");
}

#[test]
fn loss_matches_transformers_untied() {
    loss_matches("tiny-qwen2-untied", false, "6");
}

#[test]
fn loss_with_adapter_matches_peft_untied() {
    loss_matches("tiny-qwen2-untied", true, "6");
}

#[test]
fn loss_matches_transformers_tied() {
    loss_matches("tiny-qwen2-tied", false, "1");
}

#[test]
fn loss_with_adapter_matches_peft_tied() {
    loss_matches("tiny-qwen2-tied", true, "3");
}

/// With --max-len 250 only row 4 (236 tokens) keeps supervised tokens; the others are cut inside
/// their system prompt, skipped and counted.
#[test]
fn loss_skips_rows_without_supervised_tokens() {
    let dir = model_dir("tiny-qwen2-untied");
    let data = fixtures().join("tiny_sft.jsonl");
    let out = wgtrain_json(&[
        "loss",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-len",
        "250",
    ]);
    let row4 = &reference("tiny-qwen2-untied")["rows"][4]["mask"];
    let supervised = row4.as_array().unwrap()[1..]
        .iter()
        .filter(|m| m.as_bool().unwrap())
        .count();
    assert_eq!(out["rows"], 1, "{out}");
    assert_eq!(out["skipped_rows"], 5, "{out}");
    assert_eq!(out["truncated_rows"], 5, "{out}");
    assert_eq!(out["tokens"], supervised, "{out}");
}

#[test]
fn greedy_chat_generation_matches_transformers() {
    for name in MODELS {
        let greedy = &reference(name)["greedy"];
        let dir = model_dir(name);
        let out = wgtrain_json(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--chat",
            "--prompt",
            greedy["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "32",
            "--ignore-eos",
            "--json",
        ]);
        assert_eq!(
            ids(&out["prompt_ids"]),
            ids(&greedy["prompt_ids"]),
            "{name}"
        );
        assert_eq!(ids(&out["tokens"]), ids(&greedy["tokens"]), "{name}");
        assert!(out["text"].is_string());
    }
}

/// Sampled generation from a raw (non-chat) prompt: the streamed text equals the JSON text of a
/// second run with the same seed.
#[test]
fn sampled_generation_streams_the_same_text_as_json() {
    let dir = model_dir("tiny-qwen2-untied");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Héllo → 世界 (3 + 4) * 5 =",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "3",
        "--ignore-eos",
    ];
    let json = wgtrain_json(&[&args[..], &["--json"]].concat());
    let streamed = wgtrain(&args);
    assert!(streamed.status.success());
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(text.strip_suffix('\n'), json["text"].as_str(), "{json}");
    assert_eq!(ids(&json["tokens"]).len(), 12);
}

#[test]
fn supervision_masks_match_the_fixture() {
    let dataset = Dataset::load(fixtures().join("tiny_sft.jsonl")).unwrap();
    for name in MODELS {
        let encoder = ChatEncoder::load(model_dir(name)).unwrap();
        let rows = reference(name)["rows"].as_array().unwrap().clone();
        assert_eq!(rows.len(), dataset.len());
        for (i, (row, want)) in dataset.rows().iter().zip(&rows).enumerate() {
            let encoded = encoder.encode_row(row.conversation(), 4096).unwrap();
            assert_eq!(encoded.ids, ids(&want["ids"]), "{name} row {i} ids");
            let mask: Vec<bool> = want["mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_bool().unwrap())
                .collect();
            assert_eq!(encoded.labels_mask, mask, "{name} row {i} mask");
        }
    }
}

fn stderr_of_failure(args: &[&str]) -> String {
    let out = wgtrain(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "wgtrain {args:?} succeeded");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_inputs_are_errors_naming_the_culprit() {
    let data = fixtures().join("tiny_sft.jsonl");
    let missing = fixtures().join("no-such-model");
    let model = model_dir("tiny-qwen2-untied");
    let (data, missing, model) = (
        data.to_str().unwrap(),
        missing.to_str().unwrap(),
        model.to_str().unwrap(),
    );
    let err = stderr_of_failure(&["loss", "--model", missing, "--data", data]);
    assert!(
        err.contains("no-such-model") && err.contains("does not exist"),
        "{err}"
    );
    let err = stderr_of_failure(&["generate", "--model", missing, "--prompt", "hi"]);
    assert!(err.contains("no-such-model"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    let good = std::fs::read_to_string(fixtures().join("tiny_sft.jsonl")).unwrap();
    let first = good.lines().next().unwrap();
    std::fs::write(&bad, format!("{first}\n{{\"conversations\": 3}}\n")).unwrap();
    let err = stderr_of_failure(&["loss", "--model", model, "--data", bad.to_str().unwrap()]);
    assert!(err.contains(&format!("{}:2", bad.display())), "{err}");

    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "fan_in_fan_out": true}"#,
    )
    .unwrap();
    let adapter = adapter.to_str().unwrap();
    let err = stderr_of_failure(&[
        "loss",
        "--model",
        model,
        "--data",
        data,
        "--adapter",
        adapter,
    ]);
    assert!(
        err.contains("adapter_config.json") && err.contains("fan_in_fan_out"),
        "{err}"
    );
}
