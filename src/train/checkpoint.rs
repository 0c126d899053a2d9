//! Run directories and checkpoints.
//!
//! A checkpoint is a directory (`checkpoint-<step>` in the output directory) written atomically:
//! everything goes into `<name>.tmp-<pid>` beside it, every file is fsynced, then the directory
//! is renamed to its final name. A checkpoint under its final name is therefore always complete;
//! an interrupted write leaves only a `.tmp-` directory, which `latest_checkpoint` ignores and the
//! next write of the same name removes. Replacing an existing checkpoint of the same name renames
//! the old one to `<name>.old-<pid>` only once the new one is complete, then removes it.
//!
//! Inside: `train_state.json` (`TrainState`), optimizer state as named f32 tensors in safetensors
//! (`save_f32_tensors`), and whatever the model side writes (a PEFT adapter or weights).
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::batching::{DataPosition, Fnv};
use super::run_dir::run_entries;

/// Marks a directory as a wgtrain run (its content: the run's settings), so `--overwrite` only ever
/// deletes what wgtrain wrote.
pub const RUN_MARKER: &str = "wgtrain_run.json";
pub const STATE_FILE: &str = "train_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// Whether `dir` can take a run, touching nothing; true when an earlier run in `dir` is to be
/// replaced (`overwrite`).
///
/// - missing or empty (but for a lock file): fine;
/// - a wgtrain run (has the marker): an error unless `overwrite` (the earlier run is replaced) or
///   `resuming` (which continues in it);
/// - anything else that is not empty: always an error, so no flag can delete a directory wgtrain
///   did not create.
pub fn check_output_dir(dir: &Path, overwrite: bool, resuming: bool) -> Result<bool> {
    let non_empty = dir.is_dir() && !run_entries(dir)?.is_empty();
    if dir.exists() && !dir.is_dir() {
        bail!("output {} exists and is not a directory", dir.display());
    }
    if non_empty {
        if !dir.join(RUN_MARKER).is_file() {
            bail!(
                "output directory {} is not empty and holds no wgtrain run ({RUN_MARKER}); \
                 choose another --output",
                dir.display()
            );
        }
        if !resuming {
            if !overwrite {
                bail!(
                    "output directory {} already holds a run; pass --overwrite to replace it or \
                     --resume to continue it",
                    dir.display()
                );
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Where the checkpoint after `step` optimizer steps goes.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// The complete checkpoints in `output` (those holding a train state), by step.
pub fn checkpoints(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(output) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", output.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", output.display()))?;
        let name = entry.file_name();
        let step = name
            .to_str()
            .and_then(|n| n.strip_prefix(CHECKPOINT_PREFIX))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step {
            if entry.path().join(STATE_FILE).is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The complete checkpoint with the most steps in `output`, if any.
pub fn latest_checkpoint(output: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(checkpoints(output)?.pop())
}

/// Deletes all but the `keep` most recent checkpoints (transformers' `save_total_limit`). Each is
/// renamed aside before its files go, so a crash midway cannot leave a checkpoint that looks
/// complete but is not.
pub fn remove_old_checkpoints(output: &Path, keep: usize) -> Result<()> {
    let all = checkpoints(output)?;
    for (_, dir) in &all[..all.len().saturating_sub(keep)] {
        let doomed = sibling(dir, "removing")?;
        std::fs::rename(dir, &doomed)
            .with_context(|| format!("removing the old checkpoint {}", dir.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("removing {}", doomed.display()))?;
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable directory name", dir.display()))?;
    Ok(dir.with_file_name(format!("{name}.{suffix}-{}", std::process::id())))
}

/// fsyncs every file under `dir`, and the directories themselves, so a rename publishes data that
/// is on disk.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    sync_dir(dir)
}

/// fsync of a directory (its entries); Windows cannot open directories as files, and NTFS
/// journals renames, so there it is skipped.
fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(unix) {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}

/// Creates the directory `dir` by letting `fill` write into a temporary sibling, then renaming it
/// into place. If `fill` fails, the temporary directory is removed and an existing `dir` is left
/// as it was.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = fill(&tmp).and_then(|()| sync_tree(&tmp));
    if let Err(err) = written {
        // The error that matters is fill's; a failed cleanup leaves a .tmp- directory only.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err.context(format!("writing {}", dir.display())));
    }
    let old = sibling(dir, "old")?;
    let replacing = dir.exists();
    if replacing {
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if replacing {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing the replaced {}", old.display()))?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// A ChaCha8 generator's exact position, to continue its stream after a resume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// 32-bit words consumed (u128, kept as a decimal string: JSON numbers stop at 2^53 in many
    /// readers).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> RngState {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        ensure!(
            self.seed.len() == 64 && self.seed.is_ascii(),
            "rng seed must be 64 hex digits"
        );
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .context("rng seed must be 64 hex digits")?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .context("rng word_pos must be a decimal integer")?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Everything besides tensors that a resumed run needs to take the same steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Where the data stream continues.
    pub data_position: DataPosition,
    /// The scheduler's step (equal to `step` unless a schedule is changed by hand).
    pub scheduler_step: usize,
    /// The training RNG (e.g. LoRA dropout) at the checkpoint.
    pub rng: RngState,
    /// `DataOrder::fingerprint()` of the rows trained on.
    pub data_fingerprint: String,
    /// `config_hash(&config)`.
    pub config_hash: String,
    /// The settings that determine the sequence of steps (`TrainConfig::resume_summary()`).
    pub config: serde_json::Value,
    /// Run time so far, so that elapsed seconds continue across a resume.
    pub elapsed_s: f64,
    pub tokens_seen: u64,
}

pub const STATE_FORMAT_VERSION: u32 = 1;

/// A stable hash of a settings summary (serde_json keeps keys in insertion order; summaries are
/// built in a fixed order).
pub fn config_hash(config: &serde_json::Value) -> String {
    let mut hash = Fnv::default();
    hash.write(config.to_string().as_bytes());
    format!("{:016x}", hash.0)
}

impl TrainState {
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(dir: &Path) -> Result<TrainState> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a wgtrain checkpoint?)",
                path.display(),
                dir.display()
            )
        })?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}:{}: {e}", path.display(), e.line()))?;
        ensure!(
            state.format_version == STATE_FORMAT_VERSION,
            "{}: format_version {} is not supported (this wgtrain writes {STATE_FORMAT_VERSION})",
            path.display(),
            state.format_version
        );
        Ok(state)
    }

    /// Refuses to resume under settings that would change the steps, naming what differs.
    pub fn check_config(&self, current: &serde_json::Value) -> Result<()> {
        if config_hash(current) == self.config_hash {
            return Ok(());
        }
        let empty = serde_json::Map::new();
        let (saved, now) = (
            self.config.as_object().unwrap_or(&empty),
            current.as_object().unwrap_or(&empty),
        );
        let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        let differences: Vec<String> = keys
            .into_iter()
            .filter(|k| saved.get(*k) != now.get(*k))
            .map(|k| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or("(unset)".to_string(), |v| v.to_string())
                };
                format!(
                    "{k}: checkpoint {} vs now {}",
                    show(saved.get(k)),
                    show(now.get(k))
                )
            })
            .collect();
        bail!(
            "the checkpoint was made with other settings, so resuming would not continue the same \
             run: {}",
            if differences.is_empty() {
                "(summary format differs)".to_string()
            } else {
                differences.join("; ")
            }
        )
    }
}

