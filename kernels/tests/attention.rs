//! Attention: the CPU backward reference against finite differences of the CPU forward, and the
//! GPU kernels (blocked and split-key forward, backward) against the CPU reference on odd shapes,
//! with the default binding limit and with a tiny one that splits every tensor.
mod common;
use common::{assert_passed, gpu, split_gpu};
use wgtrain_kernels::ops::attention::{self, cpu, AttentionDims, ForwardPath};
use wgtrain_kernels::ops::{random, to_f64};
use wgtrain_kernels::Gpu;

fn dims(b: usize, tq: usize, tk: usize, hq: usize, hkv: usize, head_dim: usize) -> AttentionDims {
    let scale = 1.0 / (head_dim as f32).sqrt();
    AttentionDims {
        batch_size: b,
        tq,
        tk,
        hq,
        hkv,
        head_dim,
        scale,
    }
}

/// T in {1, 5, 33, 70}, GQA ratios 1..7, head_dim 64 and 128, B = 1 and 2.
fn training_shapes() -> Vec<AttentionDims> {
    let mut all = Vec::new();
    for (i, (t, b)) in [(1, 2), (5, 1), (33, 2), (70, 1)].into_iter().enumerate() {
        for (g, hkv, head_dim) in [
            (1, 2, 64),
            (2, 1, 128),
            (3, 2, 64),
            (4, 1, 128),
            (5, 1, 64),
            (6, 1, 128),
            (7, 1, 64),
        ] {
            // Alternate B so that every T also runs with the other batch size somewhere.
            let b = if (g + i) % 3 == 0 { 3 - b } else { b };
            all.push(dims(b, t, t, g * hkv, hkv, head_dim));
        }
    }
    all
}

#[test]
fn cpu_backward_matches_finite_differences() {
    // A tiny head_dim is fine for the reference; tq < tk exercises the causal offset.
    let d = AttentionDims {
        batch_size: 2,
        tq: 3,
        tk: 4,
        hq: 4,
        hkv: 2,
        head_dim: 3,
        scale: 0.7,
    };
    let q = to_f64(&random(1, 2 * 3 * 4 * 3, 1.0));
    let k = to_f64(&random(2, 2 * 4 * 2 * 3, 1.0));
    let v = to_f64(&random(3, 2 * 4 * 2 * 3, 1.0));
    let w = to_f64(&random(4, 2 * 3 * 4 * 3, 1.0));
    let loss = |x: &[Vec<f64>; 3]| -> f64 {
        let out = cpu::forward(&x[0], &x[1], &x[2], &d, d.tk).0;
        out.iter().zip(&w).map(|(o, w)| o * w).sum()
    };
    let (dq, dk, dv) = cpu::backward(&q, &k, &v, &w, &d);
    let h = 1e-5;
    for (which, grad) in [dq, dk, dv].iter().enumerate() {
        for (idx, &want) in grad.iter().enumerate() {
            let mut x = [q.clone(), k.clone(), v.clone()];
            x[which][idx] += h;
            let up = loss(&x);
            x[which][idx] -= 2.0 * h;
            let fd = (up - loss(&x)) / (2.0 * h);
            assert!(
                (fd - want).abs() < 1e-7,
                "input {which} [{idx}]: fd {fd} vs {want}"
            );
        }
    }
}

/// Every T, GQA ratio and head size, with split chunks of every tensor (lse too, in the last).
fn split_shapes() -> Vec<AttentionDims> {
    vec![
        dims(2, 1, 1, 2, 2, 64),
        dims(1, 5, 5, 4, 2, 128),
        dims(2, 33, 33, 6, 2, 64),
        dims(1, 70, 70, 4, 1, 64),
        dims(2, 5, 5, 5, 1, 128),
        dims(1, 33, 33, 6, 1, 128),
        dims(2, 70, 70, 7, 1, 64),
    ]
}

fn forward_cases(gpu: &Gpu, shapes: Vec<AttentionDims>) {
    for (i, d) in shapes.into_iter().enumerate() {
        for path in [ForwardPath::Blocked, ForwardPath::SplitKeys] {
            assert_passed(attention::check_forward(gpu, d, d.tk, path, i as u64).unwrap());
        }
    }
}

#[test]
fn forward_matches_cpu() {
    forward_cases(&Gpu::from_env().unwrap(), training_shapes());
}

#[test]
fn forward_matches_cpu_on_split_tensors() {
    forward_cases(split_gpu(3584), split_shapes());
}

/// KV-cache steps: tq = 1 and 3 against every tk up to 70, from caches with spare rows; every
/// fifth on split tensors.
#[test]
fn decode_matches_cpu() {
    let (gpu, tiny) = (gpu(), split_gpu(3584));
    for tk in 1..=70 {
        for tq in [1, 3].into_iter().filter(|&tq| tq <= tk) {
            let (g, head_dim) = (
                1 + tk % 7,
                if tk % 2 == 0 || tk % 5 == 0 { 64 } else { 128 },
            );
            let d = dims(1 + tk % 2, tq, tk, 2 * g, 2, head_dim);
            let on = if tk % 5 == 0 { &tiny } else { &gpu };
            let cap = tk + tk % 3;
            assert_passed(
                attention::check_forward(on, d, cap, ForwardPath::Auto, tk as u64).unwrap(),
            );
        }
    }
}

fn backward_cases(gpu: &Gpu, shapes: Vec<AttentionDims>) {
    for (i, d) in shapes.into_iter().enumerate() {
        assert_passed(attention::check_backward(gpu, d, i as u64).unwrap());
    }
}

#[test]
fn backward_matches_cpu() {
    backward_cases(&Gpu::from_env().unwrap(), training_shapes());
}

#[test]
fn backward_matches_cpu_on_split_tensors() {
    backward_cases(split_gpu(3584), split_shapes());
}

#[test]
fn backward_with_a_cache_offset() {
    // tq < tk: queries sit at the end of their sequences.
    let (gpu, tiny) = (gpu(), split_gpu(3584));
    assert_passed(attention::check_backward(gpu, dims(2, 5, 70, 6, 2, 64), 98).unwrap());
    assert_passed(attention::check_backward(tiny, dims(1, 33, 40, 7, 1, 64), 99).unwrap());
}

#[test]
fn rejects_bad_shapes() {
    let gpu = Gpu::from_env().unwrap();
    let bad = [
        dims(1, 4, 3, 2, 2, 64),
        dims(1, 4, 4, 3, 2, 64),
        dims(1, 4, 4, 2, 2, 96),
    ];
    for d in bad {
        assert!(
            attention::check_forward(&gpu, d, d.tk, ForwardPath::Auto, 0).is_err(),
            "{d:?}"
        );
    }
}
