//! A run directory held by one run at a time, and what nothing may lose in it.
//!
//! - **Lock**: [`RunDir::open`] takes an exclusive OS lock on `wgtrain.lock` inside the directory
//!   for the whole run (the OS drops it when the process ends, however it ends, so no lock is ever
//!   stale). The holder writes its pid, host and start time into the file; a second run into the
//!   directory, with or without `--overwrite` or `--resume`, fails at once naming it.
//! - **Overwrite**: the earlier run is moved into `wgtrain-replaced-run/` inside the directory and
//!   deleted only once the new run has taken its first step ([`RunDir::started`]). A run that fails
//!   before that (or is killed: the next run to take the lock finishes the job) gives the
//!   directory back as it was: what it wrote is removed and the earlier run moved back.
//! - **Fresh start**: a new run that fails before its first step removes what it wrote, so the
//!   corrected command is not refused.
//! - **Resume**: leftovers of crashed atomic writes (`*.tmp-<pid>`, `*.old-<pid>`,
//!   `*.removing-<pid>` directories, `.tmp*` files) are cleaned up.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use super::checkpoint::{check_output_dir, RUN_MARKER};
use super::metrics::METRICS_FILE;

/// The lock file: its content names the holder.
pub const LOCK_FILE: &str = "wgtrain.lock";
/// Where `--overwrite` keeps the earlier run until the new one has taken a step.
pub const REPLACED_DIR: &str = "wgtrain-replaced-run";

/// The run directory, locked for as long as this lives.
pub struct RunDir {
    path: PathBuf,
    /// Holds the lock (released when the file is closed).
    _lock: File,
    /// Until the first step: undo this run's start when dropped (not for a resumed run, which
    /// only continues what is there).
    undo_on_drop: bool,
}

impl RunDir {
    /// Locks `dir` (created if missing) for a run and makes it ready: an earlier run is moved
    /// aside (`overwrite`) or continued (`resuming`, after removing leftovers of crashed writes),
    /// and the run marker with `settings` is written. Refuses what [`check_output_dir`] refuses.
    pub fn open(
        dir: &Path,
        overwrite: bool,
        resuming: bool,
        settings: &serde_json::Value,
    ) -> Result<RunDir> {
        // Never lock (write into) a directory that holds something other than a run; whether
        // this run may replace or continue one is checked under the lock.
        check_output_dir(dir, true, true)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut run = RunDir {
            path: dir.to_path_buf(),
            _lock: lock(dir)?,
            undo_on_drop: false,
        };
        finish_interrupted_overwrite(dir)?;
        if resuming {
            remove_crash_leftovers(dir)?;
        }
        let replacing = check_output_dir(dir, overwrite, resuming)?;
        run.undo_on_drop = !resuming;
        if replacing {
            let aside = dir.join(REPLACED_DIR);
            std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
            for entry in run_entries(dir)? {
                let to = aside.join(entry.file_name().unwrap_or_default());
                std::fs::rename(&entry, &to).with_context(|| {
                    format!("moving {} aside to {}", entry.display(), to.display())
                })?;
            }
        }
        crate::data::jsonfile::write_atomically(
            &dir.join(RUN_MARKER),
            serde_json::to_string_pretty(settings)?.as_bytes(),
            true,
        )?;
        Ok(run)
    }

    /// The run has taken its first step: the earlier run it replaces is deleted, and a failure
    /// from now on keeps what was written (checkpoints, metrics).
    pub fn started(&mut self) -> Result<()> {
        self.undo_on_drop = false;
        remove_dir_if_present(&self.path.join(REPLACED_DIR))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.undo_on_drop {
            if let Err(err) = undo_start(&self.path) {
                eprintln!(
                    "warning: could not undo the failed start in {}: {err:#}",
                    self.path.display()
                );
            }
        }
    }
}

