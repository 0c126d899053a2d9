//! Data-parallel training across processes ("ranks", one device each): every rank reads the same
//! data order, runs its [`share`] of each optimizer step's micro-batches, and the ranks sum their
//! gradients before every rank applies the same update.
//!
//! [`Ranks`] is the few collective operations the trainer needs: [`Single`] (one process, always
//! built) and, with the cargo feature `mpi`, `Mpi` over MPI_COMM_WORLD (the rsmpi crate).
//!
//! Reproducibility: MPI's own reductions add in an order that depends on the implementation, its
//! algorithm and the message sizes, so gradients are never summed by MPI. [`Ranks::sum_in_rank_order`]
//! only moves numbers and adds them here, every element as `((rank 0 + rank 1) + rank 2) + ...`:
//! an all-to-all gives rank j every rank's copy of slice j (1/R of the gradient), rank j sums it,
//! and an all-gather returns the sums. Each rank sends and receives 2 (R-1)/R of the gradient, as
//! in a ring all-reduce, and no rank holds R copies, so full fine-tuning scales as LoRA does. The
//! cost over a device all-reduce (NCCL/RCCL, which wgpu cannot reach): the gradients cross the
//! host bus twice (read back, written back) and the adds run on the CPU.
//!
//! Failures: a rank's error at one of the points where the ranks meet ([`agree`]: the device, the
//! start, each step, each checkpoint) stops every rank with [`RankFailed`], which names the rank;
//! an error anywhere else stops the job at once ([`Ranks::abort`]) after naming the rank.
use std::fmt;
use std::ops::Range;

use anyhow::{Context, Result};

/// The collective operations of a data-parallel job. Every rank calls each of them in the same
/// order.
pub trait Ranks {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Replaces `values` on every rank by the element-wise sum over the ranks, added in rank order
    /// (the same bits on every rank, whatever the MPI implementation). Every rank passes as many.
    fn sum_in_rank_order(&self, values: &mut [f32]);
    /// Ends every rank of the job with `code` (an error outside the points where ranks agree).
    fn abort(&self, code: i32) -> !;
    /// Bytes of f32 values summed across ranks so far, and the seconds that took.
    fn summed(&self) -> (u64, f64);
}

/// One process: nothing to exchange.
pub struct Single;

impl Ranks for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }

    fn sum_in_rank_order(&self, _values: &mut [f32]) {}

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    fn summed(&self) -> (u64, f64) {
        (0, 0.0)
    }
}

/// The ranks of this job: MPI's when built with the `mpi` feature (a process not started by an
/// MPI launcher is a job of one), else one process.
pub fn ranks() -> Result<Box<dyn Ranks>> {
    #[cfg(feature = "mpi")]
    return Ok(Box::new(mpi_ranks::Mpi::init()?));
    #[cfg(not(feature = "mpi"))]
    Ok(Box::new(Single))
}

/// The local-rank variables of the launchers (Open MPI, MPICH / Intel MPI, Slurm's srun).
const LOCAL_RANK_VARS: [&str; 3] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];

/// The device index of this rank: its rank on its machine, from the launcher's variables
/// ([`LOCAL_RANK_VARS`]); None when no launcher set one.
pub fn local_rank() -> Result<Option<usize>> {
    local_rank_in(|var| std::env::var(var).ok())
}

/// [`local_rank`] from the variables `get` returns.
fn local_rank_in(get: impl Fn(&str) -> Option<String>) -> Result<Option<usize>> {
    for var in LOCAL_RANK_VARS {
        if let Some(value) = get(var) {
            return value
                .trim()
                .parse()
                .map(Some)
                .with_context(|| format!("{var} = {value:?} is not a local rank (0, 1, ...)"));
        }
    }
    Ok(None)
}

/// The micro-batches (of a step's `n`) that `rank` of `size` runs: consecutive ones, so that
/// adding the ranks' gradients in rank order adds the micro-batches in order; the shares differ
/// by at most one (a step's last micro-batches may leave a rank none: it then adds zeros).
pub fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    rank * n / size..(rank + 1) * n / size
}

/// A failure of one or more ranks that every rank has stopped on.
#[derive(Debug)]
pub struct RankFailed {
    /// The ranks that failed, in order.
    pub failed: Vec<usize>,
    pub size: usize,
    /// The first failed rank's error.
    pub message: String,
}

impl fmt::Display for RankFailed {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let (first, size) = (self.failed[0], self.size);
        match self.failed.len() {
            n if n == size => write!(f, "every rank failed (rank 0: {})", self.message),
            1 => write!(
                f,
                "rank {first} of {size} failed, so every rank stopped: {}",
                self.message
            ),
            _ => write!(
                f,
                "ranks {:?} of {size} failed, so every rank stopped (rank {first}: {})",
                self.failed, self.message
            ),
        }
    }
}

