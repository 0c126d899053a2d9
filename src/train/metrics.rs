//! What a run reports: `metrics.jsonl` (one line per optimizer step, flushed as written), the
//! terminal progress (an indicatif bar, or one plain line per step in llm.c's style when stdout is
//! not a terminal) and the loss curve as an SVG picture.
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PLOT_FILE: &str = "loss.svg";

/// One optimizer step, as one line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed (1-based, as transformers logs `global_step`).
    pub step: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Mean cross-entropy over the step's supervised tokens.
    pub loss: f64,
    /// The learning rate this step was taken with.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens that were targets of the loss.
    pub supervised_tokens: u64,
    /// All (unpadded) tokens of the step's rows.
    pub tokens: u64,
    /// `tokens` per second of this step.
    pub tokens_per_s: f64,
    /// Model FLOPs of the step (see `train::flops`) per second.
    #[serde(default)]
    pub flops_per_s: f64,
    /// `flops_per_s` over the device's peak, when `WGTRAIN_PEAK_GFLOPS` gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// The most device memory the step held at once (MiB); 0 in lines of older runs.
    #[serde(default)]
    pub peak_mem_mib: f64,
    /// Seconds since the run started (across resumes).
    pub elapsed_s: f64,
}

/// Appends lines to `metrics.jsonl`, flushing each so a crash loses nothing written.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Starts a fresh file (the output directory was checked for an earlier run).
    pub fn create(path: impl AsRef<Path>) -> Result<MetricsWriter> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsWriter { path, file })
    }

    /// Continues a file after resuming from the checkpoint of `step`, returning the steps kept.
    /// Lines of later steps (written before the interruption, and about to be redone) are
    /// removed, so the file ends up equal to the uninterrupted run's; the kept lines stay byte for
    /// byte. A damaged last line (cut by a kill or a full disk) belongs to a step after the
    /// checkpoint and is dropped with a warning; a damaged earlier line is an error. A missing
    /// file is started afresh.
    pub fn resume(
        path: impl AsRef<Path>,
        step: usize,
    ) -> Result<(MetricsWriter, Vec<StepMetrics>)> {
        let path = path.as_ref();
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let lines: Vec<&[u8]> = text
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .collect();
        let (mut kept_text, mut kept) = (Vec::new(), Vec::new());
        for (i, line) in lines.iter().enumerate() {
            let m: StepMetrics = match serde_json::from_slice(line) {
                Ok(m) => m,
                Err(e) if i + 1 == lines.len() => {
                    eprintln!(
                        "warning: {}: dropping the damaged last line ({e}); its step is redone",
                        path.display()
                    );
                    break;
                }
                Err(e) => bail!(
                    "{}: line {}: not a metrics line: {e}",
                    path.display(),
                    i + 1
                ),
            };
            if m.step <= step {
                kept_text.extend_from_slice(line);
                if !line.ends_with(b"\n") {
                    kept_text.push(b'\n');
                }
                kept.push(m);
            }
        }
        crate::data::jsonfile::write_atomically(path, &kept_text, true)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let writer = MetricsWriter {
            path: path.to_path_buf(),
            file,
        };
        Ok((writer, kept))
    }

    pub fn write(&mut self, metrics: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(metrics)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Every line of a metrics.jsonl file; a malformed line is an error naming it.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<StepMetrics>> {
    let path = path.as_ref();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut metrics = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        metrics.push(
            serde_json::from_str(&line)
                .map_err(|e| anyhow!("{}:{}: not a metrics line: {e}", path.display(), i + 1))?,
        );
    }
    Ok(metrics)
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stdout is a terminal, else plain lines.
    Auto,
    Bar,
    Plain,
}

/// The terminal side of a run: a bar or one log line per step.
pub struct Progress {
    bar: Option<ProgressBar>,
    total_steps: usize,
    /// Steps done and run seconds when this process started: the ETA comes from this process's
    /// own speed (a resumed run's earlier steps may have run elsewhere).
    start: (usize, f64),
}

