//! Attention: the CPU backward reference against finite differences of the CPU forward, the ragged
//! CPU forward against the plain one per sequence, and the GPU kernels (blocked and split-key
//! forward, with and without per-sequence key counts; backward) against the CPU reference on odd
//! shapes, with the default binding limit and with a tiny one that splits every tensor; 64 and 128
//! throughout, every other head-size layout on its own shapes. Those run the adapter's attention
//! variant (its `KernelPlan`); `every_variant_matches_cpu` forces each variant on fewer shapes.
mod common;
use common::{assert_passed, forced_gpu, gpu, split_gpu};
use wgtrain_kernels::ops::attention::{self, cpu, AttentionDims, ForwardPath, KeyLens};
use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::plan::AttentionVariant;
use wgtrain_kernels::{DType, Gpu, Tensor};

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

/// The ragged reference is the plain one run on each sequence alone with its own key count.
#[test]
fn cpu_ragged_forward_is_each_sequence_alone() {
    let (cap, lens) = (6, [3, 6, 4]);
    let d = AttentionDims {
        batch_size: 3,
        tq: 3,
        tk: 6,
        hq: 4,
        hkv: 2,
        head_dim: 3,
        scale: 0.7,
    };
    let row = d.hq * d.head_dim;
    let kv_row = d.hkv * d.head_dim;
    let q = to_f64(&random(1, 3 * d.tq * row, 1.0));
    let k = to_f64(&random(2, 3 * cap * kv_row, 1.0));
    let v = to_f64(&random(3, 3 * cap * kv_row, 1.0));
    let (out, lse) = cpu::forward_ragged(&q, &k, &v, &d, cap, &lens);
    for (b, &len) in lens.iter().enumerate() {
        let alone = AttentionDims {
            batch_size: 1,
            tk: len,
            ..d
        };
        let qs = &q[b * d.tq * row..][..d.tq * row];
        let (ks, vs) = (&k[b * cap * kv_row..], &v[b * cap * kv_row..]);
        let (ks, vs) = (&ks[..len * kv_row], &vs[..len * kv_row]);
        let (want_out, want_lse) = cpu::forward(qs, ks, vs, &alone, len);
        assert_eq!(&out[b * d.tq * row..][..d.tq * row], &want_out[..], "{b}");
        assert_eq!(&lse[b * d.tq * d.hq..][..d.tq * d.hq], &want_lse[..], "{b}");
    }
}

/// Batched KV-cache slots of different lengths (1, equal to the capacity, around the 64-key
/// tiles), one query (decode) or several (extending each slot), on both forward paths, whole and
/// with every tensor split.
#[test]
fn ragged_forward_matches_cpu() {
    let cases: [(AttentionDims, usize, &[usize]); 6] = [
        (dims(4, 1, 70, 6, 2, 64), 70, &[1, 70, 64, 65]),
        (dims(3, 1, 129, 7, 1, 128), 131, &[129, 1, 128]),
        (dims(3, 3, 40, 4, 2, 128), 45, &[3, 40, 17]),
        (dims(2, 33, 70, 2, 1, 64), 70, &[33, 70]),
        (dims(2, 5, 66, 5, 1, 64), 66, &[66, 5]),
        (dims(1, 5, 9, 4, 1, 64), 12, &[7]),
    ];
    let (gpu, tiny) = (gpu(), split_gpu(3584));
    for (i, (d, cap, lens)) in cases.into_iter().enumerate() {
        for on in [gpu, tiny] {
            for path in [ForwardPath::Blocked, ForwardPath::SplitKeys] {
                let checks = attention::check_forward_ragged(on, d, cap, lens, path, i as u64);
                assert_passed(checks.unwrap());
            }
        }
    }
}

