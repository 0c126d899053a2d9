//! Checkpoint loading: config.json / generation_config.json parsing and its refusals (both
//! transformers 4.x and 5.x layouts), safetensors (single file and sharded) on tiny checkpoints
//! written here, the errors for broken ones, one bf16/f16 upload to the device, and the
//! transformers 5.25 fixture's logits under either config layout.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use wgtrain::model::{
    qwen2_tensors, to_device, GenerationConfig, Grads, Qwen2, Qwen2Config, TorchDType, WeightDType,
    Weights, IGNORE,
};
use wgtrain_kernels::{DType, Gpu};

/// Qwen2.5-7B-Instruct's config.json.
const QWEN2_5_7B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
  "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
  "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
  "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 152064, "rope_scaling": null
}"#;

/// A tiny Qwen2 config: 2 layers, GQA 2:1, head_dim 4.
fn tiny_config(tied: bool) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "use_sliding_window": false,
        "sliding_window": 4096, "max_window_layers": 2, "rope_scaling": null,
        "attention_dropout": 0.0, "eos_token_id": 3
    })
}

fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

fn parse_err(config: &Value) -> String {
    format!("{:#}", Qwen2Config::parse(&config.to_string()).unwrap_err())
}

/// Element j of tensor number t (< 32), distinct across tensors and exact in bf16 (8 significant
/// bits).
fn value(t: usize, j: usize) -> f32 {
    t as f32 + (j % 8) as f32 / 8.0
}

fn bf16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values
        .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// The tensors of `config` as (name, shape, bf16 bytes).
