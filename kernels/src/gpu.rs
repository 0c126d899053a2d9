//! Adapter selection, the device, the pipeline cache, the count of device memory and readback.
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};

use crate::plan::KernelPlan;
use crate::profile::Profile;
use crate::shader::Kernel;

/// Which graphics API to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Backend::Auto,
            "vulkan" | "vk" => Backend::Vulkan,
            "metal" | "mtl" => Backend::Metal,
            "dx12" | "d3d12" => Backend::Dx12,
            "gl" | "gles" | "opengl" => Backend::Gl,
            other => bail!("unknown backend '{other}': expected auto, vulkan, metal, dx12 or gl"),
        })
    }
}

impl Backend {
    fn backends(self) -> wgpu::Backends {
        match self {
            Backend::Auto => wgpu::Backends::all(),
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
            Backend::Gl => wgpu::Backends::GL,
        }
    }
}

/// How to pick and configure the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub backend: Backend,
    /// Adapter index (as listed by `wgtrain devices`) or a case-insensitive substring of its name.
    pub device: Option<String>,
    /// Split tensors at this many bytes instead of the adapter's `max_storage_buffer_binding_size`
    /// (tests use a tiny value so that every kernel runs on split tensors).
    pub max_binding_bytes: Option<u64>,
    /// Allocate every tensor but execute nothing: dispatches are validated and dropped, uploads
    /// and clears skipped, readbacks return zeros. [`Gpu::memory`] then tells what a workload
    /// needs without running it (e.g. `wgtrain train --dry-run`).
    pub dry_run: bool,
    /// Kernel variants forced over the adapter's plan, `family=variant,...` (see [`KernelPlan`]).
    pub kernels: Option<String>,
    /// The device memory a model may plan with (`--device-memory`): None, everything resident.
    pub device_memory: Option<u64>,
    /// Time every dispatch on its own and print the per-kernel table when the device is dropped
    /// ([`Profile`], `WGTRAIN_PROFILE=1`).
    pub profile: bool,
}

impl GpuOptions {
    /// Options from `WGTRAIN_BACKEND`, `WGTRAIN_DEVICE`, `WGTRAIN_MAX_BINDING` (bytes),
    /// `WGTRAIN_KERNELS` and `WGTRAIN_PROFILE`.
    pub fn from_env() -> Result<Self> {
        let backend = match std::env::var("WGTRAIN_BACKEND") {
            Ok(b) => b.parse().context("WGTRAIN_BACKEND")?,
            Err(_) => Backend::Auto,
        };
        let max_binding_bytes = match std::env::var("WGTRAIN_MAX_BINDING") {
            Ok(v) => Some(
                v.parse()
                    .with_context(|| format!("WGTRAIN_MAX_BINDING='{v}' is not a byte count"))?,
            ),
            Err(_) => None,
        };
        Ok(GpuOptions {
            backend,
            device: std::env::var("WGTRAIN_DEVICE").ok(),
            max_binding_bytes,
            dry_run: false,
            kernels: std::env::var("WGTRAIN_KERNELS").ok(),
            device_memory: None,
            profile: Profile::from_env()?,
        })
    }
}

/// Optional features wgtrain uses when an adapter has them; none is required.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY);

const NO_ADAPTER_HELP: &str = "no GPU adapter found. Install your GPU's Vulkan/Metal/DX12 driver, \
or for a CPU-only machine Mesa's software Vulkan driver (Debian/Ubuntu: \
`apt-get install mesa-vulkan-drivers`); `wgtrain devices` lists what wgpu can see";

/// What `wgtrain devices` prints for one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
}

/// The adapters `--backend` chooses from, in `--device` numbering: for `auto` the native APIs,
/// or GL when none has an adapter (probing EGL is slow and noisy).
fn candidate_adapters(backend: Backend) -> Vec<wgpu::Adapter> {
    match backend {
        Backend::Auto => Some(adapters(wgpu::Backends::PRIMARY))
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| adapters(wgpu::Backends::GL)),
        b => adapters(b.backends()),
    }
}

