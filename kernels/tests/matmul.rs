//! Matmul family: GPU against the f64 CPU reference on odd shapes, with whole and split tensors,
//! and the backward references against finite differences of the forward one.
mod common;
use common::{assert_passed, finite_differences, forced_gpu, gpu, gpus};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::matmul::{self, cpu};
use wgtrain_kernels::ops::{cross_entropy, lora};
use wgtrain_kernels::plan::GemmVariant;
use wgtrain_kernels::{Gpu, GpuOptions, Out};

#[test]
fn matmul_matches_cpu_on_odd_shapes() {
    let [whole, _] = gpus();
    for (seed, &(m, n, k)) in [
        (1, 1, 1),
        (1, 7, 5),
        (67, 45, 83),
        (130, 65, 129),
        (64, 128, 32),
        (70, 190, 40),
    ]
    .iter()
    .enumerate()
    {
        for bf16 in [false, true] {
            assert_passed(matmul::check_matmul(whole, m, n, k, bf16, seed as u64).unwrap());
        }
    }
}

#[test]
fn matmul_matches_cpu_on_split_tensors() {
    let [_, split] = gpus();
    for (seed, &(m, n, k)) in [(1, 3, 9), (37, 21, 19), (70, 9, 66)].iter().enumerate() {
        for bf16 in [false, true] {
            assert_passed(matmul::check_matmul(split, m, n, k, bf16, seed as u64).unwrap());
        }
    }
}

/// Decode's few-row products take the `gemv` kernel: odd K exercises bf16 rows that start
/// mid-word, and the split tensors put chunk boundaries inside W.
#[test]
fn matmul_matches_cpu_with_few_rows() {
    for gpu in gpus() {
        for (seed, &(m, n, k)) in [
            (1, 1, 1),
            (2, 67, 45),
            (3, 9, 130),
            (5, 33, 17),
            (8, 130, 65),
        ]
        .iter()
        .enumerate()
        {
            for bf16 in [false, true] {
                assert_passed(matmul::check_matmul(gpu, m, n, k, bf16, seed as u64).unwrap());
            }
        }
    }
}

#[test]
fn gemm_handles_every_transpose() {
    for gpu in gpus() {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            assert_passed(&[matmul::check_gemm(gpu, 29, 17, 41, trans_a, trans_b, 7).unwrap()]);
        }
    }
}

/// Reductions longer than one launch takes (and than lavapipe's per-invocation loop limit allows).
#[test]
fn gemm_accumulates_long_reductions() {
    let [gpu, _] = gpus();
    assert_passed(&[matmul::check_gemm(gpu, 3, 5, 20000, false, false, 8).unwrap()]);
    assert_passed(&[matmul::check_gemm(gpu, 2, 3, 9000, true, true, 9).unwrap()]);
    assert_passed(&[matmul::check_gemm(gpu, 3, 70, 9001, false, true, 10).unwrap()]);
}

#[test]
fn launchers_reject_mismatched_shapes() {
    let [gpu, _] = gpus();
    let t = |shape: &[usize]| {
        wgtrain_kernels::Tensor::zeros(gpu, shape, wgtrain_kernels::DType::F32).unwrap()
    };
    let mut batch = gpu.batch();
    let err = matmul::matmul_forward(&mut batch, &t(&[4, 3]), &t(&[5, 2]), None, &t(&[4, 5]))
        .unwrap_err();
    assert!(err.to_string().contains("matmul_forward"), "{err}");
    assert!(matmul::matmul_backward_weight(
        &mut batch,
        &t(&[4, 5]),
        &t(&[4, 3]),
        Out::write(&t(&[3, 5]))
    )
    .is_err());
}

/// Loss L = Σ g ⊙ (x·wᵀ + bias): dL/dx and dL/dw by central differences equal the references.
#[test]
fn backward_references_match_finite_differences() {
    let (m, n, k) = (3, 4, 5);
    let x = to_f64(&random(1, m * k, 1.0));
    let w = to_f64(&random(2, n * k, 1.0));
    let bias = to_f64(&random(3, n, 1.0));
    let g = to_f64(&random(4, m * n, 1.0));
    let loss = |x: &[f64], w: &[f64]| -> f64 {
        cpu::matmul_forward(x, w, Some(&bias), m, n, k)
            .iter()
            .zip(&g)
            .map(|(y, g)| y * g)
            .sum()
    };
    let fd = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| finite_differences(v, 1e-5, f);
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-7);
    assert!(close(
        &cpu::matmul_backward_input(&g, &w, m, n, k),
        &fd(&x, &|x| loss(x, &w))
    ));
    assert!(close(
        &cpu::matmul_backward_weight(&g, &x, m, n, k),
        &fd(&w, &|w| loss(&x, w))
    ));
}

