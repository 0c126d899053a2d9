//! A checkpoint's safetensors files, memory-mapped and read in place.
//!
//! Each file is mapped with memmap2 and its header parsed and validated by the safetensors crate
//! (`SafeTensors::read_metadata`, the parse `SafeTensors::deserialize` does, kept as owned
//! metadata so no view borrows a local): every tensor's byte range is checked against the file's
//! length before any tensor is read, so a truncated or corrupt file is an error naming it, never a
//! panic or an out-of-bounds read. Tensor bytes are then slices of the mapping: uploading a model
//! never holds a host copy of more than one tensor (and none at all for bf16).
//!
//! A file truncated by another process *after* it was mapped can still fault on access (SIGBUS);
//! no mmap-based loader can guard against that.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use wgtrain_kernels::{DType, Gpu, Tensor};

use super::config::Qwen2Config;
use super::params::qwen2_tensors;

/// Element types wgtrain reads from checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDType {
    BF16,
    F16,
    F32,
}

impl WeightDType {
    pub fn bytes(self) -> usize {
        match self {
            WeightDType::BF16 | WeightDType::F16 => 2,
            WeightDType::F32 => 4,
        }
    }
}

/// One tensor of a checkpoint: its raw little-endian bytes, still in the memory-mapped file.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub name: &'a str,
    pub dtype: WeightDType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// The file it lives in (for error messages).
    pub file: &'a Path,
}

impl WeightView<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of the tensor (the product of all but its last dimension).
    pub fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }

    /// The values as f32 (exact for all three dtypes), read straight from the mapped bytes.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        let width = self.dtype.bytes();
        let dtype = self.dtype;
        self.bytes.chunks_exact(width).map(move |b| match dtype {
            WeightDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WeightDType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            WeightDType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        })
    }

    /// A host copy as f32 (for tests and small tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        self.values().collect()
    }
}

/// The files of a Hugging Face checkpoint besides its weights that a copy of it needs (those
/// present are copied): config, generation defaults, tokenizer and chat template.
pub const HF_SIDE_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Where the tensor data starts: after the 8-byte length and the JSON header.
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only; checkpoints are not modified while training reads them
        // (see the module note on files truncated underneath us).
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
                path.display(),
                mmap.len()
            )
        })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

/// The safetensors of one checkpoint directory.
pub struct Weights {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Weights {
    /// Opens `dir/model.safetensors.index.json` (sharded: every file its `weight_map` names) when it
    /// exists, else `dir/model.safetensors`. All headers are parsed and checked here.
    pub fn open(dir: impl AsRef<Path>) -> Result<Weights> {
        let dir = dir.as_ref();
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            Weights::open_sharded(dir, &index_path)
        } else if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let index = file
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, 0))
                .collect();
            Ok(Weights {
                dir: dir.to_path_buf(),
                files: vec![file],
                index,
            })
        } else {
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json",
                dir.display()
            )
        }
    }

    /// Whether `dir` holds weights for [`Weights::open`] (a config-only directory does not).
    pub fn present(dir: &Path) -> bool {
        dir.join("model.safetensors.index.json").exists() || dir.join("model.safetensors").exists()
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Weights> {
        let text = std::fs::read_to_string(index_path)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        let weight_map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index_path.display()))?;
        // Sorted by file name, so shards are opened (and listed in errors) in order.
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in weight_map {
            // Shards lie beside the index: a path elsewhere is refused, not followed.
            let file = file
                .as_str()
                .filter(|f| Path::new(f).file_name() == Some(f.as_ref()))
                .with_context(|| {
                    format!(
                        "{}: weight_map[{name:?}] = {file} must be a file name in the same \
                         directory",
                        index_path.display()
                    )
                })?;
            by_file.entry(file).or_default().push(name);
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (file_name, names) in by_file {
            let path = dir.join(file_name);
            if !path.exists() {
                bail!(
                    "shard {} listed in {} does not exist (it should hold {} tensors, e.g. {})",
                    path.display(),
                    index_path.display(),
                    names.len(),
                    names[0]
                );
            }
            let file = SafetensorsFile::open(&path)?;
            for name in names {
                if file.metadata.info(name).is_none() {
                    bail!(
                        "{} maps tensor {name} to {}, which does not hold it",
                        index_path.display(),
                        path.display()
                    );
                }
                index.insert(name.to_string(), files.len());
            }
            files.push(file);
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files read, in order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// One tensor; an error names the tensor and the files searched, or an unsupported dtype.
    pub fn get(&self, name: &str) -> Result<WeightView<'_>> {
        let Some((key, &f)) = self.index.get_key_value(name) else {
            let searched: Vec<String> = self.files().map(|p| p.display().to_string()).collect();
            bail!("tensor {name} not found in {}", searched.join(", "));
        };
        let file = &self.files[f];
        let info = file
            .metadata
            .info(name)
            .expect("the index only holds names found in their file's header");
        let dtype = match info.dtype {
            Dtype::BF16 => WeightDType::BF16,
            Dtype::F16 => WeightDType::F16,
            Dtype::F32 => WeightDType::F32,
            other => bail!(
                "tensor {name} in {} has dtype {other:?}; wgtrain reads BF16, F16 and F32",
                file.path.display()
            ),
        };
        let (start, end) = info.data_offsets;
        Ok(WeightView {
            name: key,
            dtype,
            shape: &info.shape,
            // In bounds: read_metadata checked every range against the file's length.
            bytes: &file.mmap[file.data_start + start..file.data_start + end],
            file: &file.path,
        })
    }

    /// A tensor that must have `shape`; the error names the tensor, the expected and the found
    /// shape and dtype.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<WeightView<'_>> {
        let view = self.get(name)?;
        if view.shape != shape {
            bail!(
                "tensor {name} in {}: expected shape {shape:?}, found {:?} ({:?})",
                view.file.display(),
                view.shape,
                view.dtype
            );
        }
        Ok(view)
    }

    /// Checks every tensor of `config`'s Qwen2 model up front (presence, shape, dtype), reporting
    /// all problems at once. Extra tensors (e.g. a tied model's redundant lm_head) are ignored.
    pub fn validate(&self, config: &Qwen2Config) -> Result<()> {
        let problems: Vec<String> = qwen2_tensors(config)
            .iter()
            .filter_map(|spec| self.expect(&spec.name, &spec.shape).err())
            .map(|e| format!("{e:#}"))
            .collect();
        match problems.len() {
            0 => Ok(()),
            n => {
                const SHOWN: usize = 8;
                let mut msg = format!(
                    "checkpoint {} does not match its config ({n} problem{}):",
                    self.dir.display(),
                    if n == 1 { "" } else { "s" }
                );
                for p in problems.iter().take(SHOWN) {
                    msg.push_str("\n  ");
                    msg.push_str(p);
                }
                if n > SHOWN {
                    msg.push_str(&format!("\n  ... and {} more", n - SHOWN));
                }
                Err(anyhow!(msg))
            }
        }
    }
}

