//! Device tensors.
//!
//! A tensor is row-major; its rows are its last dimension. It is stored as one or more chunks, each
//! a buffer of whole rows no larger than one storage binding (`Gpu::max_binding_bytes`), so tensors
//! of any size bind on any adapter. Launchers walk row ranges that lie inside one chunk of every
//! tensor involved ([`row_segments`]) and pass each kernel the row offset inside its chunk.
//!
//! A chunk is a whole buffer, or a range of one shared with other tensors ([`Tensor::packed`]):
//! a kernel over several such tensors binds the shared buffer once and reaches every tensor in
//! it (the optimizer updates every trainable tensor in one launch).
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

/// One storage binding of a tensor: `size` bytes at `offset` in `buffer` (all of it, or the
/// tensor's range of a packed buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub buffer: wgpu::Buffer,
    /// A multiple of the device's storage offset alignment.
    pub offset: u64,
    pub size: u64,
}

impl Chunk {
    fn whole(buffer: wgpu::Buffer) -> Chunk {
        Chunk {
            offset: 0,
            size: buffer.size(),
            buffer,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Index of the chunk's first 4-byte word in its buffer: where an f32 or u32 chunk starts
    /// for a kernel that binds the whole buffer ([`Chunk::buffer_binding`]).
    pub fn first_word(&self) -> u32 {
        (self.offset / 4) as u32
    }

    /// The whole buffer the chunk lies in, as a binding.
    pub fn buffer_binding(&self) -> Chunk {
        Chunk::whole(self.buffer.clone())
    }

    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.size),
        })
    }
}

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    rows_per_chunk: usize,
    chunks: Vec<Chunk>,
    /// The chunks' bytes, counted in [`Gpu::memory`] while the tensor lives.
    _allocation: Allocation,
    /// A handle on another tensor's buffers ([`Tensor::alias`]): owns no device bytes.
    aliased: bool,
}

