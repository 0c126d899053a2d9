//! LoRA family: GPU against the f64 CPU reference on odd shapes and ranks, with whole and split
//! tensors, with and without dropout, and the backward reference against finite differences of
//! the forward one.
mod common;
use common::{assert_passed, finite_differences, gpus};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::lora::{self, cpu, Dims, Dropout};

#[test]
fn lora_matches_cpu_on_odd_shapes() {
    let [whole, _] = gpus();
    // The last shape is aligned (K a multiple of 8), so both fused products take their 128-bit
    // loads, the backward's B2 = A [r, K] included; rank 4 leaves the second product a K-step
    // that its K does not fill.
    for (seed, &(m, n, k)) in [(1, 3, 5), (67, 45, 83), (130, 300, 129), (40, 36, 72)]
        .iter()
        .enumerate()
    {
        for r in [1, 4, 8, 16] {
            let d = Dims { m, n, k, r };
            assert_passed(lora::check_lora(whole, d, seed as u64, None).unwrap());
        }
        let dropout = Dropout::new(0.25, seed as u32);
        let d = Dims { m, n, k, r: 8 };
        assert_passed(lora::check_lora(whole, d, seed as u64, Some(dropout)).unwrap());
    }
}

#[test]
fn lora_matches_cpu_on_split_tensors() {
    let [_, split] = gpus();
    for (seed, &(m, n, k)) in [(1, 9, 7), (37, 21, 19), (70, 33, 66)].iter().enumerate() {
        for r in [1, 8, 16] {
            let dropout = (r == 8).then_some(Dropout::new(0.5, 11));
            assert_passed(
                lora::check_lora(split, Dims { m, n, k, r }, seed as u64, dropout).unwrap(),
            );
        }
    }
}

/// Loss L = Σ g ⊙ y: dL/dx, dL/dA and dL/dB by central differences equal the reference, with a
/// fixed dropout mask and without.
#[test]
fn backward_reference_matches_finite_differences() {
    let d = Dims {
        m: 3,
        n: 4,
        k: 5,
        r: 2,
    };
    let scale = 1.5;
    let x = to_f64(&random(1, d.m * d.k, 1.0));
    let w = to_f64(&random(2, d.n * d.k, 1.0));
    let bias = to_f64(&random(3, d.n, 1.0));
    let a = to_f64(&random(4, d.r * d.k, 1.0));
    let b = to_f64(&random(5, d.n * d.r, 1.0));
    let g = to_f64(&random(6, d.m * d.n, 1.0));
    let dropout = Dropout::new(0.4, 9);
    let factors: Vec<f64> = (0..d.m * d.k)
        .map(|e| dropout.factor(e as u32) as f64)
        .collect();
    assert!(factors.contains(&0.0) && factors.iter().any(|&f| f > 1.0));
    for mask in [None, Some(factors.as_slice())] {
        let loss = |x: &[f64], a: &[f64], b: &[f64]| -> f64 {
            let lora = cpu::Lora { a, b, scale, mask };
            let (y, _) = cpu::lora_forward(d, x, &w, Some(&bias), &lora);
            y.iter().zip(&g).map(|(y, g)| y * g).sum()
        };
        let fd = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| finite_differences(v, 1e-5, f);
        let assert_close = |name: &str, a: &[f64], b: &[f64]| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() < 1e-6,
                    "{name}[{i}]: analytic {x} vs finite difference {y}"
                );
            }
        };
        let lora = cpu::Lora {
            a: &a,
            b: &b,
            scale,
            mask,
        };
        let (dx, da, db) = cpu::lora_backward(d, &g, &x, Some(&w), &lora);
        assert_close("dx", &dx, &fd(&x, &|x| loss(x, &a, &b)));
        assert_close("dA", &da, &fd(&a, &|a| loss(&x, a, &b)));
        assert_close("dB", &db, &fd(&b, &|b| loss(&x, &a, b)));
    }
}
