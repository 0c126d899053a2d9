//! LM head + cross-entropy: GPU against the f64 CPU reference on odd shapes and chunkings, with
//! whole and split tensors (with the adapter's rowwise variant, and with each forced), at the real
//! Qwen vocabulary, and the backward reference against finite differences of the forward one.
mod common;
use common::{assert_passed, finite_differences, forced_gpu, gpus};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::cross_entropy::{self, cpu, Case, Chunking, KeptLogits, LmHead, IGNORE};
use wgtrain_kernels::plan::RowwiseVariant;
use wgtrain_kernels::{DType, Gpu, GpuOptions, Out, Tensor};

fn case(tokens: usize, vocab: usize, dim: usize, w_bf16: bool, chunking: Chunking) -> Case {
    Case {
        tokens,
        vocab,
        dim,
        w_bf16,
        dw_lm: true,
        chunking,
    }
}

/// Every rowwise variant (a workgroup or a thread per row of the chunk statistics), forced whatever
/// the adapter's plan picks, on chunkings that split rows and vocabulary, whole and split tensors.
#[test]
fn every_rowwise_variant_matches_cpu() {
    for &variant in RowwiseVariant::ALL {
        let spec = format!("rowwise={}", variant.name());
        let (whole, split) = (
            forced_gpu(&spec, None).unwrap(),
            forced_gpu(&spec, Some(4096)).unwrap(),
        );
        assert_eq!(whole.plan.rowwise, variant);
        let chunking = Chunking {
            rows: 10,
            vocab: 300,
        };
        for (seed, gpu) in [&whole, &split].into_iter().enumerate() {
            let checks = cross_entropy::check_cross_entropy(
                gpu,
                case(19, 1000, 40, seed == 0, chunking),
                80 + seed as u64,
            );
            assert_passed(checks.unwrap());
        }
    }
}

#[test]
fn matches_cpu_on_odd_shapes_and_chunkings() {
    let [whole, _] = gpus();
    let shapes = [
        (1, 37, 5, Chunking::default()),
        (
            19,
            1000,
            40,
            Chunking {
                rows: 8,
                vocab: 300,
            },
        ),
        (70, 2001, 33, Chunking::default()),
        (
            33,
            517,
            64,
            Chunking {
                rows: 10,
                vocab: 128,
            },
        ),
        (4, 13, 6, Chunking { rows: 1, vocab: 1 }),
    ];
    for (seed, &(tokens, vocab, dim, chunking)) in shapes.iter().enumerate() {
        for bf16 in [false, true] {
            assert_passed(
                cross_entropy::check_cross_entropy(
                    whole,
                    case(tokens, vocab, dim, bf16, chunking),
                    seed as u64,
                )
                .unwrap(),
            );
        }
    }
}

#[test]
fn matches_cpu_on_split_tensors() {
    let [_, split] = gpus();
    let shapes = [
        (
            13,
            301,
            24,
            Chunking {
                rows: 5,
                vocab: 100,
            },
        ),
        (4, 700, 9, Chunking::default()),
    ];
    for (seed, &(tokens, vocab, dim, chunking)) in shapes.iter().enumerate() {
        for bf16 in [false, true] {
            assert_passed(
                cross_entropy::check_cross_entropy(
                    split,
                    case(tokens, vocab, dim, bf16, chunking),
                    seed as u64,
                )
                .unwrap(),
            );
        }
    }
}

