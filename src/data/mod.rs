//! Datasets users already have (sharegpt / messages JSON and JSONL) and the paper's perturbations.
pub mod chat;
pub mod dataset;
pub mod jsonfile;
pub mod perturb;

pub use dataset::{Conversation, Dataset, Message, Role, Row, Schema};
pub use jsonfile::FileFormat;