impl Progress {
    /// `done` steps of `total_steps` are already complete after `elapsed_s` seconds (a resumed
    /// run; 0 and 0.0 for a fresh one).
    pub fn new(mode: ProgressMode, total_steps: usize, done: usize, elapsed_s: f64) -> Progress {
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Plain => false,
            ProgressMode::Auto => std::io::stdout().is_terminal(),
        }
        .then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total_steps as u64),
                ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                    .expect("the progress template is valid")
                    .progress_chars("=> "),
            );
            bar.set_position(done as u64);
            bar
        });
        Progress {
            bar,
            total_steps,
            start: (done, elapsed_s),
        }
    }

    /// Reports a finished step.
    pub fn step(&mut self, m: &StepMetrics) {
        let (done, elapsed) = self.start;
        let eta = eta_seconds(
            m.elapsed_s - elapsed,
            m.step.saturating_sub(done),
            self.total_steps.saturating_sub(m.step),
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step as u64);
                bar.set_message(format!(
                    "| loss {:.4} | lr {} | {:.0} tok/s | {} | peak {:.0} MiB | ETA {}",
                    m.loss,
                    sci(m.lr),
                    m.tokens_per_s,
                    flops_rate(m.flops_per_s),
                    m.peak_mem_mib,
                    duration(eta)
                ));
            }
            None => println!("{}", plain_line(m, self.total_steps, eta)),
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => println!("{message}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Seconds left at the mean speed of the `steps` steps that took `seconds`.
pub fn eta_seconds(seconds: f64, steps: usize, remaining: usize) -> f64 {
    if steps == 0 {
        return 0.0;
    }
    seconds.max(0.0) / steps as f64 * remaining as f64
}

/// llm.c-style log line: `step 12/300 | loss 1.2345 | lr 1.00e-04 | grad_norm 0.83 |
/// 1234 tok/s | 5.1 TFLOP/s | MFU 7.6% | peak 512 MiB | 12.3s | ETA 5m` (MFU when the peak FLOP/s
/// is known).
pub fn plain_line(m: &StepMetrics, total_steps: usize, eta: f64) -> String {
    format!(
        "step {}/{} | loss {:.4} | lr {} | grad_norm {:.2} | {:.0} tok/s | {}{} | peak {:.0} MiB \
         | {:.1}s | ETA {}",
        m.step,
        total_steps,
        m.loss,
        sci(m.lr),
        m.grad_norm,
        m.tokens_per_s,
        flops_rate(m.flops_per_s),
        m.mfu
            .map_or(String::new(), |f| format!(" | MFU {:.1}%", 100.0 * f)),
        m.peak_mem_mib,
        m.elapsed_s,
        duration(eta)
    )
}

/// FLOP/s with a unit that keeps a few digits: `2.5 GFLOP/s`, `312.0 TFLOP/s`.
pub fn flops_rate(x: f64) -> String {
    if x >= 1e12 {
        format!("{:.1} TFLOP/s", x / 1e12)
    } else {
        format!("{:.1} GFLOP/s", x / 1e9)
    }
}

/// C's `%.2e`: two decimals and an exponent of at least two digits (`1.00e-04`).
pub fn sci(x: f64) -> String {
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(digits) => ('-', digits),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// A short duration: `45s`, `5m`, `1h02m`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", (s + 30) / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// LLaMA-Factory's `smooth` (plot_loss): an exponential moving average whose weight grows with the
/// number of points, so short runs are barely smoothed.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else {
        return Vec::new();
    };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// "Nice" axis ticks (1, 2 or 5 × 10^k apart) covering [lo, hi].
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / target as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_label(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The loss curve: one polyline point per step with a finite loss, and the smoothed curve.
pub fn loss_svg(metrics: &[StepMetrics], title: &str) -> String {
    let (width, height) = (800.0, 480.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let points: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|m| m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let (x_lo, x_hi) = match (points.first(), points.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (a.0, b.0),
        (Some(a), _) => (a.0 - 1.0, a.0 + 1.0),
        _ => (0.0, 1.0),
    };
    let (mut y_lo, mut y_hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if !y_lo.is_finite() {
        (y_lo, y_hi) = (0.0, 1.0);
    }
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    let (y_lo, y_hi) = ((y_lo - pad).max(0.0), y_hi + pad);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let sx = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * plot_w;
    let sy = |y: f64| top + (y_hi - y) / (y_hi - y_lo) * plot_h;
    let polyline = |ys: &mut dyn Iterator<Item = (f64, f64)>| {
        ys.map(|(x, y)| format!("{:.2},{:.2}", sx(x), sy(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let smoothed = smooth(&points.iter().map(|p| p.1).collect::<Vec<_>>());

    let mut svg = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for x in ticks(x_lo, x_hi, 8) {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.2}" y1="{top}" x2="{0:.2}" y2="{1}" stroke="#e5e5e5"/><text x="{0:.2}" y="{2}" text-anchor="middle">{3}</text>"##,
            sx(x),
            top + plot_h,
            top + plot_h + 16.0,
            tick_label(x)
        );
    }
    for y in ticks(y_lo, y_hi, 6) {
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{0:.2}" x2="{1}" y2="{0:.2}" stroke="#e5e5e5"/><text x="{2}" y="{3:.2}" text-anchor="end">{4}</text>"##,
            sy(y),
            left + plot_w,
            left - 6.0,
            sy(y) + 4.0,
            tick_label(y)
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        left + plot_w / 2.0,
        height - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">loss</text>"#,
        top + plot_h / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<polyline class="loss" fill="none" stroke="#1f77b4" stroke-opacity="0.4" stroke-width="1" points="{}"/>"##,
        polyline(&mut points.iter().copied())
    );
    let _ = writeln!(
        svg,
        r##"<polyline class="smoothed" fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        polyline(&mut points.iter().zip(&smoothed).map(|(p, &s)| (p.0, s)))
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="end" fill="#1f77b4">original (faint) · smoothed</text>"##,
        left + plot_w - 6.0,
        top + 16.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Writes the loss curve of `metrics` to `path` (atomically, replacing an earlier picture).
pub fn write_loss_svg(path: impl AsRef<Path>, metrics: &[StepMetrics], title: &str) -> Result<()> {
    crate::data::jsonfile::write_atomically(
        path.as_ref(),
        loss_svg(metrics, title).as_bytes(),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: usize, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: step as f64 / 10.0,
            loss,
            lr: 1e-4,
            grad_norm: 0.83,
            supervised_tokens: 100,
            tokens: 1234,
            tokens_per_s: 1234.0,
            flops_per_s: 5.1e12,
            mfu: Some(0.0762),
            peak_mem_mib: 512.0,
            elapsed_s: step as f64,
        }
    }

    #[test]
    fn jsonl_lines_have_every_field_and_resume_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut writer = MetricsWriter::create(&path).unwrap();
        for step in 1..=5 {
            writer.write(&metrics(step, 2.0 / step as f64)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let mut keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "elapsed_s",
                "epoch",
                "flops_per_s",
                "grad_norm",
                "loss",
                "lr",
                "mfu",
                "peak_mem_mib",
                "step",
                "supervised_tokens",
                "tokens",
                "tokens_per_s"
            ]
        );
        assert_eq!(read_metrics(&path).unwrap().len(), 5);

        let (mut resumed, kept) = MetricsWriter::resume(&path, 3).unwrap();
        assert_eq!(kept.len(), 3);
        resumed.write(&metrics(4, 0.25)).unwrap();
        let steps: Vec<(usize, f64)> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|m| (m.step, m.loss))
            .collect();
        assert_eq!(steps, [(1, 2.0), (2, 1.0), (3, 2.0 / 3.0), (4, 0.25)]);
    }

    #[test]
    fn resume_keeps_earlier_lines_byte_for_byte_and_drops_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        // Written by another serializer: digits serde_json would print differently.
        let earlier = "{\"step\":1,\"epoch\":0.1,\"loss\":2.50000000000000000001,\"lr\":1e-4,\
                       \"grad_norm\":1.0,\"supervised_tokens\":3,\"tokens\":4,\"tokens_per_s\":5.0,\
                       \"elapsed_s\":0.5}\n";
        std::fs::write(&path, format!("{earlier}{{\"step\":2,\"epo")).unwrap();
        let (_, kept) = MetricsWriter::resume(&path, 1).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), earlier);

        // Damage before the last line is not a cut write: an error naming the line.
        std::fs::write(&path, format!("{{\"step\": 1}}\n{earlier}")).unwrap();
        let err = MetricsWriter::resume(&path, 1).err().unwrap().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn a_malformed_metrics_line_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\": 1}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:1"), "{err}");
    }

    #[test]
    fn plain_line_in_llm_c_style() {
        let mut m = metrics(12, 1.23454);
        m.elapsed_s = 12.34;
        assert_eq!(
            plain_line(&m, 300, 300.0),
            "step 12/300 | loss 1.2345 | lr 1.00e-04 | grad_norm 0.83 | 1234 tok/s | 5.1 TFLOP/s \
             | MFU 7.6% | peak 512 MiB | 12.3s | ETA 5m"
        );
        m.mfu = None;
        m.flops_per_s = 2.5e9;
        assert!(plain_line(&m, 300, 300.0).contains("| 2.5 GFLOP/s | peak 512 MiB | 12.3s"));
        assert_eq!(sci(2.5e-5), "2.50e-05");
        assert_eq!(sci(3.0), "3.00e+00");
        assert_eq!(sci(1.5e-100), "1.50e-100");
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(eta_seconds(10.0, 5, 20), 40.0);
        assert_eq!(eta_seconds(10.0, 0, 20), 0.0);
    }

    #[test]
    fn smoothing_matches_llama_factory() {
        let values = [1.0, 0.0, 0.0];
        let w = 1.8 * (1.0 / (1.0 + (-0.15f64).exp()) - 0.5);
        let s = smooth(&values);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - w).abs() < 1e-15 && (s[2] - w * w).abs() < 1e-15);
        assert!(smooth(&[]).is_empty());
    }

    /// Every tag closes in order (a minimal well-formedness check without an XML parser).
    fn balanced(svg: &str) -> bool {
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else {
                return false;
            };
            let tag = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop() != Some(name.to_string()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
        }
        stack.is_empty() && !rest.contains('>')
    }

    #[test]
    fn svg_is_well_formed_with_one_point_per_step() {
        let run: Vec<StepMetrics> = (1..=37)
            .map(|s| metrics(s, 3.0 / (s as f64).sqrt()))
            .chain([metrics(38, f64::NAN)])
            .collect();
        let svg = loss_svg(&run, "demo <lora> & co");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(balanced(&svg), "{svg}");
        assert!(svg.contains("demo &lt;lora&gt; &amp; co"));
        for class in ["loss", "smoothed"] {
            let marker = format!("class=\"{class}\"");
            let line = svg.lines().find(|l| l.contains(&marker)).unwrap();
            let points = line
                .split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            assert_eq!(points.split(' ').count(), 37, "{class}");
            assert!(!points.contains("NaN"));
        }
        for degenerate in [vec![], vec![metrics(1, 2.0)]] {
            let svg = loss_svg(&degenerate, "x");
            assert!(balanced(&svg) && !svg.contains("NaN") && !svg.contains("inf"));
        }
        let dir = tempfile::tempdir().unwrap();
        write_loss_svg(dir.path().join(LOSS_PLOT_FILE), &run, "t").unwrap();
    }
}
