//! Optimizer: the global gradient norm over many odd-sized tensors, NaN propagation, and AdamW /
//! SGD trajectories against the f64 reference with clipping active, inactive and off, on whole
//! and split tensors.
mod common;
use common::{assert_passed, gpu, split_gpu};

use wgtrain_kernels::ops::check::random;
use wgtrain_kernels::ops::optim::{self, cpu, AdamW, Optimizer, TEST_ADAMW};
use wgtrain_kernels::{DType, Tensor};

/// Odd sizes that fit the split device (1-D tensors of at most 256 elements).
const SMALL: &[&[usize]] = &[
    &[1],
    &[3],
    &[7, 13],
    &[255],
    &[129, 65],
    &[40, 200],
    &[2, 3, 5],
];

#[test]
fn grad_norm_over_many_tensors() {
    assert_passed(&[optim::check_grad_norm(gpu(), SMALL, 1).unwrap()]);
    assert_passed(&[optim::check_grad_norm(split_gpu(1024), SMALL, 2).unwrap()]);
    // Many workgroups per tensor.
    assert_passed(&[optim::check_grad_norm(gpu(), &[&[100_003], &[17], &[300, 301]], 3).unwrap()]);
}

#[test]
fn grad_norm_propagates_nan_and_is_deterministic() {
    for gpu in [gpu(), split_gpu(1024)] {
        let mut values = random(1, 40 * 200, 1.0);
        let grads = |values: &[f32]| {
            [
                Tensor::from_f32(gpu, &[3], &[1.0, 2.0, 3.0]).unwrap(),
                Tensor::from_f32(gpu, &[40, 200], values).unwrap(),
            ]
        };
        let norm = |grads: &[Tensor; 2]| {
            let out = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
            let mut batch = gpu.batch();
            optim::grad_norm_sq(&mut batch, &[&grads[0], &grads[1]], &out).unwrap();
            batch.submit();
            out.to_f32(gpu).unwrap()[0]
        };
        let finite = grads(&values);
        assert_eq!(norm(&finite).to_bits(), norm(&finite).to_bits());
        values[5 * 200 + 77] = f32::NAN;
        assert!(norm(&grads(&values)).is_nan());
    }
}

#[test]
fn adamw_trajectory_matches_cpu() {
    let adamw = Optimizer::AdamW(TEST_ADAMW);
    // Gradient norms here are around 75: 1.0 clips, 1e6 does not.
    for max_norm in [None, Some(1.0), Some(1e6)] {
        assert_passed(optim::check_steps(gpu(), SMALL, adamw, max_norm, 5, 1).unwrap());
        assert_passed(optim::check_steps(split_gpu(1024), SMALL, adamw, max_norm, 5, 2).unwrap());
    }
    // beta1 < 0.5 takes the other side of torch's lerp; no weight decay.
    let other = Optimizer::AdamW(AdamW {
        beta1: 0.3,
        beta2: 0.9,
        weight_decay: 0.0,
        ..TEST_ADAMW
    });
    assert_passed(
        optim::check_steps(gpu(), &[&[100_003], &[5, 7]], other, Some(10.0), 4, 3).unwrap(),
    );
}

#[test]
fn sgd_trajectory_matches_cpu() {
    for (max_norm, weight_decay) in [(None, 0.0), (Some(1.0), 0.1), (Some(1e6), 0.0)] {
        let sgd = Optimizer::Sgd {
            lr: 0.1,
            weight_decay,
        };
        assert_passed(optim::check_steps(gpu(), SMALL, sgd, max_norm, 3, 4).unwrap());
        assert_passed(optim::check_steps(split_gpu(1024), SMALL, sgd, max_norm, 3, 5).unwrap());
    }
}

#[test]
fn clipped_sgd_step_has_the_clip_norm() {
    // lr = 1 and no decay: the step is the clipped gradient, whose norm is max_norm.
    let gpu = split_gpu(1024);
    let shapes: [&[usize]; 2] = [&[50, 100], &[77]];
    let grads: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Tensor::from_f32(gpu, s, &random(i as u64, s.iter().product(), 1.0)).unwrap())
        .collect();
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::zeros(gpu, s, DType::F32).unwrap())
        .collect();
    let norm = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
    let mut batch = gpu.batch();
    optim::grad_norm_sq(&mut batch, &[&grads[0], &grads[1]], &norm).unwrap();
    for (p, g) in params.iter().zip(&grads) {
        optim::sgd_step(&mut batch, p, g, 1.0, 0.0, Some((&norm, 0.5))).unwrap();
    }
    batch.submit();
    let step_norm = params
        .iter()
        .flat_map(|p| p.to_f32(gpu).unwrap())
        .map(|x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((step_norm - 0.5).abs() < 1e-6, "step norm {step_norm}");
    assert!(cpu::clip_scale(norm.to_f32(gpu).unwrap()[0] as f64, 0.5) < 0.1);
}

#[test]
fn rejects_bad_arguments() {
    let gpu = gpu();
    let t = |shape: &[usize]| Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let (p, g, m, v) = (t(&[4, 5]), t(&[4, 5]), t(&[4, 5]), t(&[5, 4]));
    let err = optim::adamw_step(&mut gpu.batch(), &p, &g, &m, &v, &TEST_ADAMW, None).unwrap_err();
    assert!(err.to_string().contains("adamw exp_avg_sq"), "{err}");
    let zero_step = AdamW {
        step: 0,
        ..TEST_ADAMW
    };
    let err = optim::adamw_step(&mut gpu.batch(), &p, &g, &m, &m, &zero_step, None).unwrap_err();
    assert!(err.to_string().contains("step"), "{err}");
    let bf16 = Tensor::zeros(gpu, &[4, 5], DType::BF16).unwrap();
    let err = optim::grad_norm_sq(&mut gpu.batch(), &[&g, &bf16], &t(&[1])).unwrap_err();
    assert!(err.to_string().contains("grads[1]"), "{err}");
}