/// The real 151936-entry vocabulary: several default vocabulary chunks, and with 4 KiB bindings
/// (1024-entry chunks; 1 KiB would take thousands of launches) 149 chunks of W and of the logits.
/// dw_lm, checked above on split tensors, is left out there for time.
#[test]
fn matches_cpu_at_the_qwen_vocabulary() {
    let [whole, _] = gpus();
    let qwen = case(5, 151936, 16, true, Chunking::default());
    assert_passed(cross_entropy::check_cross_entropy(whole, qwen, 9).unwrap());
    let small = Gpu::new(&GpuOptions {
        max_binding_bytes: Some(4096),
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap();
    let qwen_split = Case {
        tokens: 3,
        dim: 4,
        dw_lm: false,
        ..qwen
    };
    assert_passed(cross_entropy::check_cross_entropy(&small, qwen_split, 10).unwrap());
}

#[test]
fn ignored_tokens_add_nothing() {
    let [gpu, _] = gpus();
    let (tokens, vocab, dim) = (6, 50, 8);
    let hidden = Tensor::from_f32(gpu, &[tokens, dim], &random(1, tokens * dim, 1.0)).unwrap();
    let w = Tensor::from_f32(gpu, &[vocab, dim], &random(2, vocab * dim, 1.0)).unwrap();
    let targets = Tensor::from_u32(gpu, &[tokens], &[IGNORE; 6]).unwrap();
    let lse = Tensor::zeros(gpu, &[tokens], DType::F32).unwrap();
    let loss = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
    let count = Tensor::zeros(gpu, &[1], DType::U32).unwrap();
    let dhidden = Tensor::from_f32(gpu, &[tokens, dim], &[7.0; 48]).unwrap();
    let mut batch = gpu.batch();
    let chunking = Chunking { rows: 4, vocab: 16 };
    let head = cross_entropy::LmHead {
        hidden: &hidden,
        w_lm: &w,
        chunking,
        kept: None,
    };
    cross_entropy::cross_entropy_forward(&mut batch, head, &targets, &lse, &loss, &count).unwrap();
    let dh = Out::write(&dhidden);
    cross_entropy::cross_entropy_backward(&mut batch, head, &targets, &lse, 1.0, dh, None).unwrap();
    batch.submit();
    assert_eq!(loss.to_f32(gpu).unwrap(), [0.0]);
    assert_eq!(count.to_u32(gpu).unwrap(), [0]);
    assert!(dhidden.to_f32(gpu).unwrap().iter().all(|&g| g == 0.0));
}

/// Forward then backward (dhidden and dW accumulating onto random values) with the logits kept
/// or recomputed: lse, loss, count, dhidden and dW as bits, and the dispatches of the backward.
fn kept_or_recomputed(
    gpu: &Gpu,
    w_bf16: bool,
    chunking: Chunking,
    keep: bool,
) -> (Vec<Vec<u32>>, u64) {
    let (tokens, vocab, dim) = (19, 1000, 40);
    let hidden = Tensor::from_f32(gpu, &[tokens, dim], &random(1, tokens * dim, 1.0)).unwrap();
    let w_values = random(2, vocab * dim, 1.0);
    let w = match w_bf16 {
        true => Tensor::from_f32_as_bf16(gpu, &[vocab, dim], &w_values),
        false => Tensor::from_f32(gpu, &[vocab, dim], &w_values),
    }
    .unwrap();
    let targets = cross_entropy::random_targets(3, tokens, vocab);
    let targets = Tensor::from_u32(gpu, &[tokens], &targets).unwrap();
    let lse = Tensor::zeros(gpu, &[tokens], DType::F32).unwrap();
    let loss = Tensor::from_f32(gpu, &[1], &[1.5]).unwrap();
    let count = Tensor::zeros(gpu, &[1], DType::U32).unwrap();
    let dhidden = Tensor::from_f32(gpu, &[tokens, dim], &random(4, tokens * dim, 1.0)).unwrap();
    let dw = Tensor::from_f32(gpu, &[vocab, dim], &random(5, vocab * dim, 1.0)).unwrap();
    let mut head = LmHead {
        hidden: &hidden,
        w_lm: &w,
        chunking,
        kept: None,
    };
    let kept = keep.then(|| KeptLogits::new(gpu, head).unwrap());
    head.kept = kept.as_ref();
    let mut batch = gpu.batch();
    cross_entropy::cross_entropy_forward(&mut batch, head, &targets, &lse, &loss, &count).unwrap();
    batch.submit();
    let before = gpu.dispatches();
    let mut batch = gpu.batch();
    let (dh, dw_lm) = (Out::add(&dhidden), Some(Out::add(&dw)));
    cross_entropy::cross_entropy_backward(&mut batch, head, &targets, &lse, 0.5, dh, dw_lm)
        .unwrap();
    batch.submit();
    let dispatches = gpu.dispatches() - before;
    let bits = |t: &Tensor| t.to_f32(gpu).unwrap().iter().map(|x| x.to_bits()).collect();
    let values = vec![
        bits(&lse),
        bits(&loss),
        count.to_u32(gpu).unwrap(),
        bits(&dhidden),
        bits(&dw),
    ];
    (values, dispatches)
}

/// Logits kept from the forward give the backward the bits it gets by recomputing them, over
/// several row blocks and vocabulary chunks (the last of each shorter), whole and split tensors,
/// f32 and bf16 heads, and its logits GEMMs are gone.
#[test]
fn kept_logits_give_the_bits_of_recomputed_ones() {
    let chunking = Chunking {
        rows: 8,
        vocab: 300,
    };
    for gpu in gpus() {
        for bf16 in [false, true] {
            let (recomputed, recomputed_dispatches) =
                kept_or_recomputed(gpu, bf16, chunking, false);
            let (kept, kept_dispatches) = kept_or_recomputed(gpu, bf16, chunking, true);
            assert!(
                recomputed == kept,
                "bf16 {bf16}: kept logits change the bits"
            );
            // 4 vocabulary chunks x 3 row blocks: one logits GEMM each, however it launches.
            assert!(
                kept_dispatches + 12 <= recomputed_dispatches,
                "bf16 {bf16}: {kept_dispatches} dispatches kept, {recomputed_dispatches} recomputed"
            );
        }
    }
}

/// Kept logits made for another tiling are refused, naming the call.
#[test]
fn kept_logits_of_another_tiling_are_refused() {
    let [gpu, _] = gpus();
    let hidden = Tensor::zeros(gpu, &[6, 4], DType::F32).unwrap();
    let w = Tensor::zeros(gpu, &[50, 4], DType::F32).unwrap();
    let made_for = LmHead {
        hidden: &hidden,
        w_lm: &w,
        chunking: Chunking { rows: 4, vocab: 16 },
        kept: None,
    };
    let kept = KeptLogits::new(gpu, made_for).unwrap();
    let head = LmHead {
        chunking: Chunking { rows: 3, vocab: 16 },
        kept: Some(&kept),
        ..made_for
    };
    let targets = Tensor::from_u32(gpu, &[6], &[1; 6]).unwrap();
    let lse = Tensor::zeros(gpu, &[6], DType::F32).unwrap();
    let loss = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
    let count = Tensor::zeros(gpu, &[1], DType::U32).unwrap();
    let mut batch = gpu.batch();
    let err = cross_entropy::cross_entropy_forward(&mut batch, head, &targets, &lse, &loss, &count)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cross_entropy_forward"), "{err}");
    assert!(err.contains("kept logits"), "{err}");
}

/// L = grad_scale · Σ loss: dL/dhidden and dL/dW by central differences equal the reference.
#[test]
fn backward_reference_matches_finite_differences() {
    let (tokens, vocab, dim) = (4, 7, 3);
    let hidden = to_f64(&random(1, tokens * dim, 1.0));
    let w = to_f64(&random(2, vocab * dim, 1.0));
    let targets = [3, IGNORE, 0, 6];
    let scale = 0.25;
    let loss =
        |h: &[f64], w: &[f64]| scale * cpu::cross_entropy_forward(h, w, &targets, vocab, dim).0;
    let fd = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| finite_differences(v, 1e-5, f);
    let assert_close = |name: &str, a: &[f64], b: &[f64]| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < 1e-7,
                "{name}[{i}]: analytic {x} vs finite difference {y}"
            );
        }
    };
    let (dh, dw) = cpu::cross_entropy_backward(&hidden, &w, &targets, vocab, dim, scale);
    assert_close("dhidden", &dh, &fd(&hidden, &|x| loss(x, &w)));
    assert_close("dw", &dw, &fd(&w, &|x| loss(&hidden, x)));
    assert!(
        dh[dim..2 * dim].iter().all(|&g| g == 0.0),
        "ignored row has a gradient"
    );
}
