//! Token embedding (`shaders/embedding.wgsl`): the forward gathers rows of a [V, D] bf16 or f32
//! table into [T, D] f32; the backward adds the rows of dout into the f32 gradient of the table
//! (full fine-tuning), deterministically and without float atomics.
//!
//! Launchers take [`TokenIds`], the ids on both sides: the device tensor the kernels read, and the
//! host copy from which they reject ids outside the vocabulary before anything is launched (an
//! out-of-range id would otherwise read or write past the table) and build the backward's index
//! of positions per distinct id. The trainer has the ids on the host anyway.
use std::ops::Range;

use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::check::{max_error, random, round_bf16, to_f64, Check};
use crate::batch::Batch;
use crate::bench::{time, BenchConfig, BenchResult};
use crate::gpu::{linear_groups, rowwise_groups, Gpu};
use crate::plan::RowwiseVariant;
use crate::shader::{params, Const, Kernel, EMBEDDING};
use crate::tensor::{row_segments, DType, Tensor};

params!(
    EMBEDDING,
    struct Params {
        tokens: u32,
        cols: u32,
        token_start: u32,
        token_off: u32,
        vocab_start: u32,
        vocab_rows: u32,
        first_id: u32,
        id_count: u32,
    }
);

/// Token ids, uploaded as a [T] u32 tensor, with the host copy the launchers check and index.
pub struct TokenIds {
    host: Vec<u32>,
    tensor: Tensor,
}

impl TokenIds {
    pub fn new(gpu: &Gpu, ids: &[u32]) -> Result<TokenIds> {
        Ok(TokenIds {
            host: ids.to_vec(),
            tensor: Tensor::from_u32(gpu, &[ids.len()], ids)?,
        })
    }

    pub fn host(&self) -> &[u32] {
        &self.host
    }

    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The device tensor, e.g. for [`Batch::keep`] once the launches that read it are recorded.
    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }

    /// Fails on the first id outside a vocabulary of `vocab` rows, naming it and its position.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        match self.host.iter().position(|&id| id as usize >= vocab) {
            Some(pos) => bail!(
                "token id {} at position {pos} is outside the vocabulary (ids 0..{vocab})",
                self.host[pos]
            ),
            None => Ok(()),
        }
    }
}

/// A kernel of embedding.wgsl; the forward takes a workgroup or a thread per token as `variant`
/// says, the backward ignores it.
fn kernel(entry: &'static str, table_bf16: bool, variant: RowwiseVariant) -> Kernel {
    let rows = match entry {
        "embedding_forward" => variant.rows_per_group(),
        _ => 1,
    };
    Kernel::new(&EMBEDDING, entry)
        .with("TABLE_BF16", Const::Bool(table_bf16))
        .with("ROWS_PER_GROUP", Const::U32(rows))
}

pub fn variants() -> Vec<Kernel> {
    let mut all = Vec::new();
    for &variant in RowwiseVariant::ALL {
        for table_bf16 in [false, true] {
            all.push(kernel("embedding_forward", table_bf16, variant));
        }
    }
    // The gradient table is always f32.
    all.push(kernel(
        "embedding_backward",
        false,
        RowwiseVariant::Workgroup,
    ));
    all
}

/// Checks the table ([V, D]) and the activations ([T, D] f32) against the ids; returns (V, D).
fn check_shapes(
    ids: &TokenIds,
    table: (&str, &Tensor),
    rows: (&str, &Tensor),
) -> Result<(usize, usize)> {
    let (role, t) = table;
    if t.shape().len() != 2 {
        bail!(
            "{role}: expected a [vocab, dim] table, got shape {:?}",
            t.shape()
        );
    }
    let (vocab, dim) = (t.rows(), t.row_len());
    rows.1
        .expect(rows.0, &[ids.host.len(), dim], Some(DType::F32))?;
    ids.check_vocab(vocab)?;
    Ok((vocab, dim))
}

/// `out[t] = table[ids[t]]`: table [V, D] bf16 or f32, out [T, D] f32.
pub fn embedding_forward(
    batch: &mut Batch,
    ids: &TokenIds,
    table: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let (vocab, dim) = check_shapes(ids, ("embedding table", table), ("embedding out", out))?;
    let table_bf16 = match table.dtype() {
        DType::BF16 => true,
        DType::F32 => false,
        d => bail!("embedding table: expected BF16 or F32, got {d:?}"),
    };
    let kernel = kernel("embedding_forward", table_bf16, batch.gpu.plan.rowwise);
    let ids_buffer = &ids.tensor.chunks()[0];
    let segments = row_segments(ids.host.len(), &[out]);
    // One dispatch per table chunk and token segment that has an id in the chunk.
    for vocab_rows in row_segments(vocab, &[table]) {
        for seg in &segments {
            if !any_in(&ids.host[seg.clone()], &vocab_rows) {
                continue;
            }
            let ro = out.row(seg.start);
            let params = Params {
                tokens: seg.len() as u32,
                cols: dim as u32,
                token_start: seg.start as u32,
                token_off: ro.offset,
                vocab_start: vocab_rows.start as u32,
                vocab_rows: vocab_rows.len() as u32,
                first_id: 0,
                id_count: 0,
            };
            let buffers = [ids_buffer, table.row(vocab_rows.start).buffer, ro.buffer];
            batch.dispatch(
                &kernel,
                &params,
                &buffers,
                rowwise_groups(batch.gpu, seg.len()),
            )?;
        }
    }
    Ok(())
}

