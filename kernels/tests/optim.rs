//! Optimizer: the global gradient norm over many odd-sized tensors, NaN propagation, and AdamW /
//! SGD trajectories against the f64 reference with clipping active, inactive and off, on whole
//! and split tensors, each in its own buffers or packed together (one launch for all).
mod common;
use common::{assert_passed, gpu, gpus, split_gpu};

use wgtrain_kernels::ops::check::random;
use wgtrain_kernels::ops::elementwise;
use wgtrain_kernels::ops::optim::{self, cpu, AdamW, Layout, Optimizer, Trainable, TEST_ADAMW};
use wgtrain_kernels::{DType, Gpu, Tensor};

const LAYOUTS: [Layout; 2] = [Layout::Separate, Layout::Packed];

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
    for layout in LAYOUTS {
        assert_passed(&[optim::check_grad_norm(gpu(), SMALL, layout, 1).unwrap()]);
        assert_passed(&[optim::check_grad_norm(split_gpu(1024), SMALL, layout, 2).unwrap()]);
        // Many workgroups per tensor.
        let large: &[&[usize]] = &[&[100_003], &[17], &[300, 301]];
        assert_passed(&[optim::check_grad_norm(gpu(), large, layout, 3).unwrap()]);
    }
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
    for (max_norm, layout) in [None, Some(1.0), Some(1e6)]
        .into_iter()
        .zip(LAYOUTS.iter().cycle())
    {
        for (i, gpu) in gpus().into_iter().enumerate() {
            let checks = optim::check_steps(gpu, SMALL, *layout, adamw, max_norm, (5, i as u64));
            assert_passed(checks.unwrap());
        }
    }
    // beta1 < 0.5 takes the other side of torch's lerp; no weight decay.
    let other = Optimizer::AdamW(AdamW {
        beta1: 0.3,
        beta2: 0.9,
        weight_decay: 0.0,
        ..TEST_ADAMW
    });
    for layout in LAYOUTS {
        let shapes: &[&[usize]] = &[&[100_003], &[5, 7]];
        let checks = optim::check_steps(gpu(), shapes, layout, other, Some(10.0), (4, 3));
        assert_passed(checks.unwrap());
    }
}