/// Where a row lives: the chunk's buffer and the element offset of the row inside it.
#[derive(Clone, Copy)]
pub struct RowAt<'a> {
    pub buffer: &'a Chunk,
    /// Element index (not word index, for bf16) of the row's first element inside the chunk.
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
            encoder.clear_buffer(&chunk.buffer, chunk.offset, Some(chunk.size));
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

    /// A 1-D u32 table holding `words` in one buffer, up to the device's binding limit (like
    /// [`Tensor::scratch`]): a kernel's per-workgroup work list.
    pub(crate) fn table(gpu: &Gpu, words: &[u32]) -> Result<Tensor> {
        let limit = gpu
            .limits
            .max_storage_buffer_binding_size
            .min(gpu.limits.max_buffer_size);
        let table = Tensor::zeros_within(gpu, &[words.len()], DType::U32, limit)?;
        table.write_bytes(gpu, bytemuck::cast_slice(words))?;
        Ok(table)
    }

    /// A zero-filled tensor in chunks of at most `binding_bytes`.
    fn zeros_within(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        binding_bytes: u64,
    ) -> Result<Tensor> {
        let layout = Layout::new(shape, dtype, binding_bytes)?;
        let chunks = layout
            .chunk_bytes
            .iter()
            .map(|&bytes| Chunk::whole(new_buffer(gpu, bytes)))
            .collect();
        Ok(Tensor::over(
            gpu,
            shape,
            dtype,
            layout.rows_per_chunk,
            chunks,
        ))
    }

    /// Zero-filled tensors of `shapes`, packed into as few buffers as the binding size allows
    /// (each chunk at the device's storage offset alignment, in order): views that work as
    /// separate tensors do, while a kernel over all of them binds each shared buffer once (the
    /// trainable tensors, their gradients and AdamW moments: one optimizer launch for all). Each
    /// counts in [`Gpu::memory`] the bytes a separate tensor would (the alignment gaps, under
    /// 256 bytes per tensor, are left out); the buffers live while any of their views does.
    pub fn packed(gpu: &Gpu, shapes: &[Vec<usize>], dtype: DType) -> Result<Vec<Tensor>> {
        let align = gpu.limits.min_storage_buffer_offset_alignment as u64;
        let layouts = shapes
            .iter()
            .map(|s| Layout::new(s, dtype, gpu.max_binding_bytes))
            .collect::<Result<Vec<_>>>()?;
        // (buffer index, offset) of every chunk, and the bytes used of each buffer.
        let mut used: Vec<u64> = Vec::new();
        let mut places = Vec::new();
        for bytes in layouts.iter().flat_map(|l| &l.chunk_bytes) {
            let at = used.last().map(|u| u.next_multiple_of(align));
            match at.filter(|at| at + bytes <= gpu.max_binding_bytes) {
                Some(at) => *used.last_mut().unwrap() = at + bytes,
                None => used.push(*bytes),
            }
            places.push((used.len() - 1, used.last().unwrap() - bytes));
        }
        let buffers: Vec<wgpu::Buffer> = used.iter().map(|&b| new_buffer(gpu, b)).collect();
        let mut places = places.into_iter();
        let tensors = shapes.iter().zip(&layouts).map(|(shape, layout)| {
            let chunks = layout
                .chunk_bytes
                .iter()
                .zip(places.by_ref())
                .map(|(&size, (b, offset))| Chunk {
                    buffer: buffers[b].clone(),
                    offset,
                    size,
                })
                .collect();
            Tensor::over(gpu, shape, dtype, layout.rows_per_chunk, chunks)
        });
        Ok(tensors.collect())
    }

    /// The tensor stored in `chunks`, owning their bytes.
    fn over(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        rows_per_chunk: usize,
        chunks: Vec<Chunk>,
    ) -> Tensor {
        let bytes = chunks.iter().map(Chunk::size).sum();
        Tensor {
            shape: shape.to_vec(),
            dtype,
            rows_per_chunk,
            chunks,
            _allocation: gpu.allocate(bytes),
            aliased: false,
        }
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
        self.write_rows(gpu, 0, bytes)
    }

    /// Overwrites whole rows from row `first` on with `bytes` (their raw little-endian
    /// elements), queued as [`Tensor::write_bytes`] is: e.g. one vocabulary chunk of a paged LM
    /// head into the first rows of its slot. A row range that starts or ends inside a word (odd
    /// bf16 rows) is refused unless it ends the tensor's chunk. A dry run writes nothing.
    pub fn write_rows(&self, gpu: &Gpu, first: usize, bytes: &[u8]) -> Result<()> {
        let row_bytes = self.row_len() * self.dtype.bytes();
        let rows = bytes.len() / row_bytes;
        if !bytes.len().is_multiple_of(row_bytes) || first + rows > self.rows() {
            bail!(
                "writing {} bytes at row {first} of tensor {:?} {:?}: expected whole rows of {row_bytes} \
                 bytes inside its {} rows",
                bytes.len(),
                self.shape,
                self.dtype,
                self.rows()
            );
        }
        if gpu.is_dry_run() {
            return Ok(());
        }
        for (c, piece) in self.chunks.iter().enumerate() {
            let chunk = c * self.rows_per_chunk..((c + 1) * self.rows_per_chunk).min(self.rows());
            let (start, end) = (chunk.start.max(first), chunk.end.min(first + rows));
            if start >= end {
                continue;
            }
            let offset = ((start - chunk.start) * row_bytes) as u64;
            let part = &bytes[(start - first) * row_bytes..(end - first) * row_bytes];
            if !offset.is_multiple_of(4) || (!part.len().is_multiple_of(4) && end != chunk.end) {
                bail!(
                    "rows {start}..{end} of tensor {:?} {:?} do not start and end on a word",
                    self.shape,
                    self.dtype
                );
            }
            if part.len().is_multiple_of(4) {
                gpu.queue
                    .write_buffer(&piece.buffer, piece.offset + offset, part);
            } else {
                // An odd count of bf16 elements ending the chunk: the last word needs its padding.
                let mut padded = part.to_vec();
                padded.resize(part.len().next_multiple_of(4), 0);
                gpu.queue
                    .write_buffer(&piece.buffer, piece.offset + offset, &padded);
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

    /// A handle, like [`Tensor::alias`], on the first `len` entries of the leading dimension:
    /// e.g. a layer's last, shorter chunk of tokens in buffers sized for a whole chunk. Its rows
    /// are the tensor's rows, in place.
    pub fn prefix(&self, gpu: &Gpu, len: usize) -> Result<Tensor> {
        let mut shape = self.shape.clone();
        if !(1..=shape[0]).contains(&len) {
            bail!("a prefix of {len} of tensor {:?}", self.shape);
        }
        shape[0] = len;
        let rows = shape.iter().product::<usize>() / shape.last().unwrap_or(&1);
        Ok(Tensor {
            shape,
            dtype: self.dtype,
            rows_per_chunk: self.rows_per_chunk,
            chunks: self.chunks[..rows.div_ceil(self.rows_per_chunk)].to_vec(),
            _allocation: gpu.allocate(0),
            aliased: true,
        })
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
        for (chunk, part) in self.chunks.iter().zip(data.chunks(chunk_len)) {
            gpu.queue
                .write_buffer(&chunk.buffer, chunk.offset, bytemuck::cast_slice(part));
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

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Bytes on the device that this tensor owns (none for an alias).
    pub fn device_bytes(&self) -> u64 {
        match self.aliased {
            true => 0,
            false => self.chunks.iter().map(Chunk::size).sum(),
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
        for (c, chunk) in self.chunks.iter().enumerate() {
            let rows = self.chunk_rows(c * self.rows_per_chunk).len();
            let bytes = rows * self.row_len() * self.dtype.bytes();
            let read = read_buffer(gpu, &chunk.buffer, chunk.offset, chunk.size)?;
            out.extend_from_slice(&read[..bytes]);
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

/// How a tensor splits into chunks of at most one binding.
struct Layout {
    rows_per_chunk: usize,
    /// Each chunk's bytes, in whole [`BUFFER_ALIGN`] units.
    chunk_bytes: Vec<u64>,
}

impl Layout {
    fn new(shape: &[usize], dtype: DType, binding_bytes: u64) -> Result<Layout> {
        let row_len = *shape.last().unwrap_or(&1);
        let rows: usize = shape.iter().rev().skip(1).product();
        if shape.contains(&0) {
            bail!("tensor shape {shape:?} has a zero dimension");
        }
        let row_bytes = (row_len * dtype.bytes()) as u64;
        let mut rows_per_chunk = (binding_bytes / row_bytes) as usize;
        if rows_per_chunk < rows {
            if rows_per_chunk >= 8 {
                // Cuts at multiples of 8 rows keep the offsets of the products split there in
                // whole vec4s of the tensors these rows index (a logits chunk's columns, say),
                // which the subgroup GEMM's fast variant needs (ops/matmul.rs).
                rows_per_chunk &= !7;
            } else if dtype == DType::BF16 && row_len % 2 == 1 {
                // bf16 chunks must start on a word boundary.
                rows_per_chunk &= !1;
            }
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
        let chunk_bytes = (0..rows)
            .step_by(rows_per_chunk)
            .map(|start| {
                let n = rows_per_chunk.min(rows - start);
                ((n * row_len * dtype.bytes()) as u64).next_multiple_of(BUFFER_ALIGN)
            })
            .collect();
        Ok(Layout {
            rows_per_chunk,
            chunk_bytes,
        })
    }
}

fn new_buffer(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_per_chunk(shape: &[usize], dtype: DType, binding_bytes: u64) -> usize {
        Layout::new(shape, dtype, binding_bytes)
            .unwrap()
            .rows_per_chunk
    }

    #[test]
    fn split_tensors_cut_at_multiples_of_eight_rows() {
        // 1000 bytes hold 35 rows of 7 f32: cut at 32.
        assert_eq!(rows_per_chunk(&[100, 7], DType::F32, 1000), 32);
        // Fewer than 8 rows per binding stay as they are, but bf16 rows of odd length pair up.
        assert_eq!(rows_per_chunk(&[100, 7], DType::F32, 100), 3);
        assert_eq!(rows_per_chunk(&[100, 7], DType::BF16, 100), 6);
        // A tensor that fits one binding is not cut.
        assert_eq!(rows_per_chunk(&[30, 7], DType::F32, 1000), 30);
    }
}
