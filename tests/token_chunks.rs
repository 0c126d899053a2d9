//! Token chunks: each layer's token-local part (o_proj, the residual adds, the post-attention norm
//! and the MLP) run a few rows at a time, in ragged chunks, computes what whole layers compute
//! within 1e-6 relative: loss, logits, greedy generation, LoRA gradients with dropout, and a short
//! LoRA training run through the CLI (`WGTRAIN_TOKEN_CHUNK`).
mod common;

use std::path::PathBuf;

use common::{
    as_batch, fixtures, lora_dropout_run, loss_and_norm_steps, supervised_rows, train_args,
    wgtrain_cmd,
};
use wgtrain::model::residency::weight_bytes;
use wgtrain::model::{
    generate, Adapter, GenerateOptions, Grads, LoraDropout, Qwen2, Qwen2Config, SamplingParams,
};
use wgtrain_kernels::{Gpu, GpuOptions};

const TOLERANCE: f64 = 1e-6;

fn model_dir() -> PathBuf {
    fixtures().join("tiny-qwen2-tied")
}

/// Named groups of values the model computes with the token-local part in chunks of `chunk`
/// rows (None: whole layers), on rows of 17 and 9 tokens (chunks of 3 leave one row over).
fn outputs(gpu: &Gpu, chunk: Option<usize>) -> Vec<(String, Vec<f64>)> {
    let dir = model_dir();
    let mut model = Qwen2::load(gpu, &dir).unwrap();
    model.set_token_chunk(chunk).unwrap();
    let adapter = Adapter::load(dir.join("adapter-random"), &model.config).unwrap();
    model.apply_adapter(gpu, &adapter).unwrap();
    let rows = supervised_rows(&[17, 9]);
    let batch = as_batch(&rows);
    let mut out = Vec::new();
    let loss = model.loss_sum(gpu, &batch).unwrap();
    out.push(("loss".to_string(), vec![loss.sum]));
    let ids = &rows[0].0;
    let logits = model.logits(gpu, ids, 0..ids.len()).unwrap();
    out.push(("logits".into(), logits.iter().map(|&x| x as f64).collect()));
    let options = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
    };
    let generation = generate(&model, gpu, &ids[..7], &options, |_| Ok(())).unwrap();
    let tokens = generation.tokens.iter().map(|&t| t as f64).collect();
    out.push(("generated tokens".into(), tokens));
    // Two micro-batches with dropout, the second a single row, accumulate into one set of
    // gradients.
    let grads = Grads::new(gpu, &model).unwrap();
    for (seed, rows) in [(3, &batch[..]), (4, &batch[..1])] {
        let dropout = Some(LoraDropout { p: 0.2, seed });
        let loss = model.forward_backward(gpu, &grads, rows, 0.5, dropout);
        out.push((format!("training loss {seed}"), vec![loss.unwrap().sum]));
    }
    for p in grads.params(&model) {
        let values = p.grad.to_f32(gpu).unwrap();
        out.push((p.name, values.iter().map(|&x| x as f64).collect()));
    }
    out
}

/// Each group's largest difference relative to its largest magnitude.
fn assert_close(whole: &[(String, Vec<f64>)], chunked: &[(String, Vec<f64>)], what: &str) {
    assert_eq!(whole.len(), chunked.len());
    for ((name, a), (other, b)) in whole.iter().zip(chunked) {
        assert_eq!((name, a.len()), (other, b.len()));
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.0 && diff <= TOLERANCE * scale,
            "{what}: {name} differs by {diff:e} (largest magnitude {scale:e})"
        );
    }
}

#[test]
fn ragged_token_chunks_compute_what_whole_layers_compute() {
    let gpu = Gpu::from_env().unwrap();
    let whole = outputs(&gpu, None);
    assert_close(&whole, &outputs(&gpu, Some(3)), "chunks of 3 tokens");
    assert_close(&whole, &outputs(&gpu, Some(8)), "chunks of 8 tokens");
    // A chunk as long as the micro-batch is a whole layer: the same bits.
    assert_eq!(whole, outputs(&gpu, Some(64)));
    // With every layer streamed through one device slot as well.
    let (layer, other) = weight_bytes(&Qwen2Config::load(model_dir()).unwrap(), false);
    let streamed = Gpu::new(&GpuOptions {
        device_memory: Some(other + layer),
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap();
    assert_close(
        &whole,
        &outputs(&streamed, Some(3)),
        "streamed, chunks of 3",
    );
}

#[test]
fn bad_token_chunks_are_refused() {
    let gpu = Gpu::from_env().unwrap();
    let mut model = Qwen2::load(&gpu, model_dir()).unwrap();
    let err = model.set_token_chunk(Some(0)).unwrap_err().to_string();
    assert!(err.contains("0 rows"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let out = wgtrain_cmd(&train_args(&tmp.path().join("run"), &["--max-steps", "1"]))
        .env("WGTRAIN_TOKEN_CHUNK", "three")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("WGTRAIN_TOKEN_CHUNK 'three'"), "{err}");
}

#[test]
fn lora_training_in_token_chunks_matches_whole_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, chunk: Option<&str>| {
        let dir = tmp.path().join(name);
        let mut cmd = lora_dropout_run(&dir, &[]);
        if let Some(rows) = chunk {
            cmd.env("WGTRAIN_TOKEN_CHUNK", rows);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        loss_and_norm_steps(&dir)
    };
    let whole = run("whole", None);
    let chunked = run("chunked", Some("3"));
    assert_eq!(whole.len(), 3);
    for (step, (a, b)) in whole.iter().zip(&chunked).enumerate() {
        for (what, x, y) in [("loss", a.0, b.0), ("grad_norm", a.1, b.1)] {
            assert!(
                (x - y).abs() <= TOLERANCE * x.abs(),
                "step {}: {what} {x} whole, {y} in chunks of 3 tokens",
                step + 1
            );
        }
    }
}
