//! The order in which rows are trained: overlong / unsupervised rows filtered out, a seeded
//! per-epoch shuffle, micro-batches of rows of similar length, and optimizer steps of `grad_accum`
//! micro-batches whose position can be saved and restored.
//!
//! Grouping policy (transformers' `LengthGroupedSampler`, with whole micro-batches moved):
//! 1. Epoch `e` permutes all rows with a Fisher–Yates shuffle driven by ChaCha8 seeded with `seed`
//!    on stream `e`. Without shuffling, rows run in file order with no grouping (transformers'
//!    SequentialSampler; the PEFT fixtures' curves depend on it) and steps 2–3 do not apply.
//! 2. The permutation is cut into mega-batches of `batch_size × m` rows, with
//!    `m = clamp(rows / (4 × batch_size), 1, 50)`; each mega-batch is sorted by length, longest
//!    first (stable), and cut into micro-batches of `batch_size` rows (the epoch's last one may be
//!    smaller).
//! 3. The micro-batch holding the epoch's longest row is swapped with the first, so that running
//!    out of memory shows at the first step rather than hours in.
//!
//! An optimizer step is `grad_accum` consecutive micro-batches and never spans two epochs: the
//! last step of an epoch takes what is left. Steps per epoch = ceil(micro-batches / grad_accum);
//! the run lasts `max_steps`, or ceil(epochs × steps per epoch) (transformers' rounding, which also
//! allows fractional epochs).
use anyhow::{bail, ensure, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::chat::EncodedRow;

/// What to do with rows longer than `--max-len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the first max-len tokens (LLaMA-Factory's cutoff_len behaviour).
    Truncate,
    /// Leave the row out.
    Drop,
}

/// What happened to the rows on their way to training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RowCounts {
    /// Rows given.
    pub total: usize,
    /// Rows trained on.
    pub kept: usize,
    /// Kept rows that were cut to max-len.
    pub truncated: usize,
    /// Rows over max-len left out (`--overlong drop`).
    pub dropped_overlong: usize,
    /// Rows with no supervised token to predict (e.g. truncation cut every answer away).
    pub dropped_unsupervised: usize,
}

/// Why a row cannot be trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Longer than max-len under `--overlong drop`.
    Overlong,
    /// No supervised token to predict (e.g. truncation cut every answer away).
    Unsupervised,
}

/// Why `row` (encoded with the run's max-len) cannot be trained on, if it cannot.
pub fn drop_reason(row: &EncodedRow, overlong: Overlong) -> Option<Dropped> {
    if row.truncated && overlong == Overlong::Drop {
        Some(Dropped::Overlong)
    } else if row.supervised_targets() == 0 {
        Some(Dropped::Unsupervised)
    } else {
        None
    }
}

/// Keeps the rows that can be trained on, in order. `rows` were encoded with the run's max-len
/// (`EncodedRow::truncated` marks the ones that were cut).
pub fn filter_rows(rows: Vec<EncodedRow>, overlong: Overlong) -> (Vec<EncodedRow>, RowCounts) {
    let mut counts = RowCounts {
        total: rows.len(),
        ..RowCounts::default()
    };
    let kept: Vec<EncodedRow> = rows
        .into_iter()
        .filter(|row| match drop_reason(row, overlong) {
            Some(Dropped::Overlong) => {
                counts.dropped_overlong += 1;
                false
            }
            Some(Dropped::Unsupervised) => {
                counts.dropped_unsupervised += 1;
                false
            }
            None => {
                counts.truncated += usize::from(row.truncated);
                true
            }
        })
        .collect();
    counts.kept = kept.len();
    (kept, counts)
}

/// Where the data stream stands: the next micro-batch to run, and optimizer steps done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    /// Index of the next micro-batch within the epoch.
    pub micro_batch: usize,
    /// Optimizer steps completed in the whole run.
    pub step: usize,
}

/// How long the run lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Duration {
    Epochs(f64),
    Steps(usize),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchSettings {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub duration: Duration,
}

/// One optimizer step's data.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// 0-based index of the step in the run (the scheduler's step).
    pub index: usize,
    pub epoch: usize,
    /// Row indices (into the rows given to `DataOrder::new`), one list per micro-batch.
    pub micro_batches: Vec<Vec<usize>>,
    /// Epochs completed once this step is done, fractional (transformers' `epoch` in its logs).
    pub epoch_progress: f64,
}

