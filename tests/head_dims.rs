//! Whole models at head sizes besides 64 / 128. A Qwen2 of head_dim d < 64 computes exactly what a
//! head_dim-64 Qwen2 computes when each of its heads is embedded in a 64-wide one: element i of the
//! first (second) half of a head goes to element i · 64/d (plus 32), where RoPE's frequency
//! theta^(-2i/d) is the same; the other elements of q, k and v are zero; q is scaled by
//! sqrt(64 / d) to keep the softmax scale. So the head_dim-64 model (the fast kernels, checked
//! against transformers in model_forward.rs and train.rs) is the reference for the other one's
//! logits, cached decoding, loss and every gradient of a full fine-tuning step.
use wgtrain::model::{Grads, KvCache, Qwen2, Qwen2Config, IGNORE};
use wgtrain_kernels::ops::check::random;
use wgtrain_kernels::{DType, Gpu, Tensor};

mod common;
use common::max_abs_diff;

const WIDE: usize = 64;

fn config(heads: usize, kv_heads: usize, head_dim: usize) -> Qwen2Config {
    Qwen2Config {
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: 101,
        tie_word_embeddings: false,
        ..Qwen2Config::qwen25("0.5B").unwrap()
    }
}

/// Where element i of a head of `d` goes in a head of WIDE.
fn widened(i: usize, d: usize) -> usize {
    let (half, stride) = (d / 2, WIDE / d);
    if i < half {
        i * stride
    } else {
        (i - half) * stride + WIDE / 2
    }
}

/// Rows of a [heads * d, cols] projection (or its bias, cols = 1) embedded in [heads * WIDE, cols],
/// times `scale`.
fn widen_rows(x: &[f32], heads: usize, d: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0.0; heads * WIDE * cols];
    for h in 0..heads {
        for i in 0..d {
            let (from, to) = ((h * d + i) * cols, (h * WIDE + widened(i, d)) * cols);
            for c in 0..cols {
                out[to + c] = x[from + c] * scale;
            }
        }
    }
    out
}

/// Columns of o_proj [rows, heads * d] embedded in [rows, heads * WIDE].
fn widen_cols(x: &[f32], rows: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * heads * WIDE];
    for r in 0..rows {
        for h in 0..heads {
            for i in 0..d {
                out[r * heads * WIDE + h * WIDE + widened(i, d)] = x[(r * heads + h) * d + i];
            }
        }
    }
    out
}

/// `name`'s values (of the narrow model) as the wide model holds them: the embedded q / k / v / o
/// projections (q scaled by `q_scale`), everything else as is.
fn widen(name: &str, x: &[f32], c: &Qwen2Config, q_scale: f32) -> Vec<f32> {
    let (d, hidden) = (c.head_dim, c.hidden_size);
    let cols = if name.ends_with(".bias") { 1 } else { hidden };
    let heads = |kv| {
        if kv {
            c.num_key_value_heads
        } else {
            c.num_attention_heads
        }
    };
    match name.rsplit('.').nth(1) {
        Some("q_proj") => widen_rows(x, heads(false), d, cols, q_scale),
        Some("k_proj") | Some("v_proj") => widen_rows(x, heads(true), d, cols, 1.0),
        Some("o_proj") => widen_cols(x, hidden, heads(false), d),
        _ => x.to_vec(),
    }
}

/// f32 models of head_dim `d` and WIDE with the same random weights (norm weights around 1).
fn model_pair(gpu: &Gpu, heads: usize, kv_heads: usize, d: usize) -> (Qwen2, Qwen2, f32) {
    let (narrow, wide) = (config(heads, kv_heads, d), config(heads, kv_heads, WIDE));
    let q_scale = (WIDE as f32 / d as f32).sqrt();
    let mut values = std::collections::HashMap::new();
    let mut seed = 0;
    let a = Qwen2::build(gpu, narrow.clone(), |spec, _| {
        seed += 10;
        let n = spec.shape.iter().product();
        let mut x = random(seed, n, 0.2);
        if spec.name.ends_with("norm.weight") {
            x.iter_mut().for_each(|v| *v += 1.0);
        }
        values.insert(spec.name.clone(), x.clone());
        Tensor::from_f32(gpu, &spec.shape, &x)
    })
    .unwrap();
    let b = Qwen2::build(gpu, wide, |spec, _| {
        let x = widen(&spec.name, &values[&spec.name], &narrow, q_scale);
        Tensor::from_f32(gpu, &spec.shape, &x)
    })
    .unwrap();
    (a, b, q_scale)
}

