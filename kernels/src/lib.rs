//! wgtrain-kernels: the GPU layer of wgtrain.
//!
//! It knows devices, tensors and compute kernels, nothing of Qwen or training:
//! - [`gpu`]: adapter selection, the pipeline cache, the count of device memory
//!   ([`Gpu::memory`]) and dry runs, which allocate but execute nothing;
//! - [`batch`]: [`Batch`], which records dispatches and submits them together;
//! - [`tensor`]: device tensors (f32, bf16 packed two per u32, u32 ids), split across several
//!   buffers when larger than one storage binding;
//! - [`profile`]: the per-kernel profile of `WGTRAIN_PROFILE=1`;
//! - [`bench`]: GPU timing for `cargo bench`, at model shapes the caller names;
//! - [`shader`]: the WGSL sources in `shaders/` and how a kernel variant is assembled from them;
//! - [`ops`]: one module per kernel family, each with typed launchers, a CPU reference (`cpu`) and
//!   the selftest cases `wgtrain selftest` runs.
pub mod batch;
pub mod bench;
pub mod gpu;
pub mod ops;
pub mod plan;
pub mod profile;
pub mod shader;
pub mod tensor;

pub use batch::Batch;
pub use gpu::{Backend, Gpu, GpuOptions, Memory};
pub use ops::Check;
pub use tensor::{DType, Out, Tensor};