/// `dtable[ids[t]] += dout[t]` for every token t, in ascending t per id (deterministic):
/// dout [T, D] f32, dtable [V, D] f32. Always accumulates (the tied LM head adds to the same
/// gradient); start from a zeroed table. The index of positions per distinct id is built here on
/// the host and uploaded with the batch.
pub fn embedding_backward(
    batch: &mut Batch,
    ids: &TokenIds,
    dout: &Tensor,
    dtable: &Tensor,
) -> Result<()> {
    let (vocab, dim) = check_shapes(ids, ("embedding dtable", dtable), ("embedding dout", dout))?;
    if dtable.dtype() != DType::F32 {
        bail!("embedding dtable: expected F32, got {:?}", dtable.dtype());
    }
    let index = PositionIndex::new(&ids.host);
    let gpu = batch.gpu;
    let uniq = Tensor::from_u32(gpu, &[index.uniq.len()], &index.uniq)?;
    let starts = Tensor::from_u32(gpu, &[index.starts.len()], &index.starts)?;
    let positions = Tensor::from_u32(gpu, &[index.positions.len()], &index.positions)?;
    let kernel = kernel("embedding_backward", false, RowwiseVariant::Workgroup);
    let segments = row_segments(ids.host.len(), &[dout]);
    for vocab_rows in row_segments(vocab, &[dtable]) {
        let first = index
            .uniq
            .partition_point(|&id| (id as usize) < vocab_rows.start);
        let end = index
            .uniq
            .partition_point(|&id| (id as usize) < vocab_rows.end);
        if first == end {
            continue;
        }
        for seg in &segments {
            if !any_in(&ids.host[seg.clone()], &vocab_rows) {
                continue;
            }
            let rd = dout.row(seg.start);
            let params = Params {
                tokens: seg.len() as u32,
                cols: dim as u32,
                token_start: seg.start as u32,
                token_off: rd.offset,
                vocab_start: vocab_rows.start as u32,
                vocab_rows: vocab_rows.len() as u32,
                first_id: first as u32,
                id_count: (end - first) as u32,
            };
            let buffers = [
                rd.buffer,
                &uniq.chunks()[0],
                &starts.chunks()[0],
                &positions.chunks()[0],
                dtable.row(vocab_rows.start).buffer,
            ];
            batch.dispatch(
                &kernel,
                &params,
                &buffers,
                linear_groups(gpu, (end - first) as u32),
            )?;
        }
    }
    for index in [uniq, starts, positions] {
        batch.keep(index);
    }
    Ok(())
}

/// Whether any of `ids` lies in the vocabulary rows `rows` (else a dispatch would do nothing).
fn any_in(ids: &[u32], rows: &Range<usize>) -> bool {
    ids.iter().any(|&id| rows.contains(&(id as usize)))
}

/// Token positions grouped by id (CSR): the positions of `uniq[k]` are
/// `positions[starts[k]..starts[k + 1]]`, ascending; `uniq` is ascending.
struct PositionIndex {
    uniq: Vec<u32>,
    starts: Vec<u32>,
    positions: Vec<u32>,
}

impl PositionIndex {
    fn new(ids: &[u32]) -> PositionIndex {
        let mut positions: Vec<u32> = (0..ids.len() as u32).collect();
        // Stable: positions stay ascending within an id.
        positions.sort_by_key(|&t| ids[t as usize]);
        let (mut uniq, mut starts) = (Vec::new(), Vec::new());
        for (j, &t) in positions.iter().enumerate() {
            let id = ids[t as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                starts.push(j as u32);
            }
        }
        starts.push(positions.len() as u32);
        PositionIndex {
            uniq,
            starts,
            positions,
        }
    }
}

pub mod cpu {
    pub fn forward(ids: &[u32], table: &[f64], dim: usize) -> Vec<f64> {
        ids.iter()
            .flat_map(|&id| table[id as usize * dim..][..dim].iter().copied())
            .collect()
    }

    /// The table's gradient ([vocab, dim]) of the loss `Σ dout ⊙ out`.
    pub fn backward(ids: &[u32], dout: &[f64], vocab: usize, dim: usize) -> Vec<f64> {
        let mut dtable = vec![0.0; vocab * dim];
        for (&id, row) in ids.iter().zip(dout.chunks(dim)) {
            for (d, g) in dtable[id as usize * dim..][..dim].iter_mut().zip(row) {
                *d += g;
            }
        }
        dtable
    }
}