/// Refuses an output directory that is, holds or lies inside one of `inputs` (flag, path): the
/// run would write into its own input, and `--overwrite` would delete it.
pub fn check_output_apart(output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = resolved(output)?;
    for &(flag, input) in inputs {
        let path = resolved(input)?;
        let relation = match (out == path, out.starts_with(&path), path.starts_with(&out)) {
            (true, _, _) => "is",
            (_, true, _) => "lies inside",
            (_, _, true) => "holds",
            _ => continue,
        };
        bail!(
            "--output {} {relation} {flag} {}: choose an output directory apart from the run's \
             inputs",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// `path` absolute with links resolved, as far as it exists (an output may not exist yet).
fn resolved(path: &Path) -> Result<PathBuf> {
    let path =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return Ok(path.clone()),
        }
    }
    let mut resolved = existing
        .canonicalize()
        .with_context(|| format!("resolving {}", existing.display()))?;
    resolved.extend(rest.iter().rev());
    Ok(resolved)
}

/// Fails, naming the holder, when a run holds `dir`: checked before anything is read from it
/// (e.g. a checkpoint to resume from, which the holder may be replacing). The lock itself is
/// taken by [`RunDir::open`].
pub fn check_not_in_use(dir: &Path) -> Result<()> {
    let path = dir.join(LOCK_FILE);
    match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(mut file) => try_lock(&mut file, dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

fn try_lock(file: &mut File, dir: &Path) -> Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The holder may be rewriting it; an empty or partial name still refuses.
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{} is in use by another run ({}); wait for it to finish or choose another \
                 --output",
                dir.display(),
                match holder.trim() {
                    "" => "holder unknown",
                    h => h,
                }
            );
        }
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("locking {}", dir.join(LOCK_FILE).display()))
        }
    }
}

/// Takes the lock on `dir`'s lock file and writes this process into it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    try_lock(&mut file, dir)?;
    let holder = format!(
        "wgtrain pid {} on host {}, started {}\n",
        std::process::id(),
        host_name(),
        utc_now()
    );
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(holder.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

#[cfg(unix)]
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match ok {
        true => String::from_utf8_lossy(&buf[..end]).into_owned(),
        false => "unknown".into(),
    }
}

#[cfg(not(unix))]
fn host_name() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "unknown".into())
}

/// Now as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Everything in `dir` but the lock file and the replaced run.
pub(super) fn run_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if ![LOCK_FILE, REPLACED_DIR].contains(&entry.file_name().to_str().unwrap_or_default()) {
            entries.push(entry.path());
        }
    }
    Ok(entries)
}

fn remove_entry(path: &Path) -> Result<()> {
    let removed = match path.is_dir() && !path.is_symlink() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    };
    removed.with_context(|| format!("removing {}", path.display()))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Gives `dir` back as it was before a run that never took a step: removes what that run wrote
