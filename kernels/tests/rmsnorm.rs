//! RMSNorm: GPU against the f64 reference on odd shapes, on whole and split tensors (with the
//! adapter's variant, and with each variant forced); the reference's backward against finite
//! differences of its forward.
mod common;
use common::{assert_passed, finite_differences, forced_gpu, gpu, split_gpu};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::rmsnorm::{self, cpu};
use wgtrain_kernels::plan::RowwiseVariant;
use wgtrain_kernels::{DType, Out, Tensor};

#[test]
fn matches_cpu_on_odd_shapes() {
    let cases = [(1, 1), (1, 7), (3, 8192), (67, 896), (5, 1001), (2100, 33)];
    for (i, &(rows, cols)) in cases.iter().enumerate() {
        for w_bf16 in [false, true] {
            for accumulate in [false, true] {
                assert_passed(
                    rmsnorm::check(gpu(), rows, cols, w_bf16, accumulate, i as u64 * 10).unwrap(),
                );
            }
        }
    }
}

#[test]
fn matches_cpu_on_split_tensors() {
    // 1 KiB: one to four rows per chunk; 4 KiB with 100 columns: dW blocks of 8 rows split by
    // chunks of 10 rows, and partial-sum rows split across chunks too.
    for (bytes, cases) in [
        (1024, vec![(37, 60), (1, 3), (19, 255)]),
        (4096, vec![(100, 100), (1000, 9)]),
    ] {
        let gpu = split_gpu(bytes);
        for (i, (rows, cols)) in cases.into_iter().enumerate() {
            for w_bf16 in [false, true] {
                assert_passed(
                    rmsnorm::check(gpu, rows, cols, w_bf16, i % 2 == 0, 7 + i as u64).unwrap(),
                );
            }
        }
    }
}

#[test]
fn fused_residual_add_matches_cpu_and_the_unfused_launches() {
    for (i, &(rows, cols)) in [(1, 1), (3, 8192), (67, 896), (5, 1001)].iter().enumerate() {
        for w_bf16 in [false, true] {
            assert_passed(
                rmsnorm::check_add_forward(gpu(), rows, cols, w_bf16, 40 + i as u64).unwrap(),
            );
        }
    }
    // Chunks of one to four rows.
    let split = split_gpu(1024);
    for (i, &(rows, cols)) in [(37, 60), (19, 255), (1, 3)].iter().enumerate() {
        assert_passed(
            rmsnorm::check_add_forward(split, rows, cols, i % 2 == 0, 50 + i as u64).unwrap(),
        );
    }
}

/// Every rowwise variant, forced whatever the adapter's plan picks (the tests above run that one),
/// on whole tensors and on chunks of one to four rows, rows shorter and longer than a workgroup.
#[test]
fn every_variant_matches_cpu() {
    for &variant in RowwiseVariant::ALL {
        let spec = format!("rowwise={}", variant.name());
        let (whole, split) = (
            forced_gpu(&spec, None).unwrap(),
            forced_gpu(&spec, Some(1024)).unwrap(),
        );
        assert_eq!(whole.plan.rowwise, variant);
        for (i, (gpu, rows, cols)) in [(&whole, 67, 896), (&whole, 130, 33), (&split, 37, 60)]
            .into_iter()
            .enumerate()
        {
            let seed = 60 + 10 * i as u64;
            assert_passed(rmsnorm::check(gpu, rows, cols, i != 1, i == 0, seed).unwrap());
            assert_passed(rmsnorm::check_add_forward(gpu, rows, cols, i == 1, seed + 5).unwrap());
        }
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (rows, cols, eps) = (3, 5, 1e-6);
    let x = to_f64(&random(1, rows * cols, 2.0));
    let w = to_f64(&random(2, cols, 1.0));
    let dy = to_f64(&random(3, rows * cols, 1.0));
    let (dx, dw) = cpu::backward(&dy, &x, &w, eps);
    let loss = |x: &[f64], w: &[f64]| {
        cpu::forward(x, w, eps)
            .0
            .iter()
            .zip(&dy)
            .map(|(y, g)| y * g)
            .sum::<f64>()
    };
    let dx_num = finite_differences(&x, 1e-6, |x| loss(x, &w));
    let dw_num = finite_differences(&w, 1e-6, |w| loss(&x, w));
    for (a, b) in dx.iter().zip(&dx_num).chain(dw.iter().zip(&dw_num)) {
        assert!((a - b).abs() < 1e-7, "analytic {a} vs numeric {b}");
    }
}

#[test]
fn weight_gradient_is_deterministic() {
    let gpu = split_gpu(4096);
    let (rows, cols) = (300, 100);
    let x = Tensor::from_f32(gpu, &[rows, cols], &random(1, rows * cols, 1.0)).unwrap();
    let dy = Tensor::from_f32(gpu, &[rows, cols], &random(2, rows * cols, 1.0)).unwrap();
    let w = Tensor::from_f32_as_bf16(gpu, &[cols], &random(3, cols, 1.0)).unwrap();
    let (y, dx) = (
        Tensor::zeros(gpu, &[rows, cols], DType::F32).unwrap(),
        Tensor::zeros(gpu, &[rows, cols], DType::F32).unwrap(),
    );
    let rstd = Tensor::zeros(gpu, &[rows], DType::F32).unwrap();
    let run = || {
        let dw = Tensor::zeros(gpu, &[cols], DType::F32).unwrap();
        let mut batch = gpu.batch();
        rmsnorm::rmsnorm_forward(&mut batch, &x, &w, 1e-6, &y, &rstd).unwrap();
        rmsnorm::rmsnorm_backward(
            &mut batch,
            &dy,
            &x,
            &w,
            &rstd,
            Out::write(&dx),
            Some(Out::write(&dw)),
        )
        .unwrap();
        batch.submit();
        (dx.to_bytes(gpu).unwrap(), dw.to_bytes(gpu).unwrap())
    };
    assert_eq!(run(), run());
}

#[test]
fn rejects_mismatched_shapes() {
    let gpu = gpu();
    let x = Tensor::zeros(gpu, &[4, 8], DType::F32).unwrap();
    let y = Tensor::zeros(gpu, &[4, 8], DType::F32).unwrap();
    let rstd = Tensor::zeros(gpu, &[4], DType::F32).unwrap();
    let short_w = Tensor::zeros(gpu, &[7], DType::BF16).unwrap();
    let err =
        rmsnorm::rmsnorm_forward(&mut gpu.batch(), &x, &short_w, 1e-6, &y, &rstd).unwrap_err();
    assert!(err.to_string().contains("rmsnorm weight"), "{err}");
    let w = Tensor::zeros(gpu, &[8], DType::F32).unwrap();
    let short_rstd = Tensor::zeros(gpu, &[3], DType::F32).unwrap();
    let err =
        rmsnorm::rmsnorm_forward(&mut gpu.batch(), &x, &w, 1e-6, &y, &short_rstd).unwrap_err();
    assert!(err.to_string().contains("rmsnorm rstd"), "{err}");
}