fn largest(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Two rows of 70 and 45 tokens (past a 64-key tile) and their next-token targets.
fn rows() -> Vec<(Vec<u32>, Vec<u32>)> {
    [(70, 1), (45, 2)]
        .into_iter()
        .map(|(len, seed)| {
            let ids: Vec<u32> = random(seed, len, 1.0)
                .iter()
                .map(|x| ((x + 1.0) * 50.0) as u32 % 101)
                .collect();
            let mut targets = ids[1..].to_vec();
            targets.push(IGNORE);
            (ids, targets)
        })
        .collect()
}

fn check_head_dim(heads: usize, kv_heads: usize, d: usize) {
    let gpu = Gpu::from_env().unwrap();
    let (narrow, wide, q_scale) = model_pair(&gpu, heads, kv_heads, d);
    let vocab = narrow.config.vocab_size;

    // Logits of the full forward, and of cached decoding (prefill 60, then one token at a time).
    let (ids, _) = &rows()[0];
    let want = wide.logits(&gpu, ids, 0..ids.len()).unwrap();
    let got = narrow.logits(&gpu, ids, 0..ids.len()).unwrap();
    let err = max_abs_diff(&got, &want);
    println!("head_dim {d}: max |logits - head_dim 64's| = {err:.2e}");
    assert!(largest(&want) > 0.1, "degenerate logits");
    assert!(err < 1e-4 * largest(&want), "logits differ by {err}");
    let mut cache = KvCache::new(&gpu, &narrow, ids.len()).unwrap();
    let mut worst = narrow.forward_cached(&gpu, &mut cache, &ids[..60]).unwrap();
    worst = vec![max_abs_diff(&worst, &want[59 * vocab..60 * vocab])];
    for t in 60..ids.len() {
        let step = narrow
            .forward_cached(&gpu, &mut cache, &ids[t..=t])
            .unwrap();
        worst.push(max_abs_diff(&step, &want[t * vocab..(t + 1) * vocab]));
    }
    let worst = worst.into_iter().fold(0.0, f32::max);
    assert!(
        worst < 1e-4 * largest(&want),
        "cached decoding differs by {worst}"
    );

    // One full fine-tuning step's loss and gradients.
    let rows = rows();
    let batch: Vec<(&[u32], &[u32])> = rows.iter().map(|(i, t)| (&i[..], &t[..])).collect();
    let (ga, gb) = (
        Grads::new(&gpu, &narrow).unwrap(),
        Grads::new(&gpu, &wide).unwrap(),
    );
    let la = narrow
        .forward_backward(&gpu, &ga, &batch, 1.0, None)
        .unwrap();
    let lb = wide.forward_backward(&gpu, &gb, &batch, 1.0, None).unwrap();
    assert_eq!(la.tokens, lb.tokens);
    assert!(
        (la.sum - lb.sum).abs() < 1e-5 * lb.sum,
        "loss {la:?} vs {lb:?}"
    );
    let (pa, pb) = (ga.params(&narrow), gb.params(&wide));
    assert_eq!(pa.len(), pb.len());
    for (a, b) in pa.iter().zip(&pb) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.grad.dtype(), DType::F32);
        // W_wide = q_scale W_narrow (embedded): d/dW_narrow = q_scale d/dW_wide.
        let got = widen(&a.name, &a.grad.to_f32(&gpu).unwrap(), &narrow.config, 1.0);
        let scale = if a.name.contains("q_proj") {
            q_scale
        } else {
            1.0
        };
        let want: Vec<f32> = b
            .grad
            .to_f32(&gpu)
            .unwrap()
            .iter()
            .map(|g| g * scale)
            .collect();
        let err = max_abs_diff(&got, &want);
        assert!(largest(&want) > 0.0, "{}: zero gradient", a.name);
        assert!(
            err < 1e-4 * largest(&want),
            "{}: gradient differs by {err:.2e} (largest {:.2e})",
            a.name,
            largest(&want)
        );
    }
}

#[test]
fn head_dim_16_matches_its_head_dim_64_embedding() {
    check_head_dim(4, 2, 16);
}

#[test]
fn head_dim_32_matches_its_head_dim_64_embedding() {
    check_head_dim(2, 1, 32);
}

#[test]
fn other_head_sizes_are_refused_by_name() {
    let gpu = Gpu::from_env().unwrap();
    for d in [6, 258, 512] {
        let err = Qwen2::zeroed(&gpu, config(2, 1, d), false).err().unwrap();
        assert_eq!(
            format!("{err:#}"),
            format!("model config: attention: head_dim must be even and in 8..=256, got {d}")
        );
    }
}