/// The run's sequence of optimizer steps over rows of the given lengths.
#[derive(Clone, Debug)]
pub struct DataOrder {
    lengths: Vec<usize>,
    settings: BatchSettings,
    micro_batches_per_epoch: usize,
    total_steps: usize,
    position: DataPosition,
    /// The micro-batches of `position.epoch`, built when the epoch is entered.
    epoch_batches: Vec<Vec<usize>>,
}

impl DataOrder {
    pub fn new(lengths: Vec<usize>, settings: BatchSettings) -> Result<DataOrder> {
        ensure!(!lengths.is_empty(), "no rows to train on");
        ensure!(settings.batch_size > 0, "the batch size must be positive");
        ensure!(
            settings.grad_accum > 0,
            "gradient accumulation must be positive"
        );
        let micro_batches_per_epoch = lengths.len().div_ceil(settings.batch_size);
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(settings.grad_accum);
        let total_steps = match settings.duration {
            Duration::Steps(steps) => steps,
            Duration::Epochs(epochs) => {
                ensure!(
                    epochs.is_finite() && epochs > 0.0,
                    "the number of epochs must be positive, got {epochs}"
                );
                (epochs * steps_per_epoch as f64).ceil() as usize
            }
        };
        ensure!(total_steps > 0, "the run must have at least one step");
        let mut order = DataOrder {
            lengths,
            settings,
            micro_batches_per_epoch,
            total_steps,
            position: DataPosition::default(),
            epoch_batches: Vec::new(),
        };
        order.epoch_batches = order.epoch_micro_batches(0);
        Ok(order)
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn micro_batches_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch
            .div_ceil(self.settings.grad_accum)
    }

    /// Where the next step starts: save it with a checkpoint.
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Continues from a saved position, so the following steps equal the uninterrupted run's.
    pub fn seek(&mut self, position: DataPosition) -> Result<()> {
        let DataPosition {
            epoch,
            micro_batch,
            step,
        } = position;
        let steps_done =
            epoch * self.steps_per_epoch() + micro_batch.div_ceil(self.settings.grad_accum);
        let at_step_boundary = micro_batch % self.settings.grad_accum == 0
            || micro_batch == self.micro_batches_per_epoch;
        if micro_batch > self.micro_batches_per_epoch || !at_step_boundary || steps_done != step {
            bail!(
                "saved data position (epoch {epoch}, micro-batch {micro_batch}, step {step}) does \
                 not fit this data ({} micro-batches per epoch, {} per step): the dataset, \
                 max-len, batch size or gradient accumulation changed since the checkpoint",
                self.micro_batches_per_epoch,
                self.settings.grad_accum
            );
        }
        self.position = position;
        self.epoch_batches = self.epoch_micro_batches(epoch);
        Ok(())
    }

    /// The next optimizer step, or `None` once the run is complete.
    pub fn next_step(&mut self) -> Option<Step> {
        if self.position.step >= self.total_steps {
            return None;
        }
        if self.position.micro_batch == self.micro_batches_per_epoch {
            self.position.epoch += 1;
            self.position.micro_batch = 0;
            self.epoch_batches = self.epoch_micro_batches(self.position.epoch);
        }
        let start = self.position.micro_batch;
        let end = (start + self.settings.grad_accum).min(self.micro_batches_per_epoch);
        let step = Step {
            index: self.position.step,
            epoch: self.position.epoch,
            micro_batches: self.epoch_batches[start..end].to_vec(),
            epoch_progress: self.position.epoch as f64
                + end as f64 / self.micro_batches_per_epoch as f64,
        };
        self.position.micro_batch = end;
        self.position.step += 1;
        Some(step)
    }

    /// The micro-batches of one epoch, by the policy in the module documentation.
    pub fn epoch_micro_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let n = self.lengths.len();
        let batch_size = self.settings.batch_size;
        let mut order: Vec<usize> = (0..n).collect();
        if !self.settings.shuffle {
            // transformers' SequentialSampler: file order, no length grouping.
            return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.seed);
        rng.set_stream(epoch as u64);
        shuffle(&mut order, &mut rng);
        let mega = batch_size * (n / (4 * batch_size)).clamp(1, 50);
        let mut batches: Vec<Vec<usize>> = Vec::with_capacity(self.micro_batches_per_epoch);
        for chunk in order.chunks_mut(mega) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i]));
            batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
        }
        let longest = |batch: &Vec<usize>| batch.iter().map(|&i| self.lengths[i]).max();
        if let Some((first_longest, _)) = batches
            .iter()
            .enumerate()
            .max_by_key(|(i, batch)| (longest(batch), std::cmp::Reverse(*i)))
        {
            batches.swap(0, first_longest);
        }
        batches
    }

    /// Padding tokens an epoch's micro-batches carry (each padded to its longest row).
    pub fn padding(&self, batches: &[Vec<usize>]) -> usize {
        batches
            .iter()
            .map(|batch| {
                let longest = batch.iter().map(|&i| self.lengths[i]).max().unwrap_or(0);
                batch
                    .iter()
                    .map(|&i| longest - self.lengths[i])
                    .sum::<usize>()
            })
            .sum()
    }

    /// A fingerprint of the row lengths, saved with checkpoints to notice a changed dataset.
    pub fn fingerprint(&self) -> String {
        let mut hash = Fnv::default();
        for &len in &self.lengths {
            hash.write(&(len as u64).to_le_bytes());
        }
        format!("{} rows, fnv1a {:016x}", self.lengths.len(), hash.0)
    }
}

