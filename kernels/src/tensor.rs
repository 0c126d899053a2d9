//! Device tensors.
//!
//! A tensor is row-major; its rows are its last dimension. It is stored as one or more chunks, each
//! a buffer of whole rows no larger than one storage binding (`Gpu::max_binding_bytes`), so tensors
//! of any size bind on any adapter. Launchers walk row ranges that lie inside one chunk of every
//! tensor involved ([`row_segments`]) and pass each kernel the row offset inside its chunk.
use std::ops::Range;

use anyhow::{bail, Result};

use crate::gpu::{read_buffer, Allocation, Gpu};

/// Every chunk's buffer is a whole number of these bytes, so that kernels may read it as vec4s
/// (the subgroup GEMM's 128-bit loads).
pub const BUFFER_ALIGN: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// bfloat16, two per u32 word, even element in the low half.
    BF16,
    U32,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::BF16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    rows_per_chunk: usize,
    chunks: Vec<wgpu::Buffer>,
    /// The chunks' bytes, counted in [`Gpu::memory`] while the tensor lives.
    _allocation: Allocation,
    /// A handle on another tensor's buffers ([`Tensor::alias`]): owns no device bytes.
    aliased: bool,
}

/// Where a row lives: the chunk's buffer and the element offset of the row inside it.
#[derive(Clone, Copy)]
pub struct RowAt<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// Element index (not word index, for bf16) of the row's first element inside `buffer`.
    pub offset: u32,
}

impl Tensor {
    /// Fills the tensor with zeros (a buffer clear submitted on the queue, ordered after every
    /// batch submitted before it); e.g. gradients at the start of an optimizer step. Nothing in a
    /// dry run.
    pub fn clear(&self, gpu: &Gpu) {
        if gpu.is_dry_run() {
            return;
        }
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        for chunk in self.chunks() {
            encoder.clear_buffer(chunk, 0, None);
        }
        gpu.queue.submit([encoder.finish()]);
    }

