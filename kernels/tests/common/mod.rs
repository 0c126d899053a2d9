//! Helpers shared by the kernel tests (each test binary uses the ones it needs).
#![allow(dead_code)]
use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use wgtrain_kernels::{Check, Gpu, GpuOptions};

/// The default device (`WGTRAIN_*` variables), opened once per test binary so pipelines compile once.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::from_env().expect("a wgpu adapter (CPU-only machine: install mesa-vulkan-drivers)")
    })
}

/// A device whose storage bindings hold at most `bytes`, so every tensor of a test splits into
/// chunks; one per size per test binary.
pub fn split_gpu(bytes: u64) -> &'static Gpu {
    static GPUS: OnceLock<Mutex<HashMap<u64, &'static Gpu>>> = OnceLock::new();
    let mut map = GPUS.get_or_init(Default::default).lock().unwrap();
    map.entry(bytes).or_insert_with(|| {
        let options = GpuOptions {
            max_binding_bytes: Some(bytes),
            ..GpuOptions::from_env().unwrap()
        };
        Box::leak(Box::new(Gpu::new(&options).expect("opening the GPU")))
    })
}

/// A device with `spec` (`family=variant`, as `WGTRAIN_KERNELS` takes it) forced over the
/// adapter's plan and, if given, storage bindings of at most `max_binding_bytes`; an error where
/// the adapter cannot run that variant.
pub fn forced_gpu(spec: &str, max_binding_bytes: Option<u64>) -> anyhow::Result<Gpu> {
    Gpu::new(&GpuOptions {
        kernels: Some(spec.into()),
        max_binding_bytes,
        ..GpuOptions::from_env()?
    })
}

/// The default device and a 1 KiB-binding one: every case runs whole and split.
pub fn gpus() -> [&'static Gpu; 2] {
    [gpu(), split_gpu(1024)]
}

pub fn assert_passed<C: Borrow<Check>>(checks: impl IntoIterator<Item = C>) {
    for c in checks {
        let c = c.borrow();
        assert!(
            c.passed(),
            "{} {}: error {:.3e} > {:.1e}",
            c.kernel,
            c.shape,
            c.max_err,
            c.tolerance
        );
    }
}

/// Central finite differences of `f` with respect to each element of `v` (f64, step `h`): the
/// check that a CPU backward reference is the derivative of its forward reference.
pub fn finite_differences(v: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut point = v.to_vec();
    (0..v.len())
        .map(|i| {
            point[i] = v[i] + h;
            let up = f(&point);
            point[i] = v[i] - h;
            let down = f(&point);
            point[i] = v[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}
