//! `wgtrain devices` and `wgtrain selftest`.
use anyhow::Result;
use clap::Args;
use wgtrain_kernels::gpu::{list_adapters, OPTIONAL_FEATURES};
use wgtrain_kernels::plan::KernelPlan;
use wgtrain_kernels::{ops, Backend, Gpu, GpuOptions};

use crate::model::parse_size;

/// Where to run: shared by every subcommand that uses the GPU.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Graphics API: auto, vulkan, metal, dx12 or gl.
    #[arg(long, env = "WGTRAIN_BACKEND", default_value = "auto")]
    pub backend: Backend,
    /// Adapter index (see `wgtrain devices`) or part of its name.
    #[arg(long, env = "WGTRAIN_DEVICE")]
    pub device: Option<String>,
}

impl DeviceArgs {
    /// The options these flags (and the `WGTRAIN_*` variables) give.
    pub fn options(&self) -> Result<GpuOptions> {
        let mut options = GpuOptions::from_env()?;
        options.backend = self.backend;
        options.device = self.device.clone();
        Ok(options)
    }

    pub fn open(&self) -> Result<Gpu> {
        Gpu::new(&self.options()?)
    }
}

/// Where to run a model: the device and the memory the model may take on it.
#[derive(Args, Clone, Debug)]
pub struct ModelDeviceArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Device memory the model may use, e.g. 24GiB, 512MiB or 16GB (default: no limit, every
    /// weight resident). Frozen decoder layers that do not fit stream from the memory-mapped
    /// checkpoint through a ring of device slots; a budget that cannot be met is refused with
    /// the size that would fit. Training plans for its largest micro-batch; loss, generate and
    /// eval plan for the weights (their activations and KV cache come on top).
    #[arg(long, env = "WGTRAIN_DEVICE_MEMORY", value_parser = parse_size)]
    pub device_memory: Option<u64>,
}

impl ModelDeviceArgs {
    pub fn options(&self) -> Result<GpuOptions> {
        let mut options = self.device.options()?;
        options.device_memory = self.device_memory;
        Ok(options)
    }

    pub fn open(&self) -> Result<Gpu> {
        Gpu::new(&self.options()?)
    }
}

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Graphics API to list: auto (what `--backend auto` picks from: the native APIs, or GL when
    /// they have no adapter), vulkan, metal, dx12 or gl. The numbers are `--device N`'s.
    #[arg(long, env = "WGTRAIN_BACKEND", default_value = "auto")]
    pub backend: Backend,
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

pub fn devices(args: DevicesArgs) -> Result<i32> {
    let list = list_adapters(args.backend);
    if list.is_empty() {
        // Gpu::new carries the advice on how to get an adapter.
        Gpu::new(&GpuOptions {
            backend: args.backend,
            ..Default::default()
        })?;
    }
    for a in list {
        let l = &a.limits;
        println!("[{}] {}", a.index, a.info.name);
        println!(
            "    backend {:?}, type {:?}, driver {} {}",
            a.info.backend, a.info.device_type, a.info.driver, a.info.driver_info
        );
        let features: Vec<String> = (a.features & OPTIONAL_FEATURES)
            .iter_names()
            .map(|(name, _)| name.to_string())
            .collect();
        println!(
            "    features: {}; subgroup sizes {}..={}",
            if features.is_empty() {
                "none of the optional ones".into()
            } else {
                features.join(", ")
            },
            a.info.subgroup_min_size,
            a.info.subgroup_max_size
        );
        let forced = std::env::var("WGTRAIN_KERNELS").ok();
        let features = a.features & OPTIONAL_FEATURES;
        match KernelPlan::for_adapter(&a.info, features, forced.as_deref()) {
            Ok(plan) => println!("    kernels: {}", plan.describe()),
            Err(e) => println!("    kernels: {e:#}"),
        }
        println!(
            "    max storage binding {}, max buffer {}, workgroup storage {} KiB, invocations/workgroup {}, storage buffers/stage {}",
            mib(l.max_storage_buffer_binding_size),
            mib(l.max_buffer_size),
            l.max_compute_workgroup_storage_size / 1024,
            l.max_compute_invocations_per_workgroup,
            l.max_storage_buffers_per_shader_stage,
        );
    }
    Ok(0)
}

pub fn selftest(args: SelftestArgs) -> Result<i32> {
    let gpu = args.device.open()?;
    println!("device: {}", gpu.describe());
    let checks = ops::selftest(&gpu)?;
    println!(
        "{:<28} {:<28} {:>11} {:>9}  result",
        "kernel", "shape", "max error", "tolerance"
    );
    let mut failed = 0;
    for c in &checks {
        let ok = c.passed();
        failed += usize::from(!ok);
        println!(
            "{:<28} {:<28} {:>11.3e} {:>9.0e}  {}",
            c.kernel,
            c.shape,
            c.max_err,
            c.tolerance,
            if ok { "pass" } else { "FAIL" }
        );
    }
    println!("{} passed, {} failed", checks.len() - failed, failed);
    Ok(i32::from(failed > 0))
}