    /// A zero-filled tensor (wgpu zero-initialises new buffers).
    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros_within(gpu, shape, dtype, gpu.max_binding_bytes)
    }

    /// A 1-D f32 scratch tensor of `len` elements in one buffer, up to the device's binding limit
    /// rather than `max_binding_bytes`: for a kernel that indexes its scratch as a whole.
    pub(crate) fn scratch(gpu: &Gpu, len: usize) -> Result<Tensor> {
        let limit = gpu
            .limits
            .max_storage_buffer_binding_size
            .min(gpu.limits.max_buffer_size);
        Tensor::zeros_within(gpu, &[len], DType::F32, limit)
    }

    /// A zero-filled tensor in chunks of at most `binding_bytes`.
    fn zeros_within(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        binding_bytes: u64,
    ) -> Result<Tensor> {
        let row_len = *shape.last().unwrap_or(&1);
        let rows: usize = shape.iter().rev().skip(1).product();
        if shape.contains(&0) {
            bail!("tensor shape {shape:?} has a zero dimension");
        }
        let row_bytes = (row_len * dtype.bytes()) as u64;
        let mut rows_per_chunk = (binding_bytes / row_bytes) as usize;
        // bf16 chunks must start on a word boundary.
        if dtype == DType::BF16 && row_len % 2 == 1 && rows_per_chunk < rows {
            rows_per_chunk &= !1;
        }
        if rows_per_chunk == 0 {
            let what = if row_len % 2 == 1 && dtype == DType::BF16 {
                "two rows (an odd-length bf16 row does not end on a word)"
            } else {
                "a row"
            };
            bail!(
                "{what} of tensor {shape:?} ({row_bytes} bytes per row) do not fit one storage \
                 binding ({binding_bytes} bytes) on this device"
            );
        }
        let rows_per_chunk = rows_per_chunk.min(rows);
        let mut chunks = Vec::new();
        for start in (0..rows).step_by(rows_per_chunk) {
            let n = rows_per_chunk.min(rows - start);
            let bytes = ((n * row_len * dtype.bytes()) as u64).next_multiple_of(BUFFER_ALIGN);
            chunks.push(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let bytes = chunks.iter().map(wgpu::Buffer::size).sum();
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            rows_per_chunk,
            chunks,
            _allocation: gpu.allocate(bytes),
            aliased: false,
        })
    }

    /// A tensor holding `bytes` (the raw little-endian elements, e.g. straight from a memory-mapped
    /// safetensors file); see [`Tensor::write_bytes`].
    pub fn from_bytes(gpu: &Gpu, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let t = Tensor::zeros(gpu, shape, dtype)?;
        t.write_bytes(gpu, bytes)?;
        Ok(t)
    }

    /// Overwrites the tensor with `bytes` (its raw little-endian elements), chunk by chunk without
    /// an intermediate copy. The write is queued: it runs after every batch submitted before it
    /// and before any submitted after it, so work recorded but not yet submitted must not read
    /// the old values. A dry run checks the length and writes nothing.
    pub fn write_bytes(&self, gpu: &Gpu, bytes: &[u8]) -> Result<()> {
        let dtype = self.dtype;
        if bytes.len() != self.numel() * dtype.bytes() {
            bail!(
                "tensor {:?} {dtype:?} needs {} bytes, got {}",
                self.shape,
                self.numel() * dtype.bytes(),
                bytes.len()
            );
        }
        if gpu.is_dry_run() {
            return Ok(());
        }
        let chunk_bytes = self.rows_per_chunk * self.row_len() * dtype.bytes();
        for (buffer, part) in self.chunks.iter().zip(bytes.chunks(chunk_bytes)) {
            if part.len() % 4 == 0 {
                gpu.queue.write_buffer(buffer, 0, part);
            } else {
                // An odd count of bf16 elements: the last word needs its padding half.
                let mut padded = part.to_vec();
                padded.resize(part.len().next_multiple_of(4), 0);
                gpu.queue.write_buffer(buffer, 0, &padded);
            }
        }
        Ok(())
    }

    /// A second handle on this tensor's device buffers that owns none of their bytes (counted
    /// once, by the original): e.g. each streamed decoder layer's view of the ring slot it runs
    /// in. Writes through either are seen by both.
    pub fn alias(&self, gpu: &Gpu) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            rows_per_chunk: self.rows_per_chunk,
            chunks: self.chunks.clone(),
            _allocation: gpu.allocate(0),
            aliased: true,
        }
    }

    pub fn from_f32(gpu: &Gpu, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Tensor::from_bytes(gpu, shape, DType::F32, bytemuck::cast_slice(data))
    }

    /// Overwrites an f32 tensor with `data` (queued: batches submitted after this see it), e.g.
    /// gradients summed across processes. A dry run writes nothing.
    pub fn write_f32(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        if self.dtype != DType::F32 || data.len() != self.numel() {
            bail!(
                "writing {} f32 values into a {:?} {:?} tensor",
                data.len(),
                self.shape,
                self.dtype
            );
        }
        if gpu.is_dry_run() {
            return Ok(());
        }
        let chunk_len = self.rows_per_chunk * self.row_len();
        for (buffer, part) in self.chunks.iter().zip(data.chunks(chunk_len)) {
            gpu.queue
                .write_buffer(buffer, 0, bytemuck::cast_slice(part));
        }
        Ok(())
    }

    /// f32 values rounded to bf16 (round to nearest even) on the host.
    pub fn from_f32_as_bf16(gpu: &Gpu, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let bf: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
        Tensor::from_bytes(gpu, shape, DType::BF16, bytemuck::cast_slice(&bf))
    }

    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        Tensor::from_bytes(gpu, shape, DType::U32, bytemuck::cast_slice(data))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of the last dimension.
    pub fn row_len(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Number of rows (product of all but the last dimension).
    pub fn rows(&self) -> usize {
        self.numel() / self.row_len()
    }

    pub fn chunks(&self) -> &[wgpu::Buffer] {
        &self.chunks
    }

    /// Bytes on the device that this tensor owns (none for an alias).
    pub fn device_bytes(&self) -> u64 {
        match self.aliased {
            true => 0,
            false => self.chunks.iter().map(|b| b.size()).sum(),
        }
    }

    /// Row boundaries between chunks (exclusive of 0 and rows).
    pub fn chunk_starts(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.chunks.len()).map(|c| c * self.rows_per_chunk)
    }

    /// The chunk holding `row`, and the row's element offset inside it.
    pub fn row(&self, row: usize) -> RowAt<'_> {
        let c = row / self.rows_per_chunk;
        RowAt {
            buffer: &self.chunks[c],
            offset: ((row - c * self.rows_per_chunk) * self.row_len()) as u32,
        }
    }

    /// The rows stored in the chunk that holds `row`.
    pub fn chunk_rows(&self, row: usize) -> Range<usize> {
        let start = row / self.rows_per_chunk * self.rows_per_chunk;
        start..(start + self.rows_per_chunk).min(self.rows())
    }

    /// Checks the shape, naming the tensor's role in the error.
    pub fn expect(&self, role: &str, shape: &[usize], dtype: Option<DType>) -> Result<()> {
        if self.shape != shape {
            bail!("{role}: expected shape {shape:?}, got {:?}", self.shape);
        }
        if let Some(d) = dtype {
            if self.dtype != d {
                bail!("{role}: expected {d:?}, got {:?}", self.dtype);
            }
        }
        Ok(())
    }

    /// Copies the tensor back to the host as raw bytes (blocking; for tests, checkpoints, reports).
    pub fn to_bytes(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.numel() * self.dtype.bytes());
        for (c, buffer) in self.chunks.iter().enumerate() {
            let rows = self.chunk_rows(c * self.rows_per_chunk).len();
            let bytes = rows * self.row_len() * self.dtype.bytes();
            out.extend_from_slice(&read_buffer(gpu, buffer, buffer.size())?[..bytes]);
        }
        Ok(out)
    }

    /// The tensor's values as f32 (bf16 widened exactly).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = self.to_bytes(gpu)?;
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::U32 => bail!("to_f32 on a u32 tensor"),
        })
    }

    pub fn to_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            bail!("to_u32 on a {:?} tensor", self.dtype);
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(gpu)?))
    }
}