fn tensors_for(config: &Qwen2Config) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    qwen2_tensors(config)
        .into_iter()
        .enumerate()
        .map(|(t, spec)| {
            let n: usize = spec.shape.iter().product();
            let bytes = bf16_bytes((0..n).map(|j| value(t, j)));
            (spec.name, spec.shape, bytes)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)], dtype: Dtype) {
    let views = tensors.iter().map(|(name, shape, bytes)| {
        (
            name.clone(),
            TensorView::new(dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A checkpoint directory: config.json and model.safetensors, or `shards` files plus the index.
fn write_checkpoint(dir: &Path, config: &Value, shards: usize) -> Qwen2Config {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let parsed = Qwen2Config::load(dir).unwrap();
    let tensors = tensors_for(&parsed);
    if shards == 1 {
        write_safetensors(&dir.join("model.safetensors"), &tensors, Dtype::BF16);
        return parsed;
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (s, part) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        write_safetensors(&dir.join(&file), part, Dtype::BF16);
        for (name, _, _) in part {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    parsed
}

fn open_err(dir: &Path) -> String {
    match Weights::open(dir) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn parses_qwen2_5_7b_config() {
    let c = Qwen2Config::parse(QWEN2_5_7B).unwrap();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (3584, 18944, 28)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (28, 4, 128)
    );
    assert_eq!((c.q_dim(), c.kv_dim()), (3584, 512));
    assert_eq!(c.vocab_size, 152064);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.max_position_embeddings, 32768);
    assert_eq!(c.torch_dtype, Some(TorchDType::BF16));
    assert_eq!(
        (c.sliding_window, c.max_window_layers),
        (Some(131072), Some(28))
    );
    assert_eq!(
        (c.bos_token_id, c.eos_token_id.clone()),
        (Some(151643), vec![151645])
    );
    let specs = qwen2_tensors(&c);
    assert_eq!(specs.len(), 1 + 28 * 12 + 1 + 1);
    assert_eq!(specs[0].shape, vec![152064, 3584]);
    let k = specs
        .iter()
        .find(|s| s.name == "model.layers.27.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.shape, vec![512, 3584]);
}

#[test]
fn config_defaults_and_explicit_head_dim() {
    let minimal = json!({
        "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 151936
    });
    let c = Qwen2Config::parse(&minimal.to_string()).unwrap();
    // transformers' Qwen2Config defaults.
    assert_eq!(c.num_key_value_heads, 4);
    assert_eq!(c.head_dim, 4);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-6));
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.torch_dtype, None);
    // An explicit head_dim wins, even when heads * head_dim != hidden_size.
    let c = Qwen2Config::parse(&with(minimal, "head_dim", json!(8)).to_string()).unwrap();
    assert_eq!((c.head_dim, c.q_dim()), (8, 32));
}

#[test]
fn config_refusals_name_what_was_found() {
    let base = tiny_config(false);
    let llama = with(
        with(base.clone(), "architectures", json!(["LlamaForCausalLM"])),
        "model_type",
        json!("llama"),
    );
    assert!(
        parse_err(&llama).contains("\"LlamaForCausalLM\""),
        "{}",
        parse_err(&llama)
    );
    let qwen3 = with(base.clone(), "model_type", json!("qwen3"));
    let qwen3 = with(qwen3, "architectures", Value::Null);
    assert!(parse_err(&qwen3).contains("\"qwen3\""));

    let sliding = with(base.clone(), "use_sliding_window", json!(true));
    let e = parse_err(&sliding);
    assert!(
        e.contains("use_sliding_window = true") && e.contains("4096"),
        "{e}"
    );

    let yarn = with(
        base.clone(),
        "rope_scaling",
        json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    );
    let e = parse_err(&yarn);
    assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");

    let e = parse_err(&with(base.clone(), "hidden_act", json!("gelu")));
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = parse_err(&with(base.clone(), "attention_dropout", json!(1.5)));
    assert!(e.contains("attention_dropout = 1.5"), "{e}");

    let e = parse_err(&with(base.clone(), "num_attention_heads", json!(3)));
    assert!(
        e.contains("num_attention_heads = 3") && e.contains("hidden_size = 16"),
        "{e}"
    );
    let e = parse_err(&with(base.clone(), "num_key_value_heads", json!(3)));
    assert!(e.contains("num_key_value_heads = 3"), "{e}");
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("vocab_size");
    assert!(parse_err(&missing).contains("vocab_size is missing"));
    let e = parse_err(&with(base, "hidden_size", json!("16")));
    assert!(e.contains("hidden_size"), "{e}");
}

#[test]
fn missing_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = format!("{:#}", Qwen2Config::load(dir.path()).unwrap_err());
    assert!(e.contains("config.json"), "{e}");
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
    // A malformed file names itself too.
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": ").unwrap();
    let e = format!("{:#}", Qwen2Config::load(dir.path()).unwrap_err());
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn generation_config_stop_ids() {
    let dir = tempfile::tempdir().unwrap();
    let config = Qwen2Config::parse(QWEN2_5_7B).unwrap();
    // Without the file: config.json's eos.
    let g = GenerationConfig::load(dir.path(), &config).unwrap();
    assert_eq!(g.eos_token_ids, vec![151645]);
    // Qwen2.5-Instruct's file: a list of eos ids.
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
            "eos_token_id": [151645, 151643], "temperature": 0.7}"#,
    )
    .unwrap();
    let g = GenerationConfig::load(dir.path(), &config).unwrap();
    assert_eq!(g.bos_token_id, Some(151643));
    assert_eq!(g.pad_token_id, Some(151643));
    assert_eq!(g.stop_ids([151645]), vec![151645, 151643]);
    let one = GenerationConfig::parse(r#"{"eos_token_id": 7}"#).unwrap();
    assert_eq!(one.stop_ids([9, 7]), vec![7, 9]);
    let bad = GenerationConfig::parse(r#"{"eos_token_id": "x"}"#).unwrap_err();
    assert!(format!("{bad:#}").contains("eos_token_id"));
}

#[test]
fn tied_single_file_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_checkpoint(dir.path(), &tiny_config(true), 1);
    let specs = qwen2_tensors(&config);
    assert!(specs.iter().all(|s| s.name != "lm_head.weight"));
    assert_eq!(specs.len(), 1 + 2 * 12 + 1);
    let w = Weights::open(dir.path()).unwrap();
    w.validate(&config).unwrap();
    assert_eq!(w.names().len(), specs.len());
    assert_eq!(w.files().count(), 1);

    let (t, spec) = specs
        .iter()
        .enumerate()
        .find(|(_, s)| s.name == "model.layers.1.self_attn.v_proj.bias")
        .unwrap();
    let v = w.expect(&spec.name, &[8]).unwrap();
    assert_eq!(v.dtype, WeightDType::BF16);
    assert_eq!(v.shape, &[8]);
    assert_eq!(v.bytes.len(), 16);
    let expected: Vec<f32> = (0..8).map(|j| value(t, j)).collect();
    assert_eq!(v.to_f32(), expected);
}

#[test]
fn untied_sharded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_checkpoint(dir.path(), &tiny_config(false), 3);
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.files().count(), 3);
    w.validate(&config).unwrap();
    let specs = qwen2_tensors(&config);
    assert_eq!(specs.last().unwrap().name, "lm_head.weight");
    // The first and last tensors live in different shards.
    let first = w.get("model.embed_tokens.weight").unwrap();
    let last = w.get("lm_head.weight").unwrap();
    assert_ne!(first.file, last.file);
    assert_eq!(last.shape, &[32, 16]);
    let t = specs.len() - 1;
    assert_eq!(last.to_f32()[..3], [value(t, 0), value(t, 1), value(t, 2)]);
}

