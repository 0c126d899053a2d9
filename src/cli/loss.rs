//! `wgtrain loss`: the masked next-token loss of a model (and adapter) over a dataset file, the
//! number transformers computes: mean cross-entropy over every supervised token of the file.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::device::ModelDeviceArgs;
use crate::data::chat::ChatEncoder;
use crate::data::Dataset;
use crate::model::{next_token_targets, Adapter, LossSum, Qwen2, IGNORE};

/// Print the masked mean loss of a model over a dataset as one JSON object.
#[derive(Args, Debug)]
pub struct LossArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory, applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Dataset: sharegpt or messages rows, JSON array or JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Rows are cut to this many tokens.
    #[arg(long, default_value_t = 4096)]
    pub max_len: usize,
    /// Rows per forward pass (padded to the longest).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: ModelDeviceArgs,
}

pub fn run(args: LossArgs) -> Result<i32> {
    ensure!(args.max_len > 0, "--max-len must be positive");
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    ensure!(
        args.model.is_dir(),
        "model directory {} does not exist",
        args.model.display()
    );
    let start = Instant::now();
    let dataset = Dataset::load(&args.data)?;
    let encoder = ChatEncoder::load(&args.model)?;
    let mut rows = Vec::new();
    let (mut skipped, mut truncated) = (0usize, 0usize);
    for row in dataset.rows() {
        let encoded = encoder
            .encode_row(row.conversation(), args.max_len)
            .with_context(|| {
                format!(
                    "{}:{}: row {}",
                    args.data.display(),
                    row.line(),
                    row.index()
                )
            })?;
        truncated += usize::from(encoded.truncated);
        let targets = next_token_targets(&encoded.ids, &encoded.labels_mask);
        if targets.iter().all(|&t| t == IGNORE) {
            skipped += 1;
            continue;
        }
        rows.push((encoded.ids, targets));
    }
    ensure!(
        !rows.is_empty(),
        "{}: no row has a supervised token within --max-len {} ({} rows)",
        args.data.display(),
        args.max_len,
        dataset.len()
    );

    let gpu = args.device.open()?;
    let mut model = Qwen2::load(&gpu, &args.model)?;
    if let Some(dir) = &args.adapter {
        let adapter = Adapter::load(dir, &model.config)?;
        model.apply_adapter(&gpu, &adapter)?;
    }
    let mut total = LossSum::default();
    for chunk in rows.chunks(args.batch_size) {
        let batch: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|(ids, targets)| (ids.as_slice(), targets.as_slice()))
            .collect();
        let part = model.loss_sum(&gpu, &batch)?;
        total.sum += part.sum;
        total.tokens += part.tokens;
    }
    let out = json!({
        "loss": total.sum / total.tokens as f64,
        "tokens": total.tokens,
        "rows": rows.len(),
        "skipped_rows": skipped,
        "truncated_rows": truncated,
        "max_len": args.max_len,
        "model": args.model.display().to_string(),
        "adapter": args.adapter.as_ref().map(|a| a.display().to_string()),
        "data": args.data.display().to_string(),
        "device": gpu.describe(),
        "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{out}");
    Ok(0)
}