#[test]
fn ragged_forward_refuses_bad_shapes() {
    let gpu = gpu();
    let d = dims(2, 3, 10, 2, 2, 64);
    let t = |rows, cols| Tensor::zeros(gpu, &[rows, cols], DType::F32).unwrap();
    let (q, out, lse, k, v) = (t(6, 128), t(6, 128), t(6, 2), t(20, 128), t(20, 128));
    let run = |lens: &[u32], capacity| {
        let lens = Tensor::from_u32(gpu, &[lens.len()], lens).unwrap();
        let keys = KeyLens {
            lens: &lens,
            capacity,
        };
        let mut batch = gpu.batch();
        let qkv = attention::Qkv::new(&q, &k, &v);
        attention::attention_forward_ragged(&mut batch, qkv, &out, &lse, d, keys)
            .map_err(|e| e.to_string())
    };
    run(&[3, 10], 10).unwrap();
    // A capacity below tk, or more slots than k / v hold.
    for capacity in [9, 11] {
        let err = run(&[3, 10], capacity).unwrap_err();
        assert!(
            err.contains("does not hold 2 sequences of at least 10 keys"),
            "{err}"
        );
    }
    let err = run(&[3, 10, 4], 10).unwrap_err();
    assert!(
        err.contains("attention key lengths: expected shape [2]"),
        "{err}"
    );
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

/// Head sizes besides 64 and 128, one of each layout: padded to 64 (8, 16, 32) or 128 (80, 96),
/// vec2 elements (10, 18 and 250: 2 mod 4), padded to 192 with fewer queries per dk / dv slice
/// (176), and the widest (256, fewer keys per value slice too).
const OTHER_HEAD_DIMS: [usize; 10] = [8, 10, 16, 18, 32, 80, 96, 176, 250, 256];

/// Each of OTHER_HEAD_DIMS on a T around a 64-key tile, with GQA; rows of at most 896 f32 so that
/// the 3584-byte bindings split every tensor.
fn other_head_dim_shapes() -> Vec<AttentionDims> {
    OTHER_HEAD_DIMS
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let t = [70, 33, 5][i % 3];
            let (hq, hkv) = match d {
                0..=64 => (6, 2),
                65..=128 => (4, 2),
                _ => (3, 1),
            };
            dims(1 + i % 2, t, t, hq, hkv, d)
        })
        .collect()
}

#[test]
fn forward_matches_cpu_at_other_head_dims() {
    forward_cases(gpu(), other_head_dim_shapes());
    forward_cases(split_gpu(3584), other_head_dim_shapes());
}

#[test]
fn backward_matches_cpu_at_other_head_dims() {
    backward_cases(gpu(), other_head_dim_shapes());
    backward_cases(split_gpu(3584), other_head_dim_shapes());
    // tq < tk.
    let d = dims(2, 5, 70, 3, 1, 250);
    assert_passed(attention::check_backward(gpu(), d, 7).unwrap());
}

/// KV-cache steps (one and three queries, caches with spare rows) and batched slots of their own
/// lengths at every other head size, whole and split.
#[test]
fn decode_matches_cpu_at_other_head_dims() {
    for (i, shape) in other_head_dim_shapes().into_iter().enumerate() {
        let on = if i % 2 == 0 { gpu() } else { split_gpu(3584) };
        for tq in [1, 3] {
            let d = AttentionDims {
                batch_size: 3,
                tq,
                tk: 70,
                ..shape
            };
            let seed = (10 * i + tq) as u64;
            let checks = attention::check_forward(on, d, 72, ForwardPath::Auto, seed);
            assert_passed(checks.unwrap());
            let lens = [tq, 70, 64 + tq];
            for path in [ForwardPath::Blocked, ForwardPath::SplitKeys] {
                let checks = attention::check_forward_ragged(on, d, 72, &lens, path, seed);
                assert_passed(checks.unwrap());
            }
        }
    }
}