/// Mesa's Wayland probe prints "error: XDG_RUNTIME_DIR is invalid or not set" to stderr when
/// the variable is unset (headless machines, containers, CI), though no display is wanted.
/// Points it at a private (0700) directory of this user under the temporary directory instead;
/// real driver errors still print.
fn give_mesa_a_runtime_dir() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| !d.is_empty()) {
            return;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            let dir = std::env::temp_dir().join(format!("wgtrain-runtime-{uid}"));
            let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
            // Only a directory of this user that no one else can enter (not one planted there).
            let private = std::fs::symlink_metadata(&dir)
                .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o077 == 0);
            if private {
                // Before the first wgpu instance, under the Once: no other thread of ours reads
                // the environment through the drivers yet.
                std::env::set_var("XDG_RUNTIME_DIR", dir);
            }
        }
    });
}

fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    give_mesa_a_runtime_dir();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut list = pollster::block_on(instance.enumerate_adapters(backends));
    // A stable order: real GPUs first, then by backend and name.
    list.sort_by_key(|a| {
        let info = a.get_info();
        (
            rank(&info),
            format!("{:?}", info.backend),
            info.name.clone(),
        )
    });
    list
}

/// Lower is preferred: discrete GPUs, then integrated, then virtual, then CPU; GL last.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    (kind, u8::from(info.backend == wgpu::Backend::Gl))
}

/// The adapters `--backend` chooses from, numbered as `--device N` numbers them.
pub fn list_adapters(backend: Backend) -> Vec<AdapterSummary> {
    candidate_adapters(backend)
        .into_iter()
        .enumerate()
        .map(|(index, a)| AdapterSummary {
            index,
            info: a.get_info(),
            features: a.features(),
            limits: a.limits(),
        })
        .collect()
}

/// A compiled kernel variant and the layout of its bindings.
pub(crate) struct Pipeline {
    /// The shader file and entry point, which [`Gpu::dispatches_by_kernel`] counts by.
    pub(crate) name: (&'static str, &'static str),
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    /// Binding numbers of the storage buffers the entry point uses, ascending (0 is the params).
    pub(crate) storage_bindings: Vec<u32>,
    /// The entry point's `@workgroup_size`, read from the WGSL.
    pub(crate) workgroup_size: [u32; 3],
    /// The variant, as [`Kernel::describe`] names it (for the profile).
    pub(crate) variant: String,
}

/// Device bytes held by tensors: now, and the most at once since the last [`Gpu::reset_peak`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub live: u64,
    pub peak: u64,
}

/// Counts the device bytes of every [`crate::Tensor`] (including those a [`crate::Batch`] keeps until it
/// is submitted). Not counted: each batch's uniform parameter buffer (256 bytes per dispatch),
/// readback staging buffers and timestamp queries, which live only while a batch is encoded or a
/// tensor is read back. Shared (`Arc`) so that a tensor releases its bytes when dropped.
#[derive(Debug, Default)]
struct MemoryCounter {
    live: AtomicU64,
    peak: AtomicU64,
}

/// Bytes counted as live until this is dropped.
#[derive(Debug)]
pub(crate) struct Allocation {
    bytes: u64,
    counter: Arc<MemoryCounter>,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The device, its queue, and the compiled pipelines.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// Largest byte size of one tensor chunk (one storage binding).
    pub max_binding_bytes: u64,
    /// The kernel variant each family runs here.
    pub plan: KernelPlan,
    dry_run: bool,
    device_memory: Option<u64>,
    memory: Arc<MemoryCounter>,
    /// Dispatches submitted so far by kernel, `file:entry` (see [`Gpu::dispatches`]).
    pub(crate) dispatches: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// The per-kernel profile, when [`GpuOptions::profile`] asked for one.
    pub profile: Option<Profile>,
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
}

/// Bytes reserved per dispatch for its uniform parameters (the largest params struct must fit).
pub(crate) const PARAMS_SLOT: u64 = 256;

