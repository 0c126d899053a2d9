//! RoPE: GPU against the CPU reference (default and tiny binding limits), the backward as the
//! forward's transpose, and the reference against transformers' convention on a hand-made case.
mod common;
use common::{assert_passed, split_gpu};
use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::rope::{
    self, cpu, rope_backward, rope_forward, Positions, QueryKey, Rope,
};
use wgtrain_kernels::{Gpu, Tensor};

fn run_cases(gpu: &Gpu) {
    // (query heads, key heads): grouped and not.
    assert_passed(rope::check_rope(gpu, 1, (1, 1), 64, Some(&[0]), 1).unwrap());
    assert_passed(rope::check_rope(gpu, 15, (3, 1), 64, Some(&[0, 9, 32767]), 2).unwrap());
    assert_passed(rope::check_rope(gpu, 14, (2, 2), 128, Some(&[4, 100_000]), 3).unwrap());
    assert_passed(rope::check_rope(gpu, 33, (5, 1), 64, None, 4).unwrap());
    assert_passed(rope::check_rope(gpu, 9, (1, 1), 128, None, 5).unwrap());
    // Any even head size: the attention kernels' 8..=256 (10 and 250 are 2 mod 4), and below.
    assert_passed(rope::check_rope(gpu, 7, (3, 3), 6, Some(&[2]), 6).unwrap());
    for (i, (heads, d)) in [
        (5, 16),
        (4, 32),
        (4, 80),
        (3, 96),
        (1, 256),
        (6, 10),
        (1, 250),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 7 + i as u64;
        let checks = rope::check_rope(gpu, 14, (heads, 1), d, Some(&[3, 40_000]), seed);
        assert_passed(checks.unwrap());
    }
}

#[test]
fn gpu_matches_cpu() {
    run_cases(&Gpu::from_env().unwrap());
}

#[test]
fn gpu_matches_cpu_on_split_tensors() {
    run_cases(split_gpu(1280));
}

/// <R x, y> = <x, R^T y> for q and k: the backward kernel is the transpose of the forward one.
#[test]
fn backward_is_the_transpose() {
    let gpu = split_gpu(1280);
    let (rows, heads, kv_heads, d) = (10, 2, 1, 64);
    let rope = Rope::new(gpu, d, 1e6).unwrap();
    let positions: Vec<u32> = (0..rows as u32).map(|r| 1000 * r + 3).collect();
    let table = Tensor::from_u32(gpu, &[rows], &positions).unwrap();
    let values = |seed, h: usize| random(seed, rows * h * d, 1.0);
    let (xq, xk, yq, yk) = (
        values(7, heads),
        values(8, kv_heads),
        values(9, heads),
        values(10, kv_heads),
    );
    let upload = |v: &[f32], h: usize| Tensor::from_f32(gpu, &[rows, h * d], v).unwrap();
    let (x, y) = (
        [upload(&xq, heads), upload(&xk, kv_heads)],
        [upload(&yq, heads), upload(&yk, kv_heads)],
    );
    fn pair(t: &[Tensor; 2], (q_heads, k_heads): (usize, usize)) -> QueryKey<'_> {
        QueryKey {
            q: &t[0],
            q_heads,
            k: &t[1],
            k_heads,
        }
    }
    let mut batch = gpu.batch();
    rope_forward(
        &mut batch,
        &rope,
        pair(&x, (heads, kv_heads)),
        &Positions::PerRow(&table),
    )
    .unwrap();
    rope_backward(
        &mut batch,
        &rope,
        pair(&y, (heads, kv_heads)),
        &Positions::PerRow(&table),
    )
    .unwrap();
    batch.submit();
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| p as f64 * q as f64)
            .sum::<f64>()
    };
    for (i, (xv, yv)) in [(&xq, &yq), (&xk, &yk)].into_iter().enumerate() {
        let (rx, rty) = (x[i].to_f32(gpu).unwrap(), y[i].to_f32(gpu).unwrap());
        let (lhs, rhs) = (dot(&rx, yv), dot(xv, &rty));
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "tensor {i}: <Rx,y> = {lhs}, <x,R^T y> = {rhs}"
        );
    }
}

/// The reference follows transformers: pairs (i, i + D/2), inv_freq = theta^(-2i/D), and the
/// backward undoes the forward.
#[test]
fn cpu_reference_convention() {
    let (d, theta) = (4, 10000.0);
    let inv = cpu::inv_freq(d, theta);
    assert_eq!(inv, vec![1.0, 0.01]);
    let x = [1.0, 2.0, 3.0, 4.0];
    let pos = 3u32;
    let out = cpu::rope(&x, 1, d, theta, &[pos], 1.0);
    let (a0, a1) = (3.0f64, (3.0f32 * 0.01f32) as f64);
    let want = [
        1.0 * a0.cos() - 3.0 * a0.sin(),
        2.0 * a1.cos() - 4.0 * a1.sin(),
        3.0 * a0.cos() + 1.0 * a0.sin(),
        4.0 * a1.cos() + 2.0 * a1.sin(),
    ];
    for (o, w) in out.iter().zip(want) {
        assert!((o - w).abs() < 1e-12, "{out:?} vs {want:?}");
    }
    let back = cpu::rope(&out, 1, d, theta, &[pos], -1.0);
    for (b, x) in back.iter().zip(to_f64(&[1.0, 2.0, 3.0, 4.0])) {
        assert!((b - x).abs() < 1e-12);
    }
}

#[test]
fn rejects_bad_shapes() {
    let gpu = Gpu::from_env().unwrap();
    let rope = Rope::new(&gpu, 64, 1e6).unwrap();
    assert!(Rope::new(&gpu, 63, 1e6).is_err());
    let x = Tensor::from_f32(&gpu, &[6, 128], &[0.0; 768]).unwrap();
    let k = Tensor::from_f32(&gpu, &[6, 64], &[0.0; 384]).unwrap();
    let starts = Tensor::from_u32(&gpu, &[4], &[0; 4]).unwrap();
    let qk = |q_heads, k_heads| QueryKey {
        q: &x,
        q_heads,
        k: &k,
        k_heads,
    };
    let mut batch = gpu.batch();
    // 6 rows are not sequences of 4.
    let sequences = Positions::Sequential {
        seq_len: 4,
        starts: &starts,
    };
    assert!(rope_forward(&mut batch, &rope, qk(2, 1), &sequences).is_err());
    // 3 heads of 64 are not 128 columns, nor 2 heads 64 columns.
    let rows = Tensor::from_u32(&gpu, &[6], &[0; 6]).unwrap();
    let per_row = Positions::PerRow(&rows);
    assert!(rope_forward(&mut batch, &rope, qk(2, 1), &per_row).is_ok());
    let err = rope_forward(&mut batch, &rope, qk(3, 1), &per_row).unwrap_err();
    assert!(err.to_string().contains("rope: q"), "{err}");
    let err = rope_forward(&mut batch, &rope, qk(2, 2), &per_row).unwrap_err();
    assert!(err.to_string().contains("rope: k"), "{err}");
}