/// A named host tensor (e.g. AdamW's `exp_avg` of one parameter).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` as F32 safetensors (little-endian, as the format requires).
pub fn save_f32_tensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            ensure!(
                t.shape.iter().product::<usize>() == t.data.len(),
                "tensor {}: shape {:?} does not hold {} values",
                t.name,
                t.shape,
                t.data.len()
            );
            Ok(t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect::<Result<_>>()?;
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            Ok((
                t.name.as_str(),
                TensorView::new(Dtype::F32, t.shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("preparing {}: {e}", path.display()))?;
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    crate::data::jsonfile::set_created_mode(path)
}

/// Reads every tensor of an F32 safetensors file, sorted by name.
pub fn load_f32_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            ensure!(
                view.dtype() == Dtype::F32,
                "{}: tensor {name} is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(NamedTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::RngCore;
    use serde_json::json;

    fn state(step: usize) -> TrainState {
        let config = json!({"lr": 1e-4, "batch_size": 1});
        TrainState {
            format_version: STATE_FORMAT_VERSION,
            step,
            total_steps: 100,
            epoch: 0.5,
            data_position: DataPosition {
                epoch: 0,
                micro_batch: 3 * step,
                step,
            },
            scheduler_step: step,
            rng: RngState::capture(&ChaCha8Rng::seed_from_u64(1)),
            data_fingerprint: "10 rows".into(),
            config_hash: config_hash(&config),
            config,
            elapsed_s: 12.5,
            tokens_seen: 4096,
        }
    }

    #[test]
    fn a_failed_write_leaves_the_old_checkpoint_and_no_partial() {
        let out = tempfile::tempdir().unwrap();
        let dir = checkpoint_dir(out.path(), 10);
        write_dir_atomically(&dir, |tmp| state(10).save(tmp)).unwrap();
        let err = write_dir_atomically(&dir, |tmp| {
            std::fs::write(tmp.join(STATE_FILE), "{half")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"));
        assert_eq!(TrainState::load(&dir).unwrap(), state(10));
        let names: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["checkpoint-10"]);

        // A failure while writing a new name leaves nothing under that name.
        let new = checkpoint_dir(out.path(), 20);
        assert!(write_dir_atomically(&new, |_| bail!("interrupted")).is_err());
        assert!(!new.exists());
        assert_eq!(latest_checkpoint(out.path()).unwrap().unwrap().0, 10);
    }

    #[test]
    fn replacing_and_latest_ignore_leftovers_of_a_crash() {
        let out = tempfile::tempdir().unwrap();
        for step in [5, 10] {
            write_dir_atomically(&checkpoint_dir(out.path(), step), |tmp| {
                state(step).save(tmp)
            })
            .unwrap();
        }
        // What a crash mid-write leaves: a temp directory and one without its state file.
        std::fs::create_dir(out.path().join("checkpoint-15.tmp-1")).unwrap();
        std::fs::create_dir(out.path().join("checkpoint-20")).unwrap();
        let (step, path) = latest_checkpoint(out.path()).unwrap().unwrap();
        assert_eq!((step, path), (10, checkpoint_dir(out.path(), 10)));

        let mut replaced = state(10);
        replaced.tokens_seen = 1;
        write_dir_atomically(&checkpoint_dir(out.path(), 10), |tmp| replaced.save(tmp)).unwrap();
        assert_eq!(
            TrainState::load(&checkpoint_dir(out.path(), 10)).unwrap(),
            replaced
        );
        assert!(!out
            .path()
            .join(format!("checkpoint-10.old-{}", std::process::id()))
            .exists());
        assert_eq!(
            latest_checkpoint(&out.path().join("missing")).unwrap(),
            None
        );
    }

    #[test]
    fn old_checkpoints_are_removed_beyond_the_limit() {
        let out = tempfile::tempdir().unwrap();
        for step in [2, 4, 6, 8] {
            write_dir_atomically(&checkpoint_dir(out.path(), step), |tmp| {
                state(step).save(tmp)
            })
            .unwrap();
        }
        // Not a complete checkpoint: neither counted nor touched.
        std::fs::create_dir(out.path().join("checkpoint-1")).unwrap();
        remove_old_checkpoints(out.path(), 2).unwrap();
        let left: Vec<usize> = checkpoints(out.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, [6, 8]);
        assert!(out.path().join("checkpoint-1").is_dir());
        let mut names: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint-1", "checkpoint-6", "checkpoint-8"]);
    }

    #[test]
    fn output_dir_refuses_to_clobber() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        assert!(!check_output_dir(&out, false, false).unwrap());
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(RUN_MARKER), "{}").unwrap();
        let err = check_output_dir(&out, false, false).unwrap_err();
        assert!(err.to_string().contains("--overwrite"), "{err}");
        assert!(!check_output_dir(&out, false, true).unwrap());
        assert!(check_output_dir(&out, true, false).unwrap());

        // A directory wgtrain did not make is never deleted, even with --overwrite.
        let foreign = root.path().join("home");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("thesis.tex"), "precious").unwrap();
        for (overwrite, resuming) in [(true, false), (false, true)] {
            let err = check_output_dir(&foreign, overwrite, resuming).unwrap_err();
            assert!(err.to_string().contains("no wgtrain run"), "{err}");
        }
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_output_dir(&file, true, false).is_err());
    }

    #[test]
    fn train_state_and_rng_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        rng.set_stream(3);
        for _ in 0..1001 {
            rng.next_u32();
        }
        let mut saved = state(7);
        saved.rng = RngState::capture(&rng);
        saved.save(dir.path()).unwrap();
        let loaded = TrainState::load(dir.path()).unwrap();
        assert_eq!(loaded, saved);
        let mut restored = loaded.rng.restore().unwrap();
        let expected: Vec<u64> = (0..8).map(|_| rng.next_u64()).collect();
        let got: Vec<u64> = (0..8).map(|_| restored.next_u64()).collect();
        assert_eq!(got, expected);

        let bad = RngState {
            seed: "zz".into(),
            ..loaded.rng.clone()
        };
        assert!(bad.restore().is_err());
        std::fs::write(dir.path().join(STATE_FILE), "{\"step\": 1}").unwrap();
        let err = TrainState::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("train_state.json"), "{err}");
    }

    #[test]
    fn config_check_names_what_changed() {
        let saved = state(1);
        saved
            .check_config(&json!({"lr": 1e-4, "batch_size": 1}))
            .unwrap();
        let err = saved
            .check_config(&json!({"lr": 2e-4, "batch_size": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lr: checkpoint 0.0001 vs now 0.0002"), "{err}");
        assert!(!err.contains("batch_size"));
    }

    #[test]
    fn named_tensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER_FILE);
        let tensors = vec![
            NamedTensor {
                name: "layers.0.q_proj.lora_A.exp_avg".into(),
                shape: vec![2, 3],
                data: vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE, 0.0, 1e30],
            },
            NamedTensor {
                name: "layers.0.q_proj.lora_A.exp_avg_sq".into(),
                shape: vec![6],
                data: vec![0.5; 6],
            },
        ];
        let metadata = HashMap::from([("format".to_string(), "wgtrain-adamw".to_string())]);
        save_f32_tensors(&path, &tensors, Some(metadata)).unwrap();
        assert_eq!(load_f32_tensors(&path).unwrap(), tensors);

        let wrong = NamedTensor {
            name: "x".into(),
            shape: vec![4],
            data: vec![0.0; 3],
        };
        let err = save_f32_tensors(&path, &[wrong], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor x"), "{err}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_f32_tensors(&path).is_err());
    }
}