impl Gpu {
    /// Opens the adapter chosen by `options`, with its own limits and the optional features it has.
    pub fn new(options: &GpuOptions) -> Result<Gpu> {
        let list = candidate_adapters(options.backend);
        if list.is_empty() {
            bail!("{NO_ADAPTER_HELP} (backend: {:?})", options.backend);
        }
        let adapter = match &options.device {
            None => list.into_iter().next().unwrap(),
            Some(sel) => pick(list, sel)?,
        };
        let info = adapter.get_info();
        let features = adapter.features() & OPTIONAL_FEATURES;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgtrain"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .with_context(|| format!("opening device '{}' ({:?})", info.name, info.backend))?;
        let mut max_binding_bytes = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(cap) = options.max_binding_bytes {
            if cap < 1024 || cap % 4 != 0 {
                bail!("max binding size {cap} must be a multiple of 4 and at least 1024 bytes");
            }
            max_binding_bytes = max_binding_bytes.min(cap);
        }
        let plan = KernelPlan::for_adapter(&info, features, options.kernels.as_deref())?;
        Ok(Gpu {
            device,
            queue,
            info,
            features,
            limits,
            max_binding_bytes,
            plan,
            dry_run: options.dry_run,
            device_memory: options.device_memory,
            memory: Arc::default(),
            dispatches: Mutex::default(),
            profile: options.profile.then(Profile::default),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// The device from `WGTRAIN_*` environment variables (what tests and benches use).
    pub fn from_env() -> Result<Gpu> {
        Gpu::new(&GpuOptions::from_env()?)
    }

    /// A CPU adapter (e.g. lavapipe): benchmarks size themselves down there.
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Opened with [`GpuOptions::dry_run`]: nothing executes.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The device memory budget a model plans with ([`GpuOptions::device_memory`]).
    pub fn device_memory(&self) -> Option<u64> {
        self.device_memory
    }

    /// Device bytes of the tensors alive now, and the peak since the last [`Gpu::reset_peak`].
    pub fn memory(&self) -> Memory {
        Memory {
            live: self.memory.live.load(Ordering::Relaxed),
            peak: self.memory.peak.load(Ordering::Relaxed),
        }
    }

    /// Kernel dispatches submitted on this device so far: the launches a workload costs, which
    /// bound the small kernels on CPU adapters (each one is a thread-pool round trip there).
    pub fn dispatches(&self) -> u64 {
        self.dispatches.lock().unwrap().values().sum()
    }

    /// [`Gpu::dispatches`] by kernel (`shader file:entry point`), most launched first: where
    /// fusion would save launches.
    pub fn dispatches_by_kernel(&self) -> Vec<(String, u64)> {
        let counts = self.dispatches.lock().unwrap();
        let mut list: Vec<(String, u64)> = counts
            .iter()
            .map(|((file, entry), &n)| (format!("{file}:{entry}"), n))
            .collect();
        list.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        list
    }

    /// Starts a new peak from what is alive now (e.g. at the start of a training step).
    pub fn reset_peak(&self) {
        let live = self.memory.live.load(Ordering::Relaxed);
        self.memory.peak.store(live, Ordering::Relaxed);
    }

    /// Counts `bytes` as live until the returned allocation is dropped.
    pub(crate) fn allocate(&self, bytes: u64) -> Allocation {
        let live = self.memory.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.memory.peak.fetch_max(live, Ordering::Relaxed);
        Allocation {
            bytes,
            counter: self.memory.clone(),
        }
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// One line naming the device and its kernel plan, for logs and reports.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {}; kernels {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            self.plan.describe()
        )
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        Ok(())
    }

    pub(crate) fn pipeline(&self, kernel: &Kernel) -> Result<Arc<Pipeline>> {
        let key = kernel.key();
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source();
        let (storage, workgroup_size) = reflect(&source, kernel)?;
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&key),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        for &(binding, read_only) in &storage {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&key),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&key),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    // Every kernel writes workgroup memory before reading it; the zero-fill is costly
                    // (and compiles for seconds on llvmpipe's GL).
                    zero_initialize_workgroup_memory: false,
                    ..Default::default()
                },
                cache: None,
            });
        let storage_bindings = storage.iter().map(|&(b, _)| b).collect();
        let p = Arc::new(Pipeline {
            name: (kernel.shader.file, kernel.entry),
            pipeline,
            layout,
            storage_bindings,
            workgroup_size,
            variant: kernel.describe(),
        });
        self.pipelines.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }
}