/// Every GEMM variant this adapter can run, forced whatever the default plan or `WGTRAIN_KERNELS`
/// says, on whole and split tensors: projections (few and many rows, bf16 and f32 W), every
/// transpose, the fused LoRA forward/backward and the cross-entropy LM head. On lavapipe
/// (SUBGROUP, subgroups of 8) that is both `tiled` and `subgroup`.
#[test]
fn every_gemm_variant_matches_cpu() {
    let mut ran = Vec::new();
    for variant in GemmVariant::ALL {
        let spec = format!("gemm={}", variant.name());
        let whole = match forced_gpu(&spec, None) {
            Ok(gpu) => gpu,
            Err(e) => {
                // Not silent: the adapter said why it cannot run this variant.
                eprintln!("{spec} not run on this adapter: {e:#}");
                continue;
            }
        };
        assert_eq!(whole.plan.gemm, *variant);
        let split = forced_gpu(&spec, Some(1024)).unwrap();
        for gpu in [&whole, &split] {
            // Odd shapes read element by element; row lengths of whole 16-byte groups take the
            // subgroup kernel's 128-bit loads; M > 32 takes its 64-row blocks.
            for (seed, &(m, n, k)) in [(5, 33, 17), (37, 21, 19), (40, 72, 48), (70, 64, 40)]
                .iter()
                .enumerate()
            {
                for bf16 in [false, true] {
                    assert_passed(matmul::check_matmul(gpu, m, n, k, bf16, seed as u64).unwrap());
                }
            }
            // (36, 40, 13): aligned row lengths where A is stored [K, M] and B [K, N], so the
            // aligned subgroup kernel's last K-step zeroes what lies past K.
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                for (m, n, k) in [(29, 17, 41), (40, 72, 48), (36, 40, 16), (36, 40, 13)] {
                    assert_passed(
                        &[matmul::check_gemm(gpu, m, n, k, trans_a, trans_b, 7).unwrap()],
                    );
                }
            }
            assert_passed(lora::selftest(gpu).unwrap());
            assert_passed(cross_entropy::selftest(gpu).unwrap());
        }
        ran.push(variant.name());
    }
    // A CPU adapter with subgroups of at least 8 lanes (lavapipe) must run both.
    let adapter = gpu();
    if adapter.is_cpu()
        && adapter.features.contains(wgpu::Features::SUBGROUP)
        && adapter.info.subgroup_min_size >= 8
    {
        assert_eq!(ran, ["tiled", "subgroup"]);
    }
}

/// `WGTRAIN_PROFILE=1`'s table: each dispatch timed on its own under its variant and grid, the
/// report sorted by total time, and the profile started over after a report.
#[test]
fn profile_counts_each_dispatch_by_kernel_and_grid() {
    let gpu = Gpu::new(&GpuOptions {
        profile: true,
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap();
    let t = |shape: &[usize]| {
        wgtrain_kernels::Tensor::zeros(&gpu, shape, wgtrain_kernels::DType::F32).unwrap()
    };
    let (x, w, y) = (t(&[40, 48]), t(&[72, 48]), t(&[40, 72]));
    let mut batch = gpu.batch();
    for _ in 0..3 {
        matmul::matmul_forward(&mut batch, &x, &w, None, &y).unwrap();
    }
    batch.submit();
    let profile = gpu.profile.as_ref().expect("profile on");
    let report = profile.report();
    assert!(report.contains("3 dispatches"), "{report}");
    let row = report
        .lines()
        .find(|l| l.contains("TRANS_B=true"))
        .unwrap_or_else(|| panic!("no forward row: {report}"));
    // One class: 3 calls of the forward's variant on its grid.
    assert!(row.contains("| 3 |"), "{row}");
    assert!(profile.report().contains("0 dispatches"));
}

/// The subgroup kernel reads whole vec4s only where a launch's offsets and row lengths allow:
/// the profile names the variant each product ran.
#[test]
fn subgroup_gemm_reads_whole_vec4s_only_when_aligned() {
    let gpu = match Gpu::new(&GpuOptions {
        kernels: Some("gemm=subgroup".into()),
        profile: true,
        ..GpuOptions::from_env().unwrap()
    }) {
        Ok(gpu) => gpu,
        Err(e) => {
            // Not silent: the adapter said why it cannot run the subgroup kernel.
            eprintln!("gemm=subgroup not run on this adapter: {e:#}");
            return;
        }
    };
    let t = |shape: &[usize]| {
        wgtrain_kernels::Tensor::zeros(&gpu, shape, wgtrain_kernels::DType::F32).unwrap()
    };
    let profile = gpu.profile.as_ref().expect("profile on");
    for (k, aligned) in [(48, true), (45, false)] {
        let mut batch = gpu.batch();
        matmul::matmul_forward(&mut batch, &t(&[40, k]), &t(&[72, k]), None, &t(&[40, 72]))
            .unwrap();
        batch.submit();
        let report = profile.report();
        assert!(
            report.contains(&format!("SG_ALIGNED={aligned}")),
            "K {k}: {report}"
        );
    }
}
