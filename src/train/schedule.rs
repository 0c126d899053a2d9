//! Learning-rate schedules, exactly as transformers' `get_cosine_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_constant_schedule_with_warmup` compute them.
//!
//! transformers' `LambdaLR` multiplies the peak lr by `lr_lambda(s)` where `s` is the number of
//! optimizer steps already taken, so the first step (s = 0) runs at lr 0 when there is warmup, the
//! peak is reached at s = warmup, and cosine / linear reach 0 at s = total (one past the last step).
use std::f64::consts::PI;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerKind {
    /// Half a cosine from the peak to 0 after warmup.
    Cosine,
    /// Linear decay from the peak to 0 after warmup.
    Linear,
    /// The peak lr after warmup.
    Constant,
}

impl SchedulerKind {
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::Linear => "linear",
            SchedulerKind::Constant => "constant",
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<SchedulerKind> {
        Ok(match s {
            "cosine" => SchedulerKind::Cosine,
            "linear" => SchedulerKind::Linear,
            "constant" => SchedulerKind::Constant,
            other => bail!("unknown scheduler {other:?}; expected cosine, linear or constant"),
        })
    }
}

/// How long the warmup lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    /// A fraction of the total steps, rounded up.
    Ratio(f64),
    Steps(usize),
}

impl Warmup {
    /// transformers' `TrainingArguments.get_warmup_steps`: `warmup_steps` if positive, else
    /// `ceil(total * warmup_ratio)`.
    pub fn steps(self, total_steps: usize) -> usize {
        match self {
            Warmup::Steps(steps) => steps,
            Warmup::Ratio(ratio) => (total_steps as f64 * ratio).ceil() as usize,
        }
    }
}

/// The learning rate at every optimizer step of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn new(
        kind: SchedulerKind,
        peak_lr: f64,
        warmup: Warmup,
        total_steps: usize,
    ) -> Result<Schedule> {
        ensure!(
            peak_lr.is_finite() && peak_lr > 0.0,
            "the learning rate must be positive, got {peak_lr}"
        );
        ensure!(total_steps > 0, "a schedule needs at least one step");
        if let Warmup::Ratio(ratio) = warmup {
            ensure!(
                (0.0..=1.0).contains(&ratio),
                "warmup ratio {ratio} must lie in [0, 1]"
            );
        }
        Ok(Schedule {
            kind,
            peak_lr,
            warmup_steps: warmup.steps(total_steps),
            total_steps,
        })
    }

    /// The multiplier of the peak lr after `step` optimizer steps (transformers' `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            // num_cycles = 0.5: half a period, from 1 down to 0.
            SchedulerKind::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
        }
    }

    /// The learning rate of optimizer step `step` (0-based: the number of steps already taken).
    pub fn lr(&self, step: usize) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
    }

    #[test]
    fn warmup_steps_round_up_like_transformers() {
        assert_eq!(Warmup::Ratio(0.1).steps(531), 54);
        assert_eq!(Warmup::Ratio(0.1).steps(530), 53);
        assert_eq!(Warmup::Ratio(0.0).steps(100), 0);
        assert_eq!(Warmup::Steps(7).steps(100), 7);
    }

    #[test]
    fn cosine_warms_up_from_zero_and_decays_to_zero() {
        let s = Schedule::new(SchedulerKind::Cosine, 1e-4, Warmup::Ratio(0.1), 100).unwrap();
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(5), 0.5e-4));
        assert!(close(s.lr(10), 1e-4));
        // Halfway through the decay: cos(pi / 2) = 0, so half the peak.
        assert!(close(s.lr(55), 0.5e-4));
        let last = 0.5 * (1.0 + (PI * 89.0 / 90.0).cos()) * 1e-4;
        assert!(close(s.lr(99), last));
        assert_eq!(s.lr(100), 0.0);
    }

    #[test]
    fn linear_decays_to_zero_at_total() {
        let s = Schedule::new(SchedulerKind::Linear, 2e-5, Warmup::Steps(4), 20).unwrap();
        assert!(close(s.lr(1), 0.5e-5));
        assert!(close(s.lr(4), 2e-5));
        assert!(close(s.lr(12), 1e-5));
        assert!(close(s.lr(19), 2e-5 / 16.0));
        assert_eq!(s.lr(20), 0.0);
        assert_eq!(s.lr(25), 0.0);
    }

    #[test]
    fn constant_holds_the_peak_after_warmup() {
        let s = Schedule::new(SchedulerKind::Constant, 1e-3, Warmup::Steps(2), 10).unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(1), 0.5e-3));
        assert_eq!(s.lr(2), 1e-3);
        assert_eq!(s.lr(9), 1e-3);
        let no_warmup = Schedule::new(SchedulerKind::Cosine, 1e-3, Warmup::Ratio(0.0), 10).unwrap();
        assert_eq!(no_warmup.lr(0), 1e-3);
    }

    #[test]
    fn warmup_longer_than_the_run_still_works() {
        let s = Schedule::new(SchedulerKind::Cosine, 1.0, Warmup::Steps(10), 5).unwrap();
        assert!(close(s.lr(4), 0.4));
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Schedule::new(SchedulerKind::Linear, 0.0, Warmup::Steps(0), 10).is_err());
        assert!(Schedule::new(SchedulerKind::Linear, 1e-4, Warmup::Ratio(1.5), 10).is_err());
        assert!(Schedule::new(SchedulerKind::Linear, 1e-4, Warmup::Steps(0), 0).is_err());
        let err = "cosine_with_restarts".parse::<SchedulerKind>().unwrap_err();
        assert!(err.to_string().contains("cosine_with_restarts"));
    }
}
