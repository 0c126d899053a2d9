//! A per-kernel profile (`WGTRAIN_PROFILE=1`), a diagnostic: every dispatch becomes its own
//! submission, waited for, and its wall time is added to its (kernel variant, grid) class. The
//! table, sorted by total time, is printed to stderr when the device is dropped (the end of a
//! bench or train run). Serialising the dispatches costs a submit-and-wait each, so the total is
//! above an unprofiled run's; the ranking is what it is for.
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// A kernel variant (as [`crate::shader::Kernel::describe`] names it) on a grid of workgroups.
type Class = (String, [u32; 3]);

/// Time and count per (kernel variant, grid).
#[derive(Debug, Default)]
pub struct Profile {
    classes: Mutex<HashMap<Class, (u64, Duration)>>,
}

/// Kernels a printed report lists (the rest are summed in one line).
const LISTED: usize = 40;

impl Profile {
    /// Whether `WGTRAIN_PROFILE` asks for a profile (`1`); any other value but `0` is an error.
    pub fn from_env() -> anyhow::Result<bool> {
        match std::env::var("WGTRAIN_PROFILE").as_deref() {
            Err(_) | Ok("0") | Ok("") => Ok(false),
            Ok("1") => Ok(true),
            Ok(other) => anyhow::bail!("WGTRAIN_PROFILE='{other}': expected 1 (on) or 0 (off)"),
        }
    }

    pub(crate) fn add(&self, kernel: &str, groups: [u32; 3], time: Duration) {
        let mut classes = self.classes.lock().unwrap();
        let entry = classes.entry((kernel.to_string(), groups)).or_default();
        entry.0 += 1;
        entry.1 += time;
    }

    /// The table of what was profiled since the last report: one row per class, largest total
    /// first, with its share of all profiled time; the profile then starts over.
    pub fn report(&self) -> String {
        let classes = std::mem::take(&mut *self.classes.lock().unwrap());
        let mut rows: Vec<_> = classes.iter().collect();
        rows.sort_by_key(|(_, (_, time))| std::cmp::Reverse(*time));
        let total: Duration = rows.iter().map(|r| r.1 .1).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut out = format!(
            "kernel profile (WGTRAIN_PROFILE=1): {} dispatches, {:.1} ms\n\
             | total (ms) | share | calls | ms/call | grid | kernel |\n|---:|---:|---:|---:|---|---|\n",
            rows.iter().map(|r| r.1 .0).sum::<u64>(),
            ms(total)
        );
        for ((kernel, [x, y, z]), (calls, time)) in rows.iter().take(LISTED) {
            let _ = writeln!(
                out,
                "| {:.1} | {:.1}% | {calls} | {:.2} | {x}x{y}x{z} | {kernel} |",
                ms(*time),
                100.0 * time.as_secs_f64() / total.as_secs_f64().max(1e-12),
                ms(*time) / *calls as f64,
            );
        }
        if rows.len() > LISTED {
            let rest: Duration = rows[LISTED..].iter().map(|r| r.1 .1).sum();
            let _ = writeln!(
                out,
                "| {:.1} | | | | | {} other classes |",
                ms(rest),
                rows.len() - LISTED
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sums_classes_and_sorts_by_total_time() {
        let profile = Profile::default();
        let ms = Duration::from_millis;
        profile.add("small", [1, 1, 1], ms(5));
        profile.add("big", [2, 1, 1], ms(30));
        profile.add("small", [1, 1, 1], ms(5));
        profile.add("small", [4, 1, 1], ms(1));
        let report = profile.report();
        let rows: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("| "))
            .skip(1)
            .collect();
        assert_eq!(
            rows,
            [
                "| 30.0 | 73.2% | 1 | 30.00 | 2x1x1 | big |",
                "| 10.0 | 24.4% | 2 | 5.00 | 1x1x1 | small |",
                "| 1.0 | 2.4% | 1 | 1.00 | 4x1x1 | small |",
            ],
            "{report}"
        );
        assert!(report.starts_with("kernel profile (WGTRAIN_PROFILE=1): 4 dispatches, 41.0 ms"));
    }
}