#[test]
fn f16_and_f32_tensors_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let halves: Vec<u8> = [1.5f32, -2.25, 65504.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let floats: Vec<u8> = [0.1f32, -3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let path = dir.path().join("model.safetensors");
    let views = vec![
        ("h", TensorView::new(Dtype::F16, vec![3], &halves).unwrap()),
        (
            "f",
            TensorView::new(Dtype::F32, vec![2, 1], &floats).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let w = Weights::open(dir.path()).unwrap();
    let h = w.get("h").unwrap();
    assert_eq!(
        (h.dtype, h.to_f32()),
        (WeightDType::F16, vec![1.5, -2.25, 65504.0])
    );
    let f = w.expect("f", &[2, 1]).unwrap();
    assert_eq!((f.dtype, f.to_f32()), (WeightDType::F32, vec![0.1, -3.0]));
    // Other dtypes are refused by name.
    let ints = [0u8; 4];
    let views = vec![("i", TensorView::new(Dtype::I32, vec![1], &ints).unwrap())];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let w = Weights::open(dir.path()).unwrap();
    let e = format!("{:#}", w.get("i").unwrap_err());
    assert!(e.contains("tensor i") && e.contains("I32"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &tiny_config(true), 1);
    // The same files read with a config whose MLP is wider.
    let wider = with(tiny_config(true), "intermediate_size", json!(40));
    let config = Qwen2Config::parse(&wider.to_string()).unwrap();
    let w = Weights::open(dir.path()).unwrap();
    let e = format!("{:#}", w.validate(&config).unwrap_err());
    assert!(e.contains("6 problems"), "{e}");
    assert!(
        e.contains("tensor model.layers.0.mlp.gate_proj.weight")
            && e.contains("expected shape [40, 16], found [24, 16] (BF16)"),
        "{e}"
    );
    assert!(e.contains("model.layers.1.mlp.down_proj.weight"), "{e}");

    // Untied config against a tied checkpoint: lm_head is missing.
    let untied = Qwen2Config::parse(&tiny_config(false).to_string()).unwrap();
    let e = format!("{:#}", w.validate(&untied).unwrap_err());
    assert!(
        e.contains("(1 problem)") && e.contains("tensor lm_head.weight not found in"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        w.get("model.layers.9.mlp.up_proj.weight").unwrap_err()
    );
    assert!(
        e.contains("model.layers.9.mlp.up_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &tiny_config(true), 1);
    let path = dir.path().join("model.safetensors");
    let whole = std::fs::read(&path).unwrap();

    for cut in [whole.len() - 1, whole.len() / 2, 100, 7, 0] {
        std::fs::write(&path, &whole[..cut]).unwrap();
        let e = open_err(dir.path());
        assert!(e.contains(&path.display().to_string()), "cut at {cut}: {e}");
    }
    // A header length far past the end of the file.
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&path, &huge).unwrap();
    assert!(open_err(dir.path()).contains("model.safetensors"));
    // A plausible length followed by garbage instead of JSON.
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 16]);
    std::fs::write(&path, &garbage).unwrap();
    assert!(open_err(dir.path()).contains("not a valid safetensors file"));
    // Valid JSON whose offsets point past the data.
    let header = br#"{"x":{"dtype":"BF16","shape":[4],"data_offsets":[0,8000]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    lying.extend_from_slice(&[0; 8]);
    std::fs::write(&path, &lying).unwrap();
    assert!(open_err(dir.path()).contains("model.safetensors"));
}

#[test]
fn sharded_errors_name_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &tiny_config(false), 2);
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();

    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    std::fs::remove_file(&shard).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("model-00002-of-00002.safetensors")
            && e.contains("model.safetensors.index.json")
            && e.contains("does not exist"),
        "{e}"
    );

    // An index that maps a tensor to a shard that lacks it.
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: HashMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index.insert(
        "weight_map".into(),
        json!({"model.norm.weight": "model-00001-of-00002.safetensors"}),
    );
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("does not hold it"),
        "{e}"
    );
    index.insert(
        "weight_map".into(),
        json!({"model.norm.weight": "../model-00001-of-00002.safetensors"}),
    );
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("must be a file name in the same directory"),
        "{e}"
    );

    let empty = tempfile::tempdir().unwrap();
    assert!(open_err(empty.path()).contains("model.safetensors"));
}

