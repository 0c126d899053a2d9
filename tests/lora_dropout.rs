//! LoRA dropout in training: the gradient wgtrain computes under a micro-batch's dropout masks is
//! the gradient of the loss under those same masks (central differences through the whole tiny
//! model, so the forward, the per-layer recomputation and the backward must all regenerate the
//! same masks), the masks come from the seed alone, and they change the loss.
use std::path::PathBuf;

use wgtrain::model::adapter::tensor_name;
use wgtrain::model::{Adapter, Grads, LoraDropout, LossSum, Proj, Qwen2};
use wgtrain_kernels::Gpu;

mod common;
use common::{as_batch, fixtures, supervised_rows};

fn model_dir() -> PathBuf {
    fixtures().join("tiny-qwen2-tied")
}

/// Summed loss and every LoRA gradient (by PEFT name) of one micro-batch.
fn step(
    gpu: &Gpu,
    model: &Qwen2,
    dropout: Option<LoraDropout>,
) -> (LossSum, Vec<(String, Vec<f32>)>) {
    let grads = Grads::new(gpu, model).unwrap();
    let rows = supervised_rows(&[11, 7]);
    let batch = as_batch(&rows);
    let loss = model
        .forward_backward(gpu, &grads, &batch, 1.0, dropout)
        .unwrap();
    let named = grads
        .params(model)
        .iter()
        .map(|p| (p.name.clone(), p.grad.to_f32(gpu).unwrap()))
        .collect();
    (loss, named)
}

#[test]
fn dropout_gradients_match_finite_differences_of_the_masked_loss() {
    let gpu = Gpu::from_env().unwrap();
    let mut model = Qwen2::load(&gpu, model_dir()).unwrap();
    let adapter = Adapter::load(model_dir().join("adapter-random"), &model.config).unwrap();
    model.apply_adapter(&gpu, &adapter).unwrap();
    let dropout = LoraDropout { p: 0.3, seed: 17 };

    let (loss, grads) = step(&gpu, &model, Some(dropout));
    let (again, _) = step(&gpu, &model, Some(dropout));
    assert_eq!(loss, again, "the same seed must regenerate the same masks");
    let (plain, plain_grads) = step(&gpu, &model, None);
    let (reseeded, _) = step(&gpu, &model, Some(LoraDropout { p: 0.3, seed: 18 }));
    assert!(
        (loss.sum - plain.sum).abs() > 1e-3 && (loss.sum - reseeded.sum).abs() > 1e-3,
        "dropout should change the loss: {} with, {} without, {} with another seed",
        loss.sum,
        plain.sum,
        reseeded.sum
    );
    let zero_p = step(&gpu, &model, Some(LoraDropout { p: 0.0, seed: 17 }));
    assert_eq!(zero_p.0, plain, "p = 0 is no dropout");
    assert!(zero_p.1 == plain_grads, "p = 0 changed the gradients");

    // Central differences of the masked loss at the largest gradient entry of A and B factors of
    // projections on both sides of the attention and the MLP.
    let h = 1e-2f32;
    for (layer, proj, which) in [
        (0, Proj::Q, "A"),
        (0, Proj::Gate, "B"),
        (1, Proj::V, "A"),
        (1, Proj::Down, "A"),
        (1, Proj::O, "B"),
    ] {
        let name = tensor_name(layer, proj, which);
        let grad = &grads.iter().find(|(n, _)| *n == name).unwrap().1;
        let (index, &analytic) = grad
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let loss_at = |delta: f32| {
            let mut shifted = adapter.clone();
            let pair = shifted.modules.get_mut(&(layer, proj)).unwrap();
            match which {
                "A" => pair.a[index] += delta,
                _ => pair.b[index] += delta,
            }
            let mut model = Qwen2::load(&gpu, model_dir()).unwrap();
            model.apply_adapter(&gpu, &shifted).unwrap();
            step(&gpu, &model, Some(dropout)).0.sum
        };
        let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        let err = (numeric - analytic as f64).abs();
        eprintln!("{name}[{index}]: analytic {analytic}, central difference {numeric}");
        assert!(
            err <= 0.02 * numeric.abs() + 1e-3,
            "{name}[{index}]: analytic {analytic} vs central difference {numeric}"
        );
    }
}