impl Drop for Gpu {
    /// Prints the profile, if one was taken: the end of the run that used this device (or what
    /// came after its last report).
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            eprintln!("{}", profile.report());
        }
    }
}

fn pick(list: Vec<wgpu::Adapter>, sel: &str) -> Result<wgpu::Adapter> {
    let names: Vec<String> = list
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{i}: {}", a.get_info().name))
        .collect();
    if let Ok(index) = sel.parse::<usize>() {
        let n = list.len();
        return list.into_iter().nth(index).ok_or_else(|| {
            anyhow!(
                "device {index} does not exist ({n} adapters: {})",
                names.join(", ")
            )
        });
    }
    let needle = sel.to_ascii_lowercase();
    list.into_iter()
        .find(|a| a.get_info().name.to_ascii_lowercase().contains(&needle))
        .ok_or_else(|| {
            anyhow!(
                "no adapter name contains '{sel}' (adapters: {})",
                names.join(", ")
            )
        })
}

/// A storage binding's number and whether it is read-only.
type StorageBinding = (u32, bool);

/// Validates the WGSL with naga and returns the storage bindings of group 0 that the entry point
/// uses, ascending, each with whether it is read-only, and the entry point's workgroup size.
/// Layouts and workgroup sizes follow from the source, so launchers never restate them.
fn reflect(source: &str, kernel: &Kernel) -> Result<(Vec<StorageBinding>, [u32; 3])> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        anyhow!(
            "shaders/{} does not parse: {}",
            kernel.shader.file,
            e.emit_to_string(source)
        )
    })?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| {
        anyhow!(
            "shaders/{} is invalid: {}",
            kernel.shader.file,
            e.emit_to_string(source)
        )
    })?;
    let ep_index = module
        .entry_points
        .iter()
        .position(|ep| ep.name == kernel.entry)
        .ok_or_else(|| {
            anyhow!(
                "shaders/{} has no entry point {}",
                kernel.shader.file,
                kernel.entry
            )
        })?;
    let usage = info.get_entry_point(ep_index);
    let mut bindings = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        let (Some(binding), false) = (&var.binding, usage[handle].is_empty()) else {
            continue;
        };
        if let naga::AddressSpace::Storage { access } = var.space {
            bindings.push((
                binding.binding,
                !access.contains(naga::StorageAccess::STORE),
            ));
        }
    }
    bindings.sort();
    Ok((bindings, module.entry_points[ep_index].workgroup_size))
}

/// Splits `n` workgroups over x and y so that neither exceeds the per-dimension limit; shaders
/// recover the linear index with `linear_group` from common.wgsl and skip indices >= n.
pub fn linear_groups(gpu: &Gpu, n: u32) -> [u32; 3] {
    let max = gpu.limits.max_compute_workgroups_per_dimension.max(1);
    if n <= max {
        [n, 1, 1]
    } else {
        [max, n.div_ceil(max), 1]
    }
}

/// The grid of a row-wise kernel over `rows` rows: a workgroup per row, or per
/// `rows_per_group` rows as the plan's `rowwise` variant says (the kernels' `ROWS_PER_GROUP`).
pub fn rowwise_groups(gpu: &Gpu, rows: usize) -> [u32; 3] {
    linear_groups(
        gpu,
        (rows as u32).div_ceil(gpu.plan.rowwise.rows_per_group()),
    )
}

/// Copies `size` bytes at `offset` out of a buffer (blocking); zeros in a dry run.
pub(crate) fn read_buffer(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
) -> Result<Vec<u8>> {
    if gpu.is_dry_run() {
        return Ok(vec![0; size as usize]);
    }
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    gpu.queue.submit([encoder.finish()]);
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?;
    rx.recv()
        .map_err(|_| anyhow!("readback callback dropped"))?
        .map_err(|e| anyhow!("mapping a buffer for readback: {e}"))?;
    let data = slice
        .get_mapped_range()
        .map_err(|e| anyhow!("reading a mapped buffer: {e}"))?
        .to_vec();
    staging.unmap();
    Ok(data)
}