/// and moves the run it was replacing (if any) back.
fn undo_start(dir: &Path) -> Result<()> {
    for entry in run_entries(dir)? {
        remove_entry(&entry)?;
    }
    let aside = dir.join(REPLACED_DIR);
    if aside.is_dir() {
        for entry in
            std::fs::read_dir(&aside).with_context(|| format!("reading {}", aside.display()))?
        {
            let from = entry
                .with_context(|| format!("reading {}", aside.display()))?
                .path();
            let to = dir.join(from.file_name().unwrap_or_default());
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} back to {}", from.display(), to.display()))?;
        }
        std::fs::remove_dir(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    Ok(())
}

/// A replaced run left by a killed `--overwrite`: deleted if the new run had taken a step (it
/// has a metrics line), else moved back.
fn finish_interrupted_overwrite(dir: &Path) -> Result<()> {
    let aside = dir.join(REPLACED_DIR);
    if !aside.is_dir() {
        return Ok(());
    }
    let new_run_started = std::fs::read(dir.join(METRICS_FILE)).is_ok_and(|m| m.contains(&b'\n'));
    match new_run_started {
        true => remove_dir_if_present(&aside),
        false => {
            eprintln!(
                "warning: {} holds the run an interrupted --overwrite had moved aside, and the \
                 new run never took a step: moving it back",
                dir.display()
            );
            undo_start(dir)
        }
    }
}

/// What crashed atomic writes leave in a run directory: `<name>.tmp-<pid>`, `<name>.old-<pid>`
/// and `<name>.removing-<pid>` directories, and `.tmp*` files of atomic file writes. A checkpoint
/// whose replacement was cut between its two renames is put back from its `.old-` copy.
fn remove_crash_leftovers(dir: &Path) -> Result<()> {
    for entry in run_entries(dir)? {
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if entry.is_file() && name.starts_with(".tmp") {
            remove_entry(&entry)?;
            continue;
        }
        let Some((base, kind)) = ["tmp", "old", "removing"].iter().find_map(|kind| {
            let (base, pid) = name.rsplit_once(&format!(".{kind}-"))?;
            pid.parse::<u32>().is_ok().then_some((base, *kind))
        }) else {
            continue;
        };
        let original = dir.join(base);
        if kind == "old" && !original.exists() {
            std::fs::rename(&entry, &original).with_context(|| {
                format!("restoring {} from {}", original.display(), entry.display())
            })?;
        } else {
            eprintln!("removing {}, left by an interrupted write", entry.display());
            remove_entry(&entry)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_output_is_kept_apart_from_the_inputs() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let inputs = [("--model", model.as_path())];
        for (output, relation) in [
            (model.clone(), "is"),
            (model.join("run"), "lies inside"),
            (root.path().to_path_buf(), "holds"),
            (model.join("../model/."), "is"),
        ] {
            let err = check_output_apart(&output, &inputs)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{relation} --model")), "{err}");
        }
        check_output_apart(&root.path().join("modelled"), &inputs).unwrap();
    }

    #[test]
    fn a_locked_directory_names_its_holder() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        let _held = RunDir::open(&out, false, false, &json!({})).unwrap();
        for (overwrite, resuming) in [(false, false), (true, false), (false, true)] {
            let err = RunDir::open(&out, overwrite, resuming, &json!({}))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("in use by another run"), "{err}");
            assert!(
                err.contains(&format!("pid {}", std::process::id())) && err.contains("UTC"),
                "{err}"
            );
        }
    }

    #[test]
    fn overwrite_keeps_the_earlier_run_until_the_first_step() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        let settings = json!({"lr": 1e-4});
        let mut first = RunDir::open(&out, false, false, &settings).unwrap();
        std::fs::write(out.join(METRICS_FILE), "old\n").unwrap();
        first.started().unwrap();
        drop(first);
        let before = names(&out);

        // Fails before its first step: the earlier run is back, nothing of the new one is left.
        let second = RunDir::open(&out, true, false, &json!({"lr": 1.0})).unwrap();
        assert!(!out.join(METRICS_FILE).exists());
        std::fs::write(out.join("partial"), "x").unwrap();
        drop(second);
        assert_eq!(names(&out), before);
        assert_eq!(
            std::fs::read_to_string(out.join(METRICS_FILE)).unwrap(),
            "old\n"
        );

        // Killed before its first step (what it leaves, made by hand: a kill would also end the
        // lock): the next run to lock the directory moves the earlier run back.
        std::fs::create_dir(out.join(REPLACED_DIR)).unwrap();
        for name in [METRICS_FILE, RUN_MARKER] {
            std::fs::rename(out.join(name), out.join(REPLACED_DIR).join(name)).unwrap();
        }
        std::fs::write(out.join(RUN_MARKER), "{}").unwrap();
        let resumed = RunDir::open(&out, false, true, &settings).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join(METRICS_FILE)).unwrap(),
            "old\n"
        );
        drop(resumed);

        let mut third = RunDir::open(&out, true, false, &settings).unwrap();
        third.started().unwrap();
        drop(third);
        assert_eq!(names(&out), [LOCK_FILE, RUN_MARKER]);
    }

    #[test]
    fn a_failed_fresh_start_leaves_nothing_that_blocks_the_next() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        drop(RunDir::open(&out, false, false, &json!({})).unwrap());
        assert_eq!(names(&out), [LOCK_FILE]);
        drop(RunDir::open(&out, false, false, &json!({})).unwrap());
    }

    #[test]
    fn resume_cleans_the_leftovers_of_crashed_writes() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        let mut run = RunDir::open(&out, false, false, &json!({})).unwrap();
        run.started().unwrap();
        drop(run);
        for dir in [
            "checkpoint-4",
            "checkpoint-6.tmp-17",
            "checkpoint-2.removing-9",
            "checkpoint-8.old-3",
        ] {
            std::fs::create_dir(out.join(dir)).unwrap();
        }
        std::fs::write(out.join(".tmpAbC12"), "").unwrap();
        drop(RunDir::open(&out, false, true, &json!({})).unwrap());
        assert_eq!(
            names(&out),
            ["checkpoint-4", "checkpoint-8", LOCK_FILE, RUN_MARKER]
        );
    }
}
