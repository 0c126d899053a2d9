//! Device-memory accounting (`Gpu::memory`): tensors counted while alive, temporaries an op keeps
//! until its batch is submitted, the peak and its reset; and dry runs, which allocate the same and
//! execute nothing. Also the count of submitted dispatches (`Gpu::dispatches`).
use wgtrain_kernels::ops::elementwise::add;
use wgtrain_kernels::ops::lora::{lora_backward, Dropout, InputGrad, Lora, LoraGrads};
use wgtrain_kernels::ops::optim::grad_norm_sq;
use wgtrain_kernels::{DType, Gpu, GpuOptions, Out, Tensor};

fn open(dry_run: bool) -> Gpu {
    Gpu::new(&GpuOptions {
        dry_run,
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap()
}

#[test]
fn tensors_are_counted_while_alive_and_the_peak_resets() {
    let gpu = open(false);
    assert_eq!(gpu.memory().live, 0);
    let a = Tensor::zeros(&gpu, &[100, 30], DType::F32).unwrap();
    // An odd count of bf16 elements rounds up to whole words.
    let b = Tensor::zeros(&gpu, &[3, 5], DType::BF16).unwrap();
    assert_eq!((a.device_bytes(), b.device_bytes()), (12000, 32));
    assert_eq!(gpu.memory().live, 12032);
    drop(a);
    let m = gpu.memory();
    assert_eq!((m.live, m.peak), (32, 12032));
    gpu.reset_peak();
    assert_eq!(gpu.memory().peak, 32);
    let c = Tensor::from_f32(&gpu, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(gpu.memory().peak, 48);
    drop((b, c));
    assert_eq!(gpu.memory().live, 0);

    // A tensor split into chunks counts every chunk, each a whole number of BUFFER_ALIGN bytes.
    let split = Gpu::new(&GpuOptions {
        max_binding_bytes: Some(1024),
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap();
    let t = Tensor::zeros(&split, &[37, 130], DType::F32).unwrap();
    assert!(t.chunks().len() > 1);
    assert_eq!(t.chunks().len(), 37);
    assert_eq!(
        split.memory().live,
        37 * (130 * 4u64).next_multiple_of(wgtrain_kernels::tensor::BUFFER_ALIGN)
    );
}

/// lora_backward's temporaries — v = dy·B [M, r], and with dropout the dropped input [M, K] — stay
/// counted until the batch is submitted.
#[test]
fn kept_temporaries_are_counted_until_submit() {
    let gpu = open(false);
    let (m, n, k, r) = (33, 24, 40, 8);
    let f32s = |shape: &[usize]| Tensor::zeros(&gpu, shape, DType::F32).unwrap();
    let (dy, x, u, a, b) = (
        f32s(&[m, n]),
        f32s(&[m, k]),
        f32s(&[m, r]),
        f32s(&[r, k]),
        f32s(&[n, r]),
    );
    let (da, db, dx, w) = (f32s(&[r, k]), f32s(&[n, r]), f32s(&[m, k]), f32s(&[n, k]));
    let norm = f32s(&[1]);
    let live = gpu.memory().live;
    let mut batch = gpu.batch();
    let lora = Lora {
        a: &a,
        b: &b,
        scale: 2.0,
        dropout: None,
    };
    let grads = LoraGrads {
        a: Out::write(&da),
        b: Out::write(&db),
    };
    let input = InputGrad {
        dx: Out::write(&dx),
        frozen: Some(&w),
    };
    lora_backward(&mut batch, &dy, &x, &u, &lora, &grads, Some(input)).unwrap();
    assert_eq!(gpu.memory().live, live + (m * r * 4) as u64);
    // flush submits and releases them too, going on with an empty batch.
    batch.flush();
    assert_eq!(gpu.memory().live, live);
    let dropout = Some(Dropout::new(0.1, 7));
    let lora = Lora { dropout, ..lora };
    lora_backward(&mut batch, &dy, &x, &u, &lora, &grads, Some(input)).unwrap();
    assert_eq!(gpu.memory().live, live + (m * (r + k) * 4) as u64);
    batch.flush();
    assert_eq!(gpu.memory().live, live);
    // grad_norm_sq keeps its partial sums.
    grad_norm_sq(&mut batch, &[&da, &db], &norm).unwrap();
    assert!(gpu.memory().live > live);
    batch.submit();
    assert_eq!(gpu.memory().live, live);
    assert_eq!(gpu.memory().peak, live + (m * (r + k) * 4) as u64);
}

/// A dry run allocates and counts as a real run does, validates launches, and executes nothing:
/// uploads are not written and readbacks are zeros.
#[test]
fn a_dry_run_allocates_and_validates_but_executes_nothing() {
    // (live bytes with the batch recorded, peak, the uploaded values read back, the result).
    let run = |gpu: &Gpu| {
        let g = Tensor::from_f32(gpu, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let out = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
        let mut batch = gpu.batch();
        grad_norm_sq(&mut batch, &[&g], &out).unwrap();
        let recorded = gpu.memory().live;
        batch.submit();
        let bad = Tensor::zeros(gpu, &[2], DType::F32).unwrap();
        let err = grad_norm_sq(&mut gpu.batch(), &[&g], &bad).err().unwrap();
        assert!(err.to_string().contains("expected shape [1]"), "{err}");
        let (values, result) = (g.to_f32(gpu).unwrap(), out.to_f32(gpu).unwrap()[0]);
        (recorded, gpu.memory().peak, values, result)
    };
    let dry_gpu = open(true);
    assert!(dry_gpu.is_dry_run());
    let (real, dry) = (run(&open(false)), run(&dry_gpu));
    assert_eq!((real.0, real.1), (dry.0, dry.1));
    assert_eq!((real.2, real.3), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 91.0));
    assert_eq!((dry.2, dry.3), (vec![0.0; 6], 0.0));
}

#[test]
fn submitted_dispatches_are_counted() {
    for dry_run in [false, true] {
        let gpu = open(dry_run);
        let a = Tensor::from_f32(&gpu, &[2, 3], &[1.0; 6]).unwrap();
        let (b, c) = (
            Tensor::zeros(&gpu, &[2, 3], DType::F32).unwrap(),
            Tensor::zeros(&gpu, &[2, 3], DType::F32).unwrap(),
        );
        let mut batch = gpu.batch();
        add(&mut batch, &a, &a, &b, 1.0, 1.0).unwrap();
        add(&mut batch, &b, &a, &c, 1.0, 1.0).unwrap();
        assert_eq!(gpu.dispatches(), 0, "recorded, not yet submitted");
        batch.submit();
        // A dry run validates its dispatches and drops them: nothing is submitted.
        assert_eq!(gpu.dispatches(), if dry_run { 0 } else { 2 });
    }
}
