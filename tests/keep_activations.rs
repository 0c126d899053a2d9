//! Keeping every layer's activations (and the LM head's logits) from the forward for the backward
//! computes what per-layer recomputation computes, bit for bit: losses and every gradient of LoRA
//! with dropout and of full fine-tuning, on the tied and the untied checkpoint, and a short LoRA
//! training run through the CLI (`WGTRAIN_KEEP_ACTIVATIONS`); and it skips the recomputation's
//! launches.
mod common;

use common::{as_batch, fixtures, lora_dropout_run, loss_and_norm_steps, supervised_rows};
use wgtrain::model::{Adapter, Grads, LoraDropout, Qwen2};
use wgtrain_kernels::Gpu;

const CHECKPOINTS: [&str; 2] = ["tiny-qwen2-tied", "tiny-qwen2-untied"];

/// Training losses and every gradient (as bits, by name) of two micro-batches accumulated into
/// one set of gradients, the second a single row, with LoRA dropout when `dropout`; and the
/// kernel dispatches they took.
fn step(gpu: &Gpu, model: &Qwen2, dropout: bool) -> (Vec<(String, Vec<u32>)>, u64) {
    let rows = supervised_rows(&[17, 9]);
    let batch = as_batch(&rows);
    let grads = Grads::new(gpu, model).unwrap();
    let before = gpu.dispatches();
    let mut out = Vec::new();
    for (seed, rows) in [(3, &batch[..]), (4, &batch[..1])] {
        let dropout = dropout.then_some(LoraDropout { p: 0.2, seed });
        let loss = model.forward_backward(gpu, &grads, rows, 0.5, dropout);
        let bits = loss.unwrap().sum.to_bits();
        out.push((
            format!("training loss {seed}"),
            vec![bits as u32, (bits >> 32) as u32],
        ));
    }
    let dispatches = gpu.dispatches() - before;
    for p in grads.params(model) {
        let values = p.grad.to_f32(gpu).unwrap();
        out.push((p.name, values.iter().map(|x| x.to_bits()).collect()));
    }
    (out, dispatches)
}

/// `step` with the activations kept and recomputed: the same bits, fewer launches kept.
fn assert_keeping_changes_no_bit(gpu: &Gpu, model: &mut Qwen2, dropout: bool, what: &str) {
    model.set_keep_activations(Some(false));
    assert_eq!(model.kept_activations(gpu, 34).unwrap(), None);
    let (recomputed, recomputed_dispatches) = step(gpu, model, dropout);
    model.set_keep_activations(Some(true));
    assert!(model.kept_activations(gpu, 34).unwrap().unwrap() > 0);
    let (kept, kept_dispatches) = step(gpu, model, dropout);
    assert_eq!(recomputed.len(), kept.len());
    for ((name, a), (other, b)) in recomputed.iter().zip(&kept) {
        assert_eq!(name, other);
        assert!(
            a == b,
            "{what}: {name} differs when the activations are kept"
        );
    }
    // Two micro-batches of two layers: each layer's recomputation, and the LM head's logits
    // GEMM, are gone.
    assert!(
        kept_dispatches + 2 * 2 * 7 <= recomputed_dispatches,
        "{what}: {kept_dispatches} dispatches kept, {recomputed_dispatches} recomputed"
    );
}

#[test]
fn kept_activations_give_the_recomputed_bits_under_lora_with_dropout() {
    let gpu = Gpu::from_env().unwrap();
    for name in CHECKPOINTS {
        let dir = fixtures().join(name);
        let mut model = Qwen2::load(&gpu, &dir).unwrap();
        let adapter = Adapter::load(dir.join("adapter-random"), &model.config).unwrap();
        model.apply_adapter(&gpu, &adapter).unwrap();
        assert_keeping_changes_no_bit(&gpu, &mut model, true, name);
        // Unforced, a CPU adapter without a budget keeps these few bytes.
        model.set_keep_activations(None);
        let kept = model.kept_activations(&gpu, 34).unwrap();
        assert_eq!(kept.is_some(), gpu.is_cpu(), "{name}: {kept:?}");
    }
}

#[test]
fn kept_activations_give_the_recomputed_bits_under_full_finetuning() {
    let gpu = Gpu::from_env().unwrap();
    for name in CHECKPOINTS {
        let mut model = Qwen2::load_f32(&gpu, fixtures().join(name)).unwrap();
        assert_keeping_changes_no_bit(&gpu, &mut model, false, name);
    }
}

#[test]
fn keeping_is_refused_in_token_chunks() {
    let gpu = Gpu::from_env().unwrap();
    let mut model = Qwen2::load_f32(&gpu, fixtures().join("tiny-qwen2-tied")).unwrap();
    model.set_token_chunk(Some(8)).unwrap();
    // Token chunks recompute, unless keeping is forced, which they cannot do.
    assert_eq!(model.kept_activations(&gpu, 34).unwrap(), None);
    model.set_keep_activations(Some(true));
    let err = model.kept_activations(&gpu, 34).unwrap_err().to_string();
    assert!(err.contains("token chunks"), "{err}");
    let rows = supervised_rows(&[17]);
    let grads = Grads::new(&gpu, &model);
    let err = model
        .forward_backward(&gpu, &grads.unwrap(), &as_batch(&rows), 1.0, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("WGTRAIN_KEEP_ACTIVATIONS"), "{err}");
}

#[test]
fn lora_training_keeping_activations_matches_recomputation() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, keep: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let out = lora_dropout_run(&dir, extra)
            .env("WGTRAIN_KEEP_ACTIVATIONS", keep)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        (
            dir,
            String::from_utf8_lossy(&out.stdout).to_string() + &stderr,
        )
    };
    let (recomputed, _) = run("recomputed", "0", &[]);
    let (kept, _) = run("kept", "1", &[]);
    let (recomputed, kept) = (loss_and_norm_steps(&recomputed), loss_and_norm_steps(&kept));
    assert_eq!(recomputed.len(), 3);
    assert_eq!(
        recomputed, kept,
        "keeping the activations changed a loss or norm"
    );
    // The dry run says which it does, and what keeping holds.
    let (_, shown) = run("dry-kept", "1", &["--dry-run"]);
    assert!(
        shown.contains("kept for the backward: activations"),
        "{shown}"
    );
    let (_, shown) = run("dry-recomputed", "0", &["--dry-run"]);
    assert!(shown.contains("recomputed layer by layer"), "{shown}");
    let out = lora_dropout_run(&tmp.path().join("bad"), &[])
        .env("WGTRAIN_KEEP_ACTIVATIONS", "yes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("WGTRAIN_KEEP_ACTIVATIONS 'yes'"), "{err}");
}
