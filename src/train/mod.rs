//! The trainer's model-independent parts: settings (one table of flags and LLaMA-Factory keys),
//! learning-rate schedules, the data order, metrics and progress, checkpoints, data-parallel
//! ranks, and the built-in demo's model and
//! data.
pub mod batching;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod flops;
pub mod llama_factory;
pub mod metrics;
pub mod ranks;
pub mod run_dir;
pub mod schedule;
pub mod settings;
pub mod step;
pub mod trainer;

pub use batching::{BatchSettings, DataOrder, DataPosition, Overlong, RowCounts, Step};
pub use checkpoint::{NamedTensor, RngState, TrainState};
pub use config::TrainConfig;
pub use metrics::{MetricsWriter, Progress, ProgressMode, StepMetrics};
pub use schedule::{Schedule, SchedulerKind, Warmup};
pub use settings::TrainSettings;
