//! Elementwise kernels against the CPU reference, whole and split into chunks; tensor chunking.
mod common;
use common::{gpus, split_gpu};
use wgtrain_kernels::ops::elementwise;
use wgtrain_kernels::{DType, Gpu, GpuOptions, Tensor};

#[test]
fn elementwise_matches_cpu_whole_and_split() {
    for gpu in gpus() {
        for (rows, cols) in [(1, 2), (1, 1), (7, 13), (67, 130), (300, 6)] {
            for check in elementwise::check(gpu, rows, cols, 7).unwrap() {
                assert!(check.passed(), "{check:?}");
            }
        }
    }
}

#[test]
fn tensors_split_into_whole_row_chunks_and_round_trip() {
    let gpu = split_gpu(1024);
    // 100 rows of 30 f32 = 120 bytes per row: 8 rows per 1024-byte chunk.
    let data: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    let t = Tensor::from_f32(gpu, &[100, 30], &data).unwrap();
    assert_eq!(t.chunks().len(), 13);
    assert!(t.chunks().iter().all(|b| b.size() <= 1024));
    assert_eq!(t.to_f32(gpu).unwrap(), data);
    let at = t.row(17);
    assert_eq!(at.offset, 30);
    // bf16 rows of odd length: chunks keep an even element count so each starts on a word.
    let odd: Vec<f32> = (0..7 * 201).map(|i| (i % 97) as f32).collect();
    let b = Tensor::from_f32_as_bf16(gpu, &[7, 201], &odd).unwrap();
    assert!(b.chunks().len() > 1);
    assert_eq!(b.to_f32(gpu).unwrap(), odd);
    assert_eq!(b.dtype(), DType::BF16);
}

#[test]
fn bad_sizes_are_clear_errors() {
    let gpu = split_gpu(1024);
    let err = Tensor::zeros(gpu, &[2, 1000], DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not fit one storage binding"), "{err}");
    let err = Tensor::from_f32(gpu, &[2, 3], &[1.0; 5])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs 24 bytes, got 20"), "{err}");
    let err = Tensor::zeros(gpu, &[0, 3], DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("zero dimension"), "{err}");
    let bad = GpuOptions {
        max_binding_bytes: Some(100),
        ..GpuOptions::from_env().unwrap()
    };
    assert!(Gpu::new(&bad)
        .err()
        .unwrap()
        .to_string()
        .contains("at least 1024"));
}

#[test]
fn unknown_device_names_the_adapters() {
    let options = GpuOptions {
        device: Some("no-such-gpu-xyz".into()),
        ..GpuOptions::from_env().unwrap()
    };
    let err = Gpu::new(&options).err().unwrap().to_string();
    assert!(
        err.contains("no adapter name contains 'no-such-gpu-xyz'"),
        "{err}"
    );
    let options = GpuOptions {
        device: Some("99".into()),
        ..GpuOptions::from_env().unwrap()
    };
    assert!(Gpu::new(&options)
        .err()
        .unwrap()
        .to_string()
        .contains("device 99 does not exist"));
}