#[test]
fn rejects_bad_shapes() {
    let gpu = Gpu::from_env().unwrap();
    let bad = [
        dims(1, 4, 3, 2, 2, 64),
        dims(1, 4, 4, 3, 2, 64),
        dims(1, 4, 4, 2, 2, 6),
        dims(1, 4, 4, 2, 2, 65),
        dims(1, 4, 4, 2, 2, 258),
    ];
    for d in bad {
        assert!(
            attention::check_forward(&gpu, d, d.tk, ForwardPath::Auto, 0).is_err(),
            "{d:?}"
        );
    }
    let err = attention::check_forward(&gpu, bad[3], 4, ForwardPath::Auto, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "attention: head_dim must be even and in 8..=256, got 65"
    );
}

/// Every attention variant this adapter can run (on lavapipe all three), forced whatever the
/// adapter's plan picks (the tests above run that one): at every head size, the forward on both
/// paths, with and without per-sequence key counts, from a cache with spare rows, and the
/// backward with a cache offset, alternately whole and on split tensors. Small shapes, around a
/// 64-key tile, with GQA.
#[test]
fn every_variant_matches_cpu() {
    for &variant in AttentionVariant::ALL {
        let spec = format!("attention={}", variant.name());
        let whole = match forced_gpu(&spec, None) {
            Ok(gpu) => gpu,
            Err(e) => {
                // Not silent: the adapter said why it cannot run this variant.
                eprintln!("{spec} not run on this adapter: {e:#}");
                continue;
            }
        };
        let split = forced_gpu(&spec, Some(3584)).unwrap();
        assert_eq!(whole.plan.attention, variant);
        for (i, d) in [64, 128].into_iter().chain(OTHER_HEAD_DIMS).enumerate() {
            let gpu = if i % 2 == 0 { &whole } else { &split };
            let (hq, hkv) = if d <= 128 { (6, 2) } else { (3, 1) };
            let t = [70, 33][i % 2];
            let seed = i as u64;
            for path in [ForwardPath::Blocked, ForwardPath::SplitKeys] {
                let prefill = dims(2, t, t, hq, hkv, d);
                let checks = attention::check_forward(gpu, prefill, t + 2, path, seed);
                assert_passed(checks.unwrap());
                let step = dims(3, 1 + i % 3, 70, hq, hkv, d);
                let lens = [step.tq, 70, 64 + step.tq];
                let checks = attention::check_forward_ragged(gpu, step, 72, &lens, path, seed);
                assert_passed(checks.unwrap());
            }
            let cached = dims(2, t / 3, t, hq, hkv, d);
            assert_passed(attention::check_backward(gpu, cached, seed + 50).unwrap());
        }
    }
}

/// The rows and subgroup kernels loop once per key, and llvmpipe ends a loop after 65535
/// iterations: more keys are refused with the way out, not computed wrong.
#[test]
fn loop_kernels_refuse_more_keys_than_a_loop_runs() {
    for variant in ["rows", "subgroup"] {
        let gpu = match forced_gpu(&format!("attention={variant}"), None) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("attention={variant} not run on this adapter: {e:#}");
                continue;
            }
        };
        let d = dims(1, 1, 65536, 1, 1, 8);
        let t = |rows, cols| Tensor::zeros(&gpu, &[rows, cols], DType::F32).unwrap();
        let (q, out, lse, k, v) = (t(1, 8), t(1, 8), t(1, 1), t(65536, 8), t(65536, 8));
        let qkv = attention::Qkv::new(&q, &k, &v);
        let expected = format!("more than the 65535 keys the {variant} kernels take");
        let err = attention::attention_forward(&mut gpu.batch(), qkv, &out, &lse, d).unwrap_err();
        assert!(err.to_string().contains(&expected), "{err}");
        if variant == "subgroup" {
            let (dout, dq, dk, dv) = (t(1, 8), t(1, 8), t(65536, 8), t(65536, 8));
            let grads = attention::Qkv::new(&dq, &dk, &dv);
            let err =
                attention::attention_backward(&mut gpu.batch(), qkv, &out, &lse, &dout, grads, d)
                    .unwrap_err();
            assert!(err.to_string().contains(&expected), "{err}");
        }
    }
}