/// Random ids with many repeats (half of them drawn from the first, middle and last ids).
pub fn random_ids(seed: u64, tokens: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hot = [0, vocab / 2, vocab - 1];
    (0..tokens)
        .map(|_| if rng.gen_bool(0.5) { hot[rng.gen_range(0..3)] } else { rng.gen_range(0..vocab) } as u32)
        .collect()
}

/// Forward and backward (accumulating into a random gradient) on random ids against [`cpu`].
pub fn check(
    gpu: &Gpu,
    tokens: usize,
    vocab: usize,
    dim: usize,
    table_bf16: bool,
    seed: u64,
) -> Result<Vec<Check>> {
    let ids_host = random_ids(seed, tokens, vocab);
    let ids = TokenIds::new(gpu, &ids_host)?;
    let table_values = random(seed + 1, vocab * dim, 1.0);
    let (table, table_values) = if table_bf16 {
        (
            Tensor::from_f32_as_bf16(gpu, &[vocab, dim], &table_values)?,
            round_bf16(&table_values),
        )
    } else {
        (
            Tensor::from_f32(gpu, &[vocab, dim], &table_values)?,
            table_values,
        )
    };
    let dout_values = random(seed + 2, tokens * dim, 1.0);
    let dout = Tensor::from_f32(gpu, &[tokens, dim], &dout_values)?;
    let dtable_start = random(seed + 3, vocab * dim, 1.0);
    let dtable = Tensor::from_f32(gpu, &[vocab, dim], &dtable_start)?;
    let out = Tensor::zeros(gpu, &[tokens, dim], DType::F32)?;
    let mut batch = gpu.batch();
    embedding_forward(&mut batch, &ids, &table, &out)?;
    embedding_backward(&mut batch, &ids, &dout, &dtable)?;
    batch.submit();
    let dtable_ref: Vec<f64> = cpu::backward(&ids_host, &to_f64(&dout_values), vocab, dim)
        .iter()
        .zip(&dtable_start)
        .map(|(g, &s)| g + s as f64)
        .collect();
    let label = format!(
        "T={tokens} V={vocab} D={dim} {}",
        if table_bf16 { "bf16" } else { "f32" }
    );
    Ok(vec![
        Check {
            kernel: "embedding_forward".into(),
            shape: label.clone(),
            max_err: max_error(
                &out.to_f32(gpu)?,
                &cpu::forward(&ids_host, &to_f64(&table_values), dim),
            ),
            tolerance: 0.0,
        },
        Check {
            kernel: "embedding_backward".into(),
            shape: label,
            max_err: max_error(&dtable.to_f32(gpu)?, &dtable_ref),
            tolerance: 1e-6,
        },
    ])
}

pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = check(gpu, 67, 1001, 130, true, 1)?;
    checks.extend(check(gpu, 5, 37, 3, false, 2)?);
    Ok(checks)
}

/// Forward (bf16 table) and backward (f32 gradient table) at [T, hidden] with the model's
/// vocabulary and random ids. Minimal bytes: the ids, the rows read and written; the backward
/// reads and writes each distinct id's gradient row once (the host-built index is not timed).
pub fn bench(gpu: &Gpu, config: &BenchConfig) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let t = config.seq_len;
    for &model in &config.shapes {
        let (vocab, dim) = (model.vocab, model.hidden);
        let ids_host: Vec<u32> = {
            let mut rng = StdRng::seed_from_u64(1);
            (0..t).map(|_| rng.gen_range(0..vocab as u32)).collect()
        };
        let distinct = PositionIndex::new(&ids_host).uniq.len();
        let ids = TokenIds::new(gpu, &ids_host)?;
        let label = format!("{} [{t}, {dim}] V={vocab}", model.name);
        let rows = (t * dim * 4) as f64;
        {
            let table = Tensor::zeros(gpu, &[vocab, dim], DType::BF16)?;
            let out = Tensor::zeros(gpu, &[t, dim], DType::F32)?;
            let fwd = time(gpu, config.reps, |b| {
                embedding_forward(b, &ids, &table, &out)
            })?;
            let bytes = (t * 4) as f64 + 1.5 * rows;
            results.push(BenchResult {
                kernel: "embedding_forward".into(),
                shape: label.clone(),
                time: fwd,
                flops: 0.0,
                bytes,
            });
        }
        let dout = Tensor::zeros(gpu, &[t, dim], DType::F32)?;
        let dtable = Tensor::zeros(gpu, &[vocab, dim], DType::F32)?;
        let bwd = time(gpu, config.reps, |b| {
            embedding_backward(b, &ids, &dout, &dtable)
        })?;
        let bytes = (t * 4 * 2 + distinct * 4 * 2) as f64 + rows + (distinct * dim * 8) as f64;
        results.push(BenchResult {
            kernel: "embedding_backward".into(),
            shape: label,
            time: bwd,
            flops: 0.0,
            bytes,
        });
    }
    Ok(results)
}