impl std::error::Error for RankFailed {}

const OK: u8 = 0;
const FAILED: u8 = 1;

/// Every rank's `result` of the same stage: each rank's bytes in rank order when every rank
/// succeeded; otherwise, on every rank, [`RankFailed`] for the first rank that failed. One process
/// gets its own result back (its error unchanged).
pub fn all_gather_ok(ranks: &dyn Ranks, result: Result<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
    if ranks.size() == 1 {
        return result.map(|bytes| vec![bytes]);
    }
    let mine = match &result {
        Ok(bytes) => [&[OK][..], bytes].concat(),
        Err(err) => [&[FAILED][..], format!("{err:#}").as_bytes()].concat(),
    };
    let all = ranks.all_gather(&mine);
    let failed: Vec<usize> = (0..all.len()).filter(|&r| all[r][0] == FAILED).collect();
    if let Some(&first) = failed.first() {
        return Err(RankFailed {
            message: String::from_utf8_lossy(&all[first][1..]).into_owned(),
            failed,
            size: ranks.size(),
        }
        .into());
    }
    Ok(all.into_iter().map(|m| m[1..].to_vec()).collect())
}

/// `result` when every rank succeeded at the same stage, else [`RankFailed`] on every rank.
pub fn agree<T>(ranks: &dyn Ranks, result: Result<T>) -> Result<T> {
    if ranks.size() == 1 {
        return result;
    }
    let status = match &result {
        Ok(_) => Ok(Vec::new()),
        Err(err) => Err(anyhow::anyhow!("{err:#}")),
    };
    all_gather_ok(ranks, status)?;
    result
}

/// Whether any rank's `flag` is set (e.g. a stop request that reached one rank).
pub fn any(ranks: &dyn Ranks, flag: bool) -> bool {
    match ranks.size() {
        1 => flag,
        _ => ranks
            .all_gather(&[u8::from(flag)])
            .iter()
            .any(|f| f[0] != 0),
    }
}

/// Refuses a job whose ranks have different `what`s (`value` on each: a fingerprint), naming the
/// first rank whose `value` differs from rank 0's.
pub fn check_same(ranks: &dyn Ranks, what: &str, value: &str) -> Result<()> {
    let all = all_gather_ok(ranks, Ok(value.as_bytes().to_vec()))?;
    match all.iter().position(|v| v != &all[0]) {
        None => Ok(()),
        Some(rank) => Err(RankFailed {
            failed: vec![rank],
            size: ranks.size(),
            message: format!(
                "its {what} differ from rank 0's ({} vs {}): every rank must train the same \
                 settings, model and data",
                String::from_utf8_lossy(&all[rank]),
                String::from_utf8_lossy(&all[0])
            ),
        }
        .into()),
    }
}

/// What `--dry-run` adds for a job of several ranks.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// Each rank's peak device memory during its step, in rank order.
    pub peaks: Vec<u64>,
    /// Bytes of f32 gradients summed across the ranks every optimizer step.
    pub summed_bytes: u64,
}

impl fmt::Display for JobReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
        let n = self.peaks.len() as u64;
        writeln!(
            f,
            "{n} ranks sum {:.2} MiB of gradients every optimizer step (each rank sends and \
             receives {:.2} MiB of it)",
            mib(self.summed_bytes),
            mib(2 * (n - 1) * self.summed_bytes / n)
        )?;
        write!(f, "peak device memory per rank:")?;
        for (rank, &peak) in self.peaks.iter().enumerate() {
            write!(f, " rank {rank} {:.1} MiB", mib(peak))?;
        }
        Ok(())
    }
}

#[cfg(feature = "mpi")]
mod mpi_ranks {
    use std::cell::Cell;
    use std::time::Instant;

    use anyhow::{Context, Result};
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::{Count, Threading};

    use super::{share, Ranks};

    /// MPI_COMM_WORLD. Only the main thread calls MPI (signal handling and wgpu have threads of
    /// their own); MPI is finalized when this is dropped.
    pub struct Mpi {
        _universe: Universe,
        world: SimpleCommunicator,
        summed: Cell<(u64, f64)>,
    }

    /// Offsets of consecutive parts of the given lengths.
    fn displacements(counts: &[Count]) -> Vec<Count> {
        counts
            .iter()
            .scan(0, |at, &n| {
                let start = *at;
                *at += n;
                Some(start)
            })
            .collect()
    }

    /// An element count as MPI's (C int) count.
    fn count(n: usize) -> Count {
        Count::try_from(n).expect("a collective of more than 2^31 elements")
    }

