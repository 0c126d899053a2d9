//! Elementwise kernels against the CPU reference, whole and split into chunks; tensor chunking.
mod common;
use common::{gpus, split_gpu};
use wgtrain_kernels::ops::elementwise;
use wgtrain_kernels::{DType, Gpu, GpuOptions, Out, Tensor};

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
fn a_prefix_is_the_first_rows_in_place() {
    let gpu = split_gpu(1024);
    let data: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    let t = Tensor::from_f32(gpu, &[100, 30], &data).unwrap();
    // 20 rows span three 8-row chunks; a write through the prefix lands in the tensor.
    let first = t.prefix(gpu, 20).unwrap();
    assert_eq!((first.shape(), first.chunks().len()), (&[20, 30][..], 3));
    assert_eq!(first.device_bytes(), 0);
    assert_eq!(first.to_f32(gpu).unwrap(), data[..600]);
    let source = Tensor::from_f32(gpu, &[20, 30], &vec![-1.0; 600]).unwrap();
    let mut batch = gpu.batch();
    elementwise::copy_rows(&mut batch, &source, 0..20, &first, 0).unwrap();
    batch.submit();
    let mut expected = data.clone();
    expected[..600].fill(-1.0);
    assert_eq!(t.to_f32(gpu).unwrap(), expected);
    // A vector's prefix: its first entries.
    let v = Tensor::from_f32(gpu, &[5], &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    assert_eq!(v.prefix(gpu, 2).unwrap().to_f32(gpu).unwrap(), [1.0, 2.0]);
    for bad in [0, 101] {
        let err = t.prefix(gpu, bad).err().unwrap().to_string();
        assert!(err.contains(&format!("a prefix of {bad}")), "{err}");
    }
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

#[test]
fn dropout_keeps_the_expected_fraction_with_independent_seeds() {
    let gpu = common::gpu();
    let (rows, cols) = (250, 400);
    let ones = Tensor::from_f32(gpu, &[rows, cols], &vec![1.0; rows * cols]).unwrap();
    let run = |p: f32, seed: u32| {
        let out = Tensor::zeros(gpu, &[rows, cols], DType::F32).unwrap();
        let mut batch = gpu.batch();
        let mask = elementwise::Dropout::new(p, seed);
        elementwise::dropout(&mut batch, &ones, Out::write(&out), &mask).unwrap();
        batch.submit();
        out.to_f32(gpu).unwrap()
    };
    let n = (rows * cols) as f64;
    for p in [0.05f32, 0.1, 0.5] {
        let out = run(p, 7);
        let kept = out.iter().filter(|&&v| v != 0.0).count() as f64;
        // Binomial(n, 1 - p): 5 standard deviations.
        let sd = (n * p as f64 * (1.0 - p as f64)).sqrt();
        assert!(
            (kept - n * (1.0 - p as f64)).abs() < 5.0 * sd,
            "p {p}: kept {kept} of {n}"
        );
        let scale = 1.0 / (1.0 - p);
        assert!(out.iter().all(|&v| v == 0.0 || v == scale));
        // The same seed regenerates the mask; another seed draws an independent one.
        assert_eq!(run(p, 7), out);
        let other = run(p, 8);
        let both_dropped = out
            .iter()
            .zip(&other)
            .filter(|(a, b)| **a == 0.0 && **b == 0.0)
            .count() as f64;
        let expected = n * (p as f64).powi(2);
        assert!(
            (both_dropped - expected).abs() < 5.0 * expected.sqrt() + 5.0,
            "p {p}: {both_dropped} dropped by both seeds, {expected} expected if independent"
        );
    }
    assert!(
        run(0.0, 3).iter().all(|&v| v == 1.0),
        "p = 0 keeps everything"
    );
    let mut batch = gpu.batch();
    let err = elementwise::dropout(
        &mut batch,
        &ones,
        Out::write(&ones),
        &elementwise::Dropout::new(1.0, 0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("[0, 1)"), "{err}");
}
