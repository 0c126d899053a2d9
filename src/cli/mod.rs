//! Command-line subcommands, one module each; `main.rs` only dispatches.
pub mod device;
pub mod eval;
pub mod generate;
pub mod loss;
pub mod merge;
pub mod perturb;
pub mod signals;
pub mod train;
