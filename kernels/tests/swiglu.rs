//! SwiGLU: GPU against the f64 reference on odd shapes, on whole and split tensors; the
//! reference's backward against finite differences of its forward.
mod common;
use common::{assert_passed, gpu};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::swiglu::{self, cpu};
use wgtrain_kernels::{DType, Gpu, GpuOptions, Tensor};

#[test]
fn matches_cpu_on_odd_shapes() {
    for (i, (rows, cols)) in [(1, 1), (1, 5), (7, 300), (64, 1001), (3, 4864)]
        .into_iter()
        .enumerate()
    {
        assert_passed(swiglu::check(gpu(), rows, cols, i as u64).unwrap());
    }
}

#[test]
fn matches_cpu_on_split_tensors() {
    let options = GpuOptions {
        max_binding_bytes: Some(1024),
        ..GpuOptions::from_env().unwrap()
    };
    let gpu = Gpu::new(&options).unwrap();
    for (i, (rows, cols)) in [(37, 130), (1, 256), (9, 3)].into_iter().enumerate() {
        assert_passed(swiglu::check(&gpu, rows, cols, 10 + i as u64).unwrap());
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let n = 12;
    let (g, u, dh) = (
        to_f64(&random(1, n, 6.0)),
        to_f64(&random(2, n, 2.0)),
        to_f64(&random(3, n, 1.0)),
    );
    let (dg, du) = cpu::backward(&dh, &g, &u);
    let loss = |g: &[f64], u: &[f64]| {
        cpu::forward(g, u)
            .iter()
            .zip(&dh)
            .map(|(h, d)| h * d)
            .sum::<f64>()
    };
    let h = 1e-6;
    for i in 0..n {
        let (mut up, mut down) = (g.clone(), g.clone());
        up[i] += h;
        down[i] -= h;
        let numeric = (loss(&up, &u) - loss(&down, &u)) / (2.0 * h);
        assert!(
            (dg[i] - numeric).abs() < 1e-7,
            "dg[{i}]: {} vs {numeric}",
            dg[i]
        );
        let (mut up, mut down) = (u.clone(), u.clone());
        up[i] += h;
        down[i] -= h;
        let numeric = (loss(&g, &up) - loss(&g, &down)) / (2.0 * h);
        assert!(
            (du[i] - numeric).abs() < 1e-7,
            "du[{i}]: {} vs {numeric}",
            du[i]
        );
    }
}

#[test]
fn rejects_mismatched_shapes() {
    let gpu = gpu();
    let g = Tensor::zeros(gpu, &[4, 8], DType::F32).unwrap();
    let u = Tensor::zeros(gpu, &[4, 9], DType::F32).unwrap();
    let h = Tensor::zeros(gpu, &[4, 8], DType::F32).unwrap();
    let err = swiglu::swiglu_forward(&mut gpu.batch(), &g, &u, &h).unwrap_err();
    assert!(err.to_string().contains("swiglu u"), "{err}");
}