/// Fisher–Yates with unbiased bounded draws from raw `next_u64` words, so the order depends only
/// on the ChaCha8 stream (not on how a rand version implements `shuffle` or `gen_range`).
fn shuffle(items: &mut [usize], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let bound = i as u64 + 1;
        // Reject the top partial range of u64 so every residue is equally likely.
        let zone = u64::MAX - u64::MAX % bound;
        let j = loop {
            let x = rng.next_u64();
            if x < zone {
                break x % bound;
            }
        };
        items.swap(i, j as usize);
    }
}

/// 64-bit FNV-1a: a stable, dependency-free hash for fingerprints written into checkpoints.
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| 10 + (rng.next_u64() % 2000) as usize)
            .collect()
    }

    fn settings(batch_size: usize, grad_accum: usize, duration: Duration) -> BatchSettings {
        BatchSettings {
            batch_size,
            grad_accum,
            seed: 42,
            shuffle: true,
            duration,
        }
    }

    fn all_steps(order: &mut DataOrder) -> Vec<Step> {
        std::iter::from_fn(|| order.next_step()).collect()
    }

    #[test]
    fn every_row_once_per_epoch_and_step_counts() {
        let lens = lengths(103, 1);
        let mut order = DataOrder::new(lens, settings(4, 3, Duration::Epochs(2.0))).unwrap();
        assert_eq!(order.micro_batches_per_epoch(), 26);
        assert_eq!(order.steps_per_epoch(), 9);
        assert_eq!(order.total_steps(), 18);
        let steps = all_steps(&mut order);
        assert_eq!(steps.len(), 18);
        for epoch in 0..2 {
            let mut rows: Vec<usize> = steps
                .iter()
                .filter(|s| s.epoch == epoch)
                .flat_map(|s| s.micro_batches.iter().flatten().copied())
                .collect();
            rows.sort_unstable();
            assert_eq!(rows, (0..103).collect::<Vec<_>>());
        }
        // The epoch's last step takes the 26 - 8 * 3 = 2 micro-batches left.
        assert_eq!(steps[8].micro_batches.len(), 2);
        assert_eq!(steps[8].epoch_progress, 1.0);
        assert_eq!(steps[17].epoch_progress, 2.0);
        assert!(steps.iter().enumerate().all(|(i, s)| s.index == i));
    }

    #[test]
    fn fractional_epochs_and_max_steps() {
        let order = DataOrder::new(lengths(40, 2), settings(1, 4, Duration::Epochs(1.5))).unwrap();
        assert_eq!(order.total_steps(), 15);
        let mut order =
            DataOrder::new(lengths(40, 2), settings(1, 4, Duration::Steps(25))).unwrap();
        let steps = all_steps(&mut order);
        assert_eq!(steps.len(), 25);
        assert_eq!(steps[24].epoch, 2);
    }

    #[test]
    fn order_is_determined_by_the_seed_and_differs_per_epoch() {
        let lens = lengths(64, 3);
        let a = DataOrder::new(lens.clone(), settings(2, 1, Duration::Epochs(1.0))).unwrap();
        let b = DataOrder::new(lens.clone(), settings(2, 1, Duration::Epochs(1.0))).unwrap();
        assert_eq!(a.epoch_micro_batches(0), b.epoch_micro_batches(0));
        assert_ne!(a.epoch_micro_batches(0), a.epoch_micro_batches(1));
        let mut other_seed = settings(2, 1, Duration::Epochs(1.0));
        other_seed.seed = 7;
        let c = DataOrder::new(lens, other_seed).unwrap();
        assert_ne!(a.epoch_micro_batches(0), c.epoch_micro_batches(0));
    }

    #[test]
    fn resuming_from_a_saved_position_equals_the_uninterrupted_run() {
        let lens = lengths(57, 4);
        let s = settings(3, 2, Duration::Epochs(3.0));
        let uninterrupted = all_steps(&mut DataOrder::new(lens.clone(), s).unwrap());
        for stop in [0, 1, 9, 10, 11, 25] {
            let mut first = DataOrder::new(lens.clone(), s).unwrap();
            for _ in 0..stop {
                first.next_step();
            }
            let saved = first.position();
            let json = serde_json::to_string(&saved).unwrap();
            let mut resumed = DataOrder::new(lens.clone(), s).unwrap();
            resumed.seek(serde_json::from_str(&json).unwrap()).unwrap();
            assert_eq!(
                all_steps(&mut resumed),
                uninterrupted[stop..],
                "stop {stop}"
            );
        }
    }

    #[test]
    fn seek_refuses_a_position_from_other_data() {
        let mut order =
            DataOrder::new(lengths(10, 5), settings(1, 4, Duration::Epochs(1.0))).unwrap();
        let bad = DataPosition {
            epoch: 0,
            micro_batch: 3,
            step: 1,
        };
        assert!(order.seek(bad).unwrap_err().to_string().contains("changed"));
        let past_end = DataPosition {
            epoch: 0,
            micro_batch: 12,
            step: 3,
        };
        assert!(order.seek(past_end).is_err());
    }

    #[test]
    fn grouping_by_length_reduces_padding_and_puts_the_longest_first() {
        let lens = lengths(400, 6);
        let order = DataOrder::new(lens.clone(), settings(8, 1, Duration::Epochs(1.0))).unwrap();
        let grouped = order.epoch_micro_batches(0);
        let max_len = *lens.iter().max().unwrap();
        assert!(grouped[0].iter().any(|&i| lens[i] == max_len));
        // The same shuffle without grouping: consecutive rows of the permutation.
        let mut random: Vec<usize> = (0..lens.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        shuffle(&mut random, &mut rng);
        let random: Vec<Vec<usize>> = random.chunks(8).map(<[usize]>::to_vec).collect();
        let (g, r) = (order.padding(&grouped), order.padding(&random));
        assert!(g * 5 < r, "grouped padding {g}, random order padding {r}");
    }

    #[test]
    fn without_shuffle_order_is_file_order() {
        let lens = vec![5, 4, 1, 7, 3, 9, 2, 6];
        let mut s = settings(2, 1, Duration::Epochs(1.0));
        s.shuffle = false;
        let order = DataOrder::new(lens, s).unwrap();
        let expected = vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]];
        assert_eq!(order.epoch_micro_batches(0), expected);
    }

    #[test]
    fn filters_and_counts_rows() {
        let row = |n: usize, supervised: &[usize], truncated: bool| EncodedRow {
            ids: vec![7; n],
            labels_mask: (0..n).map(|t| supervised.contains(&t)).collect(),
            truncated,
        };
        let rows = vec![
            row(5, &[3, 4], false),
            row(8, &[6, 7], true),
            row(4, &[], false),
            row(3, &[0], false),
            row(6, &[], true),
        ];
        let (kept, counts) = filter_rows(rows.clone(), Overlong::Truncate);
        assert_eq!(kept, vec![rows[0].clone(), rows[1].clone()]);
        assert_eq!(
            counts,
            RowCounts {
                total: 5,
                kept: 2,
                truncated: 1,
                dropped_overlong: 0,
                dropped_unsupervised: 3,
            }
        );
        let (kept, counts) = filter_rows(rows.clone(), Overlong::Drop);
        assert_eq!(kept, vec![rows[0].clone()]);
        assert_eq!(
            (counts.dropped_overlong, counts.dropped_unsupervised),
            (2, 2)
        );
        assert_eq!(counts.truncated, 0);
    }

    #[test]
    fn empty_or_degenerate_settings_are_errors() {
        assert!(DataOrder::new(vec![], settings(1, 1, Duration::Epochs(1.0))).is_err());
        assert!(DataOrder::new(vec![3], settings(0, 1, Duration::Epochs(1.0))).is_err());
        assert!(DataOrder::new(vec![3], settings(1, 0, Duration::Epochs(1.0))).is_err());
        assert!(DataOrder::new(vec![3], settings(1, 1, Duration::Epochs(0.0))).is_err());
        assert!(DataOrder::new(vec![3], settings(1, 1, Duration::Steps(0))).is_err());
    }
}
