//! Files of JSON rows: a JSON array or JSON Lines, read with each row's line number (for error
//! messages) and written back in the same layout, atomically and without clobbering by default.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// How the rows of a file are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON array of rows (written back pretty-printed).
    JsonArray,
    /// One JSON value per line; blank lines are skipped.
    JsonLines,
}

/// A row and where it starts in its file.
#[derive(Clone, Debug)]
pub struct SourceRow {
    pub value: Value,
    /// 1-based line on which the row starts.
    pub line: usize,
}

/// Reads every row of `path`; a JSON array if the file starts with `[`, else JSON Lines.
pub fn read_rows(path: &Path) -> Result<(FileFormat, Vec<SourceRow>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text).map_err(|err| {
            anyhow::anyhow!(
                "{}:{}:{}: invalid JSON: {err}",
                path.display(),
                err.line(),
                err.column()
            )
        })?;
        let lines = array_element_lines(&text);
        let rows = values
            .into_iter()
            .zip(lines)
            .map(|(value, line)| SourceRow { value, line })
            .collect();
        Ok((FileFormat::JsonArray, rows))
    } else {
        let mut rows = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value = serde_json::from_str(line).map_err(|err| {
                anyhow::anyhow!("{}:{}: invalid JSON: {err}", path.display(), index + 1)
            })?;
            rows.push(SourceRow {
                value,
                line: index + 1,
            });
        }
        Ok((FileFormat::JsonLines, rows))
    }
}

/// The line on which each element of a top-level JSON array starts (the text is valid JSON).
fn array_element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut line, mut depth) = (1, 0usize);
    let (mut in_string, mut escaped, mut expecting_element) = (false, false, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expecting_element && !c.is_whitespace() && c != ']' {
            lines.push(line);
            expecting_element = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                expecting_element |= depth == 1;
            }
            ']' | '}' => depth -= 1,
            ',' if depth == 1 => expecting_element = true,
            _ => {}
        }
    }
    lines
}

/// Fails with a clear message when `path` exists and `overwrite` is not set.
pub fn check_can_write(path: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        bail!(
            "{} already exists; refusing to overwrite it (pass --overwrite to replace it)",
            path.display()
        );
    }
    Ok(())
}

/// Writes `rows` in `format`: to a temporary file beside `path`, then renamed over it, so a crash
/// never leaves a half-written file. Without `overwrite` an existing `path` is an error.
pub fn write_rows(path: &Path, format: FileFormat, rows: &[&Value], overwrite: bool) -> Result<()> {
    let mut text = match format {
        FileFormat::JsonArray => serde_json::to_string_pretty(rows)?,
        FileFormat::JsonLines => rows
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
    };
    if !text.is_empty() {
        text.push('\n');
    }
    write_atomically(path, text.as_bytes(), overwrite)
}

/// Writes `contents` to `path` through a temporary file in the same directory.
pub fn write_atomically(path: &Path, contents: &[u8], overwrite: bool) -> Result<()> {
    check_can_write(path, overwrite)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = new_temp_file(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    temp.write_all(contents)
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("writing {}", temp.path().display()))?;
    let persisted = if overwrite {
        temp.persist(path)
    } else {
        temp.persist_noclobber(path)
    };
    persisted.map_err(|err| {
        if err.error.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; refusing to overwrite it (pass --overwrite to replace it)",
                path.display()
            )
        } else {
            anyhow::Error::new(err.error).context(format!("writing {}", path.display()))
        }
    })?;
    Ok(())
}

/// A temporary file in `dir` created with the mode `File::create` gives (0666 less the umask),
/// not tempfile's 0600, so that it keeps that mode once renamed into place.
fn new_temp_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(dir)
}

/// Gives `path`, written through a 0600 temporary file (safetensors' writer), the mode
/// `File::create` would have: 0666 less the umask.
#[cfg(unix)]
pub fn set_created_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    // The umask can only be read by setting it: set it back at once, once per process.
    // SAFETY: umask only swaps the process's file-creation mask.
    #[allow(clippy::useless_conversion)] // mode_t is u32 on Linux, u16 on macOS
    let umask = *UMASK.get_or_init(|| unsafe {
        let mask = libc::umask(0o022);
        libc::umask(mask);
        u32::from(mask)
    });
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask))
        .with_context(|| format!("setting the permissions of {}", path.display()))
}

#[cfg(not(unix))]
pub fn set_created_mode(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::array_element_lines;

    #[test]
    fn finds_the_line_of_each_array_element() {
        let text = "[\n  {\"a\": \"x,[\\\"y\"},\n  {\"b\": [1,\n 2]}, 3\n,\n\n4]";
        assert_eq!(array_element_lines(text), vec![2, 3, 4, 7]);
        assert_eq!(array_element_lines("[]"), Vec::<usize>::new());
    }
}