    impl Mpi {
        pub fn init() -> Result<Mpi> {
            let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
                .context("initializing MPI: it was initialized already")?;
            let world = universe.world();
            Ok(Mpi {
                _universe: universe,
                world,
                summed: Cell::new((0, 0.0)),
            })
        }
    }

    impl Ranks for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
            let mut lens = vec![0u64; self.size()];
            self.world
                .all_gather_into(&(bytes.len() as u64), &mut lens[..]);
            let counts: Vec<Count> = lens.iter().map(|&n| count(n as usize)).collect();
            let displs = displacements(&counts);
            let mut all = vec![0u8; lens.iter().sum::<u64>() as usize];
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(bytes, &mut parts);
            counts
                .iter()
                .zip(&displs)
                .map(|(&n, &at)| all[at as usize..(at + n) as usize].to_vec())
                .collect()
        }

        fn sum_in_rank_order(&self, values: &mut [f32]) {
            let start = Instant::now();
            let (rank, size) = (self.rank(), self.size());
            let slices: Vec<_> = (0..size).map(|r| share(values.len(), r, size)).collect();
            let slice_counts: Vec<Count> = slices.iter().map(|s| count(s.len())).collect();
            let slice_displs: Vec<Count> = slices.iter().map(|s| count(s.start)).collect();
            // Every rank's copy of my slice, in rank order.
            let mine = slices[rank].len();
            let mut copies = vec![0f32; mine * size];
            {
                let send = Partition::new(&*values, &slice_counts[..], &slice_displs[..]);
                let copy_counts = vec![count(mine); size];
                let copy_displs = displacements(&copy_counts);
                let mut recv =
                    PartitionMut::new(&mut copies[..], &copy_counts[..], &copy_displs[..]);
                self.world.all_to_all_varcount_into(&send, &mut recv);
            }
            let mut sum = copies[..mine].to_vec();
            for copy in copies.chunks(mine.max(1)).skip(1) {
                for (s, c) in sum.iter_mut().zip(copy) {
                    *s += c;
                }
            }
            let len = values.len();
            let mut all = PartitionMut::new(values, &slice_counts[..], &slice_displs[..]);
            self.world.all_gather_varcount_into(&sum[..], &mut all);
            let (bytes, seconds) = self.summed.get();
            self.summed.set((
                bytes + 4 * len as u64,
                seconds + start.elapsed().as_secs_f64(),
            ));
        }

        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }

        fn summed(&self) -> (u64, f64) {
            self.summed.get()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_a_step_in_order_and_differ_by_at_most_one() {
        for n in 0..12 {
            for size in 1..6 {
                let shares: Vec<Range<usize>> = (0..size).map(|r| share(n, r, size)).collect();
                let covered: Vec<usize> = shares.iter().cloned().flatten().collect();
                assert_eq!(covered, (0..n).collect::<Vec<_>>(), "n {n}, size {size}");
                let lens: Vec<usize> = shares.iter().map(Range::len).collect();
                let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(max - min <= 1, "n {n}, size {size}: {lens:?}");
            }
        }
    }

    #[test]
    fn two_ranks_of_two_accumulation_steps_split_four_micro_batches() {
        assert_eq!([share(4, 0, 2), share(4, 1, 2)], [0..2, 2..4]);
        // A last step of three micro-batches over two ranks; of one: rank 0 adds zeros.
        assert_eq!([share(3, 0, 2), share(3, 1, 2)], [0..1, 1..3]);
        assert_eq!([share(1, 0, 2), share(1, 1, 2)], [0..0, 0..1]);
    }

    #[test]
    fn one_process_keeps_its_own_results_and_errors() {
        assert_eq!(
            all_gather_ok(&Single, Ok(vec![1, 2])).unwrap(),
            [vec![1, 2]]
        );
        let err = agree::<()>(&Single, Err(anyhow::anyhow!("no device 3"))).unwrap_err();
        assert_eq!(err.to_string(), "no device 3");
        assert!(err.downcast_ref::<RankFailed>().is_none());
        assert!(any(&Single, true) && !any(&Single, false));
        check_same(&Single, "settings", "a").unwrap();
        let mut values = [1.0, 2.0];
        Single.sum_in_rank_order(&mut values);
        assert_eq!(values, [1.0, 2.0]);
    }

    #[test]
    fn the_local_rank_comes_from_the_first_launcher_variable_set() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                set.iter()
                    .find(|(name, _)| *name == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_in(vars(&[])).unwrap(), None);
        let slurm_and_mpich = vars(&[("SLURM_LOCALID", "3"), ("MPI_LOCALRANKID", "1")]);
        assert_eq!(local_rank_in(slurm_and_mpich).unwrap(), Some(1));
        let err = local_rank_in(vars(&[("SLURM_LOCALID", "x")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("SLURM_LOCALID = \"x\" is not a local rank"),
            "{err}"
        );
    }
}