#[test]
fn upload_to_device_bf16_straight_f16_converted() {
    let gpu = Gpu::from_env()
        .expect("a wgpu adapter (install mesa-vulkan-drivers on a CPU-only machine)");
    let dir = tempfile::tempdir().unwrap();
    // Odd row length: the last bf16 word of the tensor needs its padding half.
    let bf: Vec<f32> = (0..15).map(|j| j as f32 * 0.5 - 3.0).collect();
    let bf_bytes = bf16_bytes(bf.iter().copied());
    // 1 + 2^-10 is exact in f16 and rounds to 1.0 in bf16 (ties to even).
    let h: Vec<f32> = vec![1.0 + 1.0 / 1024.0, -0.5, 3.0];
    let h_bytes: Vec<u8> = h
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let views = vec![
        (
            "bf",
            TensorView::new(Dtype::BF16, vec![3, 5], &bf_bytes).unwrap(),
        ),
        ("h", TensorView::new(Dtype::F16, vec![3], &h_bytes).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let w = Weights::open(dir.path()).unwrap();

    let t = to_device(&gpu, &w.get("bf").unwrap(), DType::BF16).unwrap();
    assert_eq!((t.shape(), t.dtype()), (&[3usize, 5][..], DType::BF16));
    assert_eq!(t.to_bytes(&gpu).unwrap(), bf_bytes);
    let t = to_device(&gpu, &w.get("bf").unwrap(), DType::F32).unwrap();
    assert_eq!(t.to_f32(&gpu).unwrap(), bf);

    let t = to_device(&gpu, &w.get("h").unwrap(), DType::BF16).unwrap();
    assert_eq!(t.to_f32(&gpu).unwrap(), vec![1.0, -0.5, 3.0]);
    let t = to_device(&gpu, &w.get("h").unwrap(), DType::F32).unwrap();
    assert_eq!(t.to_f32(&gpu).unwrap(), h);
    assert!(to_device(&gpu, &w.get("h").unwrap(), DType::U32).is_err());
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of fixture `name` in a temporary directory, its config.json rewritten by `edit`.
fn fixture_copy(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut config = read_json(&dir.path().join("config.json"));
    edit(config.as_object_mut().unwrap());
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn remove(config: &Value, key: &str) -> Value {
    let mut config = config.clone();
    config.as_object_mut().unwrap().remove(key);
    config
}

/// tiny_config in transformers 5's layout: `rope_parameters`, `dtype`, `layer_types`.
fn tiny_config_v5() -> Value {
    let base = remove(&remove(&tiny_config(false), "rope_theta"), "torch_dtype");
    let base = remove(&base, "rope_scaling");
    let base = with(base, "dtype", json!("float32"));
    let base = with(
        base,
        "layer_types",
        json!(["full_attention", "full_attention"]),
    );
    with(
        base,
        "rope_parameters",
        json!({"rope_theta": 500000.0, "rope_type": "default"}),
    )
}

#[test]
fn transformers5_layout_is_read() {
    // As transformers 5.25 saved it (scripts/fixtures/tiny_qwen2_v5.py): no top-level rope_theta.
    let c = Qwen2Config::load(fixture("tiny-qwen2-v5")).unwrap();
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.torch_dtype, Some(TorchDType::BF16));
    assert_eq!((c.head_dim, c.num_hidden_layers), (64, 2));

    let v5 = tiny_config_v5();
    let c = Qwen2Config::parse(&v5.to_string()).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.torch_dtype, Some(TorchDType::F32));
    // The old `type` name, and a rope_parameters without theta (the top-level key then counts).
    let old_name = with(v5.clone(), "rope_parameters", json!({"type": "default"}));
    let c = Qwen2Config::parse(&with(old_name.clone(), "rope_theta", json!(2e5)).to_string());
    assert_eq!(c.unwrap().rope_theta, 2e5);
    assert_eq!(
        Qwen2Config::parse(&old_name.to_string())
            .unwrap()
            .rope_theta,
        10000.0
    );
    // Both theta keys, equal: fine. rope_scaling "default" of 4.x, with the top-level theta.
    let both = with(v5.clone(), "rope_theta", json!(500000.0));
    assert_eq!(
        Qwen2Config::parse(&both.to_string()).unwrap().rope_theta,
        500000.0
    );
    let scaling = with(
        tiny_config(false),
        "rope_scaling",
        json!({"rope_type": "default"}),
    );
    assert_eq!(
        Qwen2Config::parse(&scaling.to_string()).unwrap().rope_theta,
        10000.0
    );
    // transformers 5 prefers `dtype`; `torch_dtype` alone is 4.x.
    let c = Qwen2Config::parse(&with(v5.clone(), "torch_dtype", json!("bfloat16")).to_string());
    assert_eq!(c.unwrap().torch_dtype, Some(TorchDType::F32));
    let e = parse_err(&with(v5, "dtype", json!("int8")));
    assert!(e.contains("dtype = \"int8\" is not supported"), "{e}");
}

#[test]
fn scaled_or_ambiguous_rope_is_refused_by_key() {
    let v5 = tiny_config_v5();
    for kind in ["yarn", "dynamic", "linear", "llama3", "longrope"] {
        let scaled = json!({"rope_type": kind, "rope_theta": 1e6, "factor": 4.0});
        let e = parse_err(&with(v5.clone(), "rope_parameters", scaled));
        assert!(
            e.contains(&format!("rope_parameters.rope_type = \"{kind}\"")),
            "{e}"
        );
        // 4.x's rope_scaling, with the old `type` name as Qwen2.5's YaRN recipe writes it.
        let scaled =
            json!({"type": kind, "factor": 4.0, "original_max_position_embeddings": 32768});
        let e = parse_err(&with(tiny_config(false), "rope_scaling", scaled));
        assert!(
            e.contains(&format!("rope_scaling.rope_type = \"{kind}\"")),
            "{e}"
        );
    }
    let cases = [
        (
            with(v5.clone(), "rope_theta", json!(10000.0)),
            "rope_parameters.rope_theta = 500000 and rope_theta = 10000 disagree",
        ),
        (
            with(v5.clone(), "rope_scaling", json!({"rope_type": "default"})),
            "both rope_parameters and rope_scaling",
        ),
        (
            with(tiny_config(false), "rope_scaling", json!({"rope_theta": 1e6})),
            "rope_scaling.rope_theta = 1000000 and rope_theta = 10000 disagree",
        ),
        (
            with(
                remove(&tiny_config(false), "rope_theta"),
                "rope_scaling",
                json!({"rope_type": "default", "rope_theta": 1e6}),
            ),
            "rope_scaling.rope_theta = 1000000 without a top-level rope_theta",
        ),
        (
            with(v5.clone(), "rope_parameters", json!({"rope_type": "default", "factor": 2.0})),
            "rope_parameters.factor = 2.0 is not read",
        ),
        (
            with(
                v5.clone(),
                "rope_parameters",
                json!({"rope_type": "default", "type": "linear"}),
            ),
            "rope_parameters.rope_type = \"default\" and rope_parameters.type = \"linear\" disagree",
        ),
        (
            with(v5.clone(), "rope_parameters", json!({"partial_rotary_factor": 0.5})),
            "rope_parameters.partial_rotary_factor = 0.5",
        ),
        (
            with(v5.clone(), "partial_rotary_factor", json!(0.25)),
            "partial_rotary_factor = 0.25",
        ),
        (
            with(v5.clone(), "rope_parameters", json!(1e6)),
            "rope_parameters = 1000000.0 must be an object",
        ),
    ];
    for (config, want) in cases {
        let e = parse_err(&config);
        assert!(e.contains(want), "expected {want:?} in: {e}");
    }
    // A rotary factor of 1.0 is plain RoPE in both versions.
    let full = with(v5, "partial_rotary_factor", json!(1.0));
    assert!(Qwen2Config::parse(&full.to_string()).is_ok());
}

#[test]
fn sliding_window_layers_are_refused_and_inert_keys_accepted() {
    let v5 = tiny_config_v5();
    let e = parse_err(&with(
        v5.clone(),
        "layer_types",
        json!(["full_attention", "sliding_attention"]),
    ));
    assert!(
        e.contains("layer_types[1] = \"sliding_attention\"") && e.contains("4096"),
        "{e}"
    );
    let e = parse_err(&with(v5.clone(), "layer_types", json!(["full_attention"])));
    assert!(
        e.contains("layer_types has 1 entries but num_hidden_layers = 2"),
        "{e}"
    );
    let e = parse_err(&with(
        v5.clone(),
        "layer_types",
        json!(["full_attention", "chunked_attention"]),
    ));
    assert!(e.contains("layer_types[1] = \"chunked_attention\""), "{e}");
    let e = parse_err(&with(v5.clone(), "use_sliding_window", json!(true)));
    assert!(
        e.contains("use_sliding_window = true") && e.contains("max_window_layers = 2"),
        "{e}"
    );

    // What changes no math: a window size that is not used, max_window_layers 0, "swish" (the same
    // nn.SiLU in transformers), attention dropout (inference), keys wgtrain does not know.
    let inert = with(v5.clone(), "max_window_layers", json!(0));
    let inert = with(inert, "sliding_window", json!(131072));
    let inert = with(inert, "hidden_act", json!("swish"));
    let inert = with(inert, "attention_dropout", json!(0.1));
    let inert = with(inert, "some_future_flag", json!({"nested": [1, 2]}));
    let c = Qwen2Config::parse(&inert.to_string()).unwrap();
    assert_eq!(
        (c.sliding_window, c.max_window_layers),
        (Some(131072), Some(0))
    );
    let e = format!("{:#}", c.check_trainable().unwrap_err());
    assert!(e.contains("attention_dropout = 0.1"), "{e}");
    assert!(Qwen2Config::parse(&v5.to_string())
        .unwrap()
        .check_trainable()
        .is_ok());

    let quantized = with(v5, "quantization_config", json!({"quant_method": "gptq"}));
    let e = parse_err(&quantized);
    assert!(
        e.contains("quantization_config") && e.contains("gptq"),
        "{e}"
    );
}

#[test]
fn length_warning_names_max_position_embeddings() {
    let c = Qwen2Config::parse(&tiny_config(false).to_string()).unwrap();
    assert_eq!(c.length_warning(64), None);
    let w = c.length_warning(65).unwrap();
    assert!(
        w.contains("65 tokens") && w.contains("max_position_embeddings = 64"),
        "{w}"
    );
}

/// The transformers 5 checkpoint matches transformers' logits, and gives the same logits when its
/// config is rewritten in 4.x's layout; another theta (10000, the old fallback) does not.
#[test]
fn transformers5_logits_in_either_config_layout() {
    let gpu = Gpu::from_env().unwrap();
    let dir = fixture("tiny-qwen2-v5");
    let ids: Vec<u32> = read_json(&dir.join("reference.json"))["logits_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f32> = file
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let logits = |dir: &Path| {
        let model = Qwen2::load(&gpu, dir).unwrap();
        model.logits(&gpu, &ids, 0..ids.len()).unwrap()
    };
    let max_err = |got: &[f32]| {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };

    let v5 = logits(&dir);
    let err = max_err(&v5);
    println!("transformers 5.25 layout: max |logit - transformers| = {err:.3e}");
    assert!(err < 1e-3, "max logit error {err}");

    let to_v4 = |theta: f64| {
        fixture_copy("tiny-qwen2-v5", |c| {
            for key in ["rope_parameters", "layer_types", "dtype"] {
                c.remove(key);
            }
            c.insert("rope_theta".into(), json!(theta));
            c.insert("rope_scaling".into(), Value::Null);
            c.insert("torch_dtype".into(), json!("bfloat16"));
        })
    };
    assert_eq!(logits(to_v4(1e6).path()), v5, "4.x layout, same theta");
    let err = max_err(&logits(to_v4(10000.0).path()));
    println!("with theta 10000: max |logit - transformers| = {err:.3e}");
    assert!(
        err > 1e-2,
        "theta 10000 gives transformers' logits too ({err})"
    );
}

/// A non-zero attention_dropout loads and runs inference, but is refused for training.
#[test]
fn attention_dropout_is_refused_for_training_only() {
    let gpu = Gpu::from_env().unwrap();
    let dir = fixture_copy("tiny-qwen2-v5", |c| {
        c.insert("attention_dropout".into(), json!(0.1));
    });
    let model = Qwen2::load(&gpu, dir.path()).unwrap();
    assert!(model.logits(&gpu, &[1, 2, 3], 0..3).is_ok());
    let e = match Grads::new(&gpu, &model) {
        Ok(_) => panic!("training with attention_dropout 0.1 should be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("attention_dropout = 0.1"), "{e}");
}

/// `wgtrain loss` on rows longer than max_position_embeddings warns once, naming the key.
#[test]
fn sequences_past_max_position_embeddings_warn_once() {
    let data = fixture("tiny_sft.jsonl");
    let run = |model: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_wgtrain"))
            .args(["loss", "--model", model.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap(), "--batch-size", "2"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let short = fixture_copy("tiny-qwen2-tied", |c| {
        c.insert("max_position_embeddings".into(), json!(32));
    });
    let stderr = run(short.path());
    assert_eq!(
        stderr
            .matches("runs past max_position_embeddings = 32")
            .count(),
        1,
        "{stderr}"
    );
    assert!(!run(&fixture("tiny-qwen2-tied")).contains("max_position_embeddings"));
}

/// pad_token_id is transformers' padding_idx: under full fine-tuning the pad row of the embedding
/// gets no gradient from its lookups; every other row's gradient is unchanged.
#[test]
fn pad_token_id_row_gets_no_embedding_gradient() {
    let gpu = Gpu::from_env().unwrap();
    let ids: Vec<u32> = vec![5, 9, 17, 9, 30, 5, 12];
    let targets: Vec<u32> = ids[1..].iter().copied().chain([IGNORE]).collect();
    let embed_grad = |dir: &Path| {
        let model = Qwen2::load_f32(&gpu, dir).unwrap();
        let grads = Grads::new(&gpu, &model).unwrap();
        model
            .forward_backward(&gpu, &grads, &[(&ids, &targets)], 1.0, None)
            .unwrap();
        let params = grads.params(&model);
        let embed = params
            .iter()
            .find(|p| p.name == "model.embed_tokens.weight")
            .unwrap();
        embed.grad.to_f32(&gpu).unwrap()
    };
    // Untied: the pad row's only gradient is its lookups'.
    let plain = embed_grad(&fixture("tiny-qwen2-untied"));
    let padded = fixture_copy("tiny-qwen2-untied", |c| {
        c.insert("pad_token_id".into(), json!(9));
    });
    let padded = embed_grad(padded.path());
    let hidden = 128;
    for (row, (a, b)) in plain.chunks(hidden).zip(padded.chunks(hidden)).enumerate() {
        if row == 9 {
            assert!(a.iter().any(|&x| x != 0.0), "token 9 is looked up twice");
            assert!(b.iter().all(|&x| x == 0.0), "pad row {row}: {b:?}");
        } else {
            assert_eq!(a, b, "row {row}");
        }
    }
    let e = parse_err(&with(tiny_config(false), "pad_token_id", json!(32)));
    assert!(
        e.contains("pad_token_id = 32 is not below vocab_size = 32"),
        "{e}"
    );
}