#[test]
fn sgd_trajectory_matches_cpu() {
    for (max_norm, weight_decay) in [(None, 0.0), (Some(1.0), 0.1), (Some(1e6), 0.0)] {
        let sgd = Optimizer::Sgd {
            lr: 0.1,
            weight_decay,
        };
        for layout in LAYOUTS {
            for (i, gpu) in gpus().into_iter().enumerate() {
                let checks = optim::check_steps(gpu, SMALL, layout, sgd, max_norm, (3, i as u64));
                assert_passed(checks.unwrap());
            }
        }
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
    let sgd = Optimizer::Sgd {
        lr: 1.0,
        weight_decay: 0.0,
    };
    let trainables: Vec<Trainable> = params
        .iter()
        .zip(&grads)
        .map(|(param, grad)| Trainable {
            param,
            grad,
            moments: None,
            decays: true,
        })
        .collect();
    let mut batch = gpu.batch();
    optim::grad_norm_sq(&mut batch, &[&grads[0], &grads[1]], &norm).unwrap();
    optim::update(&mut batch, &trainables, &sgd, Some((&norm, 0.5))).unwrap();
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

/// Dispatches recorded by `record` on `gpu`, once run.
fn launches(gpu: &Gpu, record: impl FnOnce(&mut wgtrain_kernels::Batch)) -> u64 {
    let before = gpu.dispatches();
    let mut batch = gpu.batch();
    record(&mut batch);
    batch.submit();
    gpu.dispatches() - before
}

#[test]
fn packed_tensors_take_one_launch_per_kernel() {
    let shapes: Vec<Vec<usize>> = SMALL.iter().map(|s| s.to_vec()).collect();
    for gpu in gpus() {
        let role = || Tensor::packed(gpu, &shapes, DType::F32).unwrap();
        let (params, grads, m, v) = (role(), role(), role(), role());
        let chunks: Vec<_> = grads.iter().flat_map(|g| g.chunks()).collect();
        let mut shared: Vec<_> = chunks.iter().map(|c| &c.buffer).collect();
        shared.dedup();
        let buffers = shared.len();
        // One buffer whole; the split device fills 1 KiB buffers, several chunks to some.
        match gpu.max_binding_bytes {
            1024 => assert!(buffers < chunks.len(), "{buffers} buffers"),
            _ => assert_eq!(buffers, 1),
        }
        let trainables: Vec<Trainable> = (0..shapes.len())
            .map(|i| Trainable {
                param: &params[i],
                grad: &grads[i],
                moments: Some((&m[i], &v[i])),
                decays: i % 2 == 0,
            })
            .collect();
        let norm = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        let adamw = Optimizer::AdamW(TEST_ADAMW);
        let n = launches(gpu, |b| optim::grad_norm_sq(b, &grad_refs, &norm).unwrap());
        assert_eq!(
            n,
            buffers as u64 + 1,
            "sum_squares per buffer, then sum_partials"
        );
        let clip = Some((&norm, 1.0));
        let n = launches(gpu, |b| {
            optim::update(b, &trainables, &adamw, clip).unwrap()
        });
        assert_eq!(n, buffers as u64);
    }
    // Separate tensors: a launch per chunk.
    let separate: Vec<Tensor> = SMALL
        .iter()
        .map(|s| Tensor::zeros(gpu(), s, DType::F32).unwrap())
        .collect();
    let norm = Tensor::zeros(gpu(), &[1], DType::F32).unwrap();
    let refs: Vec<&Tensor> = separate.iter().collect();
    let n = launches(gpu(), |b| optim::grad_norm_sq(b, &refs, &norm).unwrap());
    assert_eq!(n, SMALL.len() as u64 + 1);
}

#[test]
fn packed_tensors_are_views_of_their_own_ranges() {
    for gpu in gpus() {
        let shapes = vec![vec![3], vec![40, 7], vec![1], vec![5, 31]];
        let values: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| random(i as u64, s.iter().product(), 1.0))
            .collect();
        let before = gpu.memory().live;
        let packed = Tensor::packed(gpu, &shapes, DType::F32).unwrap();
        let separate_bytes: u64 = shapes
            .iter()
            .map(|s| Tensor::zeros(gpu, s, DType::F32).unwrap().device_bytes())
            .sum();
        assert_eq!(gpu.memory().live - before, separate_bytes);
        for (t, v) in packed.iter().zip(&values) {
            t.write_f32(gpu, v).unwrap();
        }
        packed[1].clear(gpu);
        // A kernel on a view reads and writes that range only: packed[3] += 1.
        let ones = Tensor::from_f32(gpu, &[5, 31], &[1.0; 5 * 31]).unwrap();
        let mut batch = gpu.batch();
        elementwise::axpby(&mut batch, 1.0, &ones, 1.0, &packed[3]).unwrap();
        batch.submit();
        for (i, (t, v)) in packed.iter().zip(&values).enumerate() {
            let expected: Vec<f32> = match i {
                1 => vec![0.0; v.len()],
                3 => v.iter().map(|x| x + 1.0).collect(),
                _ => v.clone(),
            };
            assert_eq!(t.to_f32(gpu).unwrap(), expected, "tensor {i}");
        }
    }
}

#[test]
fn rejects_bad_arguments() {
    let gpu = gpu();
    let t = |shape: &[usize]| Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let (p, g, m, v) = (t(&[4, 5]), t(&[4, 5]), t(&[4, 5]), t(&[5, 4]));
    let adamw = |moments, hyper| {
        let tensors = [
            Trainable {
                param: &p,
                grad: &g,
                moments: None,
                decays: true,
            },
            Trainable {
                param: &p,
                grad: &g,
                moments,
                decays: true,
            },
        ];
        optim::update(
            &mut gpu.batch(),
            &tensors[1..],
            &Optimizer::AdamW(hyper),
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let err = adamw(Some((&m, &v)), TEST_ADAMW);
    assert!(err.contains("tensor 0 exp_avg_sq"), "{err}");
    let zero_step = AdamW {
        step: 0,
        ..TEST_ADAMW
    };
    let err = adamw(Some((&m, &m)), zero_step);
    assert!(err.contains("step"), "{err}");
    let err = adamw(None, TEST_ADAMW);
    assert!(err.contains("tensor 0 has no moments"), "{err}");
    let bf16 = Tensor::zeros(gpu, &[4, 5], DType::BF16).unwrap();
    let err = optim::grad_norm_sq(&mut gpu.batch(), &[&g, &bf16], &t(&[1])).unwrap_err();
    assert!(err.to_string().contains("grads[1]"), "{err}");
}
