//! wgtrain: supervised fine-tuning of Qwen2.5 models on any GPU through wgpu.
//!
//! Layers, top to bottom (nothing calls up): `cli` → `train`, `eval` → `data` → `model` →
//! `wgtrain_kernels`.
pub mod cli;
pub mod data;
pub mod eval;
pub mod model;
pub mod train;

pub use wgtrain_kernels as kernels;