/// Row ranges of `0..rows` that lie within a single chunk of every tensor given (all indexed by the
/// same row, e.g. X [M, K] and Y [M, N] of a matmul).
pub fn row_segments(rows: usize, tensors: &[&Tensor]) -> Vec<Range<usize>> {
    let mut cuts: Vec<usize> = tensors
        .iter()
        .flat_map(|t| t.chunk_starts())
        .filter(|&r| r < rows)
        .collect();
    cuts.push(0);
    cuts.push(rows);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// Where a launcher puts a result: `tensor = result + beta · tensor`. Every launcher that can
/// accumulate takes its outputs this way, so a call says at the call site whether it overwrites
/// ([`Out::write`]) or adds ([`Out::add`]: gradients summed over micro-batches, chunks, or the
/// several consumers of one activation).
#[derive(Clone, Copy)]
pub struct Out<'a> {
    pub tensor: &'a Tensor,
    pub beta: f32,
}

impl<'a> Out<'a> {
    /// `tensor = result` (beta = 0).
    pub fn write(tensor: &'a Tensor) -> Self {
        Out { tensor, beta: 0.0 }
    }

    /// `tensor += result` (beta = 1).
    pub fn add(tensor: &'a Tensor) -> Self {
        Out { tensor, beta: 1.0 }
    }

    /// `tensor = result + beta · tensor`.
    pub fn scaled(tensor: &'a Tensor, beta: f32) -> Self {
        Out { tensor, beta }
    }
}