/// Uploads one checkpoint tensor as `target` (BF16 or F32).
///
/// bf16 → BF16 and f32 → F32 go straight from the mapped file to the device. Anything else is
/// converted on the host, one tensor at a time: widening (bf16/f16 → f32) is exact; narrowing to
/// bf16 (f16 or f32 → BF16) rounds to nearest even, and f16's 10-bit mantissa loses 3 bits.
/// The forward pass is expected to keep matrices BF16 (as the design stores frozen weights) and
/// may ask for F32 for the small 1-D norm and bias vectors, which then stay exact from f16.
pub fn to_device(gpu: &Gpu, view: &WeightView<'_>, target: DType) -> Result<Tensor> {
    let tensor = Tensor::zeros(gpu, view.shape, target)
        .with_context(|| format!("allocating tensor {} of {}", view.name, view.file.display()))?;
    write_to_device(gpu, view, &tensor)?;
    Ok(tensor)
}

/// Overwrites `tensor` (of the view's shape, BF16 or F32) with one checkpoint tensor, converted
/// as [`to_device`] does; queued as [`Tensor::write_bytes`] is.
pub fn write_to_device(gpu: &Gpu, view: &WeightView<'_>, tensor: &Tensor) -> Result<()> {
    ensure!(
        tensor.shape() == view.shape,
        "tensor {} in {} has shape {:?}; the device tensor is {:?}",
        view.name,
        view.file.display(),
        view.shape,
        tensor.shape()
    );
    let bytes = device_rows(view, 0..view.rows(), tensor.dtype())?;
    tensor.write_bytes(gpu, &bytes).with_context(|| {
        format!(
            "uploading tensor {} from {}",
            view.name,
            view.file.display()
        )
    })
}

/// Rows `rows` of a checkpoint tensor as the device holds them in `target` (BF16 or F32),
/// converted as [`to_device`] does: bf16 → BF16 and f32 → F32 are the mapped bytes themselves
/// (no copy), anything else is converted on the host. What paging uploads: a vocabulary chunk
/// of the LM head, the embedding rows of a micro-batch.
pub fn device_rows<'a>(
    view: &WeightView<'a>,
    rows: Range<usize>,
    target: DType,
) -> Result<Cow<'a, [u8]>> {
    let row_len = view.shape.last().copied().unwrap_or(1);
    ensure!(
        rows.start <= rows.end && rows.end <= view.rows(),
        "rows {rows:?} of tensor {} in {}: it has {} rows",
        view.name,
        view.file.display(),
        view.rows()
    );
    let width = view.dtype.bytes();
    let part = WeightView {
        bytes: &view.bytes[rows.start * row_len * width..rows.end * row_len * width],
        ..*view
    };
    Ok(match (view.dtype, target) {
        (WeightDType::BF16, DType::BF16) | (WeightDType::F32, DType::F32) => {
            Cow::Borrowed(part.bytes)
        }
        (_, DType::F32) => Cow::Owned(part.values().flat_map(f32::to_le_bytes).collect()),
        (_, DType::BF16) => Cow::Owned(
            part.values()
                .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        (_, DType::U32) => bail!(
            "tensor {} cannot be uploaded as U32 (weights are BF16 or F32)",
            view.name
        ),
    })
}
