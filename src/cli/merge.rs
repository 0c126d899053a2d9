//! `wgtrain merge`: folds a LoRA adapter into its base model, writing a Hugging Face checkpoint
//! that needs no adapter: W + scale·B·A for every adapted projection, computed on the host in f32
//! from the memory-mapped base weights and rounded back to the base's dtype (bf16 for Qwen2.5);
//! every other tensor is copied byte for byte, and the config, generation and tokenizer files
//! with them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use clap::Args;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::model::params::names;
use crate::model::{Adapter, LoraPair, Qwen2Config, WeightDType, Weights, HF_SIDE_FILES};
use crate::train::checkpoint::write_dir_atomically;

/// Merge a LoRA adapter into its base model and write the result as a Hugging Face checkpoint.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base Hugging Face checkpoint directory the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory (e.g. a `wgtrain train` output or checkpoint).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Directory to write the merged checkpoint into (written atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing model checkpoint in --output.
    #[arg(long)]
    pub overwrite: bool,
    /// Weights larger than this (MiB) are split into shards of at most this size, with
    /// model.safetensors.index.json, as transformers' save_pretrained does.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: u64,
}

/// Refuses to replace anything but an earlier model checkpoint (a directory with config.json),
/// so a mistyped --output cannot delete unrelated files.
fn check_output(args: &MergeArgs) -> Result<()> {
    let output = &args.output;
    for (flag, dir) in [("--model", &args.model), ("--adapter", &args.adapter)] {
        let same = match (output.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        ensure!(
            !same,
            "--output {} is the {flag} directory; write the merged model elsewhere",
            output.display()
        );
    }
    if !output.exists() {
        return Ok(());
    }
    ensure!(
        output.is_dir(),
        "output {} exists and is not a directory",
        output.display()
    );
    let empty = std::fs::read_dir(output)
        .with_context(|| format!("reading {}", output.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(());
    }
    ensure!(
        args.overwrite,
        "output {} already exists; pass --overwrite to replace it",
        output.display()
    );
    ensure!(
        output.join("config.json").is_file(),
        "output {} is not empty and holds no model checkpoint (config.json); refusing to replace \
         it, even with --overwrite",
        output.display()
    );
    Ok(())
}

/// `w` [out, in] += scale · B [out, r] · A [r, in], rows split over the host's cores.
fn add_lora(w: &mut [f32], pair: &LoraPair, r: usize, in_f: usize, scale: f32) {
    let rows = w.len() / in_f;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, chunk) in w.chunks_mut(rows_per * in_f).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(in_f).enumerate() {
                    let o = c * rows_per + i;
                    for k in 0..r {
                        let coef = scale * pair.b[o * r + k];
                        let a = &pair.a[k * in_f..(k + 1) * in_f];
                        for (x, &y) in row.iter_mut().zip(a) {
                            *x += coef * y;
                        }
                    }
                }
            });
        }
    });
}

/// f32 values as little-endian bytes of `dtype` (round to nearest even).
fn encode(values: &[f32], dtype: WeightDType) -> Vec<u8> {
    match dtype {
        WeightDType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        WeightDType::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        WeightDType::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

fn st_dtype(dtype: WeightDType) -> Dtype {
    match dtype {
        WeightDType::BF16 => Dtype::BF16,
        WeightDType::F16 => Dtype::F16,
        WeightDType::F32 => Dtype::F32,
    }
}

/// Tensor names in order, cut into shards of at most `max_bytes` (a larger tensor alone).
fn shards(weights: &Weights, max_bytes: u64) -> Result<Vec<Vec<&str>>> {
    let mut names = weights.names();
    names.sort_unstable();
    let mut shards: Vec<Vec<&str>> = Vec::new();
    let mut size = 0u64;
    for name in names {
        let bytes = weights.get(name)?.bytes.len() as u64;
        if shards.is_empty() || size + bytes > max_bytes && size > 0 {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("a shard was pushed").push(name);
    }
    Ok(shards)
}

/// Writes every shard (merging the adapted weights of one shard at a time, so the host holds at
/// most one shard's merged tensors) and the side files into `dir`.
fn write_merged(
    weights: &Weights,
    merges: &BTreeMap<String, &LoraPair>,
    adapter: &Adapter,
    shards: &[Vec<&str>],
    dir: &Path,
) -> Result<()> {
    let (r, scale) = (adapter.config.r, adapter.config.scale());
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, names) in shards.iter().enumerate() {
        let file = match shards.len() {
            1 => "model.safetensors".to_string(),
            n => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
        };
        let mut merged: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for &name in names {
            if let Some(pair) = merges.get(name) {
                let view = weights.get(name)?;
                let [_, in_f] = view.shape else {
                    return Err(anyhow!(
                        "{}: tensor {name} is not a matrix",
                        view.file.display()
                    ));
                };
                let mut w = view.to_f32();
                add_lora(&mut w, pair, r, *in_f, scale);
                merged.insert(name, encode(&w, view.dtype));
            }
        }
        let views = names
            .iter()
            .map(|&name| {
                let view = weights.get(name)?;
                let bytes = merged.get(name).map_or(view.bytes, Vec::as_slice);
                total += bytes.len();
                weight_map.insert(name.to_string(), json!(file));
                TensorView::new(st_dtype(view.dtype), view.shape.to_vec(), bytes)
                    .map(|v| (name, v))
                    .map_err(|e| anyhow!("{}: tensor {name}: {e}", view.file.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join(&file);
        let metadata = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        crate::data::jsonfile::set_created_mode(&path)?;
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for name in HF_SIDE_FILES {
        let src = weights.dir().join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("copying {} into {}", src.display(), dir.display()))?;
        }
    }
    Ok(())
}

pub fn run(args: MergeArgs) -> Result<i32> {
    ensure!(args.max_shard_mib > 0, "--max-shard-mib must be positive");
    ensure!(
        args.model.is_dir(),
        "model directory {} does not exist",
        args.model.display()
    );
    check_output(&args)?;
    let config = Qwen2Config::load(&args.model)?;
    let weights = Weights::open(&args.model)?;
    weights.validate(&config)?;
    let adapter = Adapter::load(&args.adapter, &config)?;
    let merges: BTreeMap<String, &LoraPair> = adapter
        .modules
        .iter()
        .map(|(&(l, proj), pair)| (names::weight(l, proj), pair))
        .collect();
    let shards = shards(&weights, args.max_shard_mib << 20)?;
    write_dir_atomically(&args.output, |dir| {
        write_merged(&weights, &merges, &adapter, &shards, dir)
    })?;
    let out = json!({
        "output": args.output.display().to_string(),
        "merged_tensors": merges.len(),
        "tensors": weights.names().len(),
        "shards": shards.len(),
        "scale": adapter.config.scale(),
    });
    println!("{out}");
    Ok(0)
}
