//! Dispatches recorded and submitted together: [`Batch`], made by [`Gpu::batch`].
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::gpu::linear_groups;
use crate::gpu::{read_buffer, Gpu, Pipeline, PARAMS_SLOT};
use crate::shader::Kernel;
use crate::tensor::{row_segments, Chunk, Tensor};

impl Gpu {
    /// A new batch of dispatches, submitted together.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            gpu: self,
            records: Vec::new(),
            params: Vec::new(),
            kept: Vec::new(),
        }
    }
}

struct Record {
    pipeline: Arc<Pipeline>,
    buffers: Vec<Chunk>,
    params_offset: u32,
    groups: [u32; 3],
}

/// Rows `first..first + count` of every tensor given to [`Batch::launch_rows`]: `offsets[i]` is
/// the element offset of row `first` inside the chunk of tensor `i` that holds it.
pub struct RowSegment<const N: usize> {
    pub first: usize,
    pub count: usize,
    pub offsets: [u32; N],
}

/// Dispatches recorded now and submitted together in one compute pass. Each dispatch's parameters
/// go into one shared uniform buffer at 256-byte slots (dynamic offsets), so recording allocates no
/// per-dispatch buffers.
pub struct Batch<'g> {
    pub gpu: &'g Gpu,
    records: Vec<Record>,
    params: Vec<u8>,
    /// Temporaries of recorded dispatches, held until the batch is submitted.
    kept: Vec<Tensor>,
}

impl<'g> Batch<'g> {
    /// Records `kernel` over `groups` workgroups with `params` at binding 0 and `buffers` at the
    /// storage bindings the entry point uses, in ascending binding order.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        kernel: &Kernel,
        params: &P,
        buffers: &[&Chunk],
        groups: [u32; 3],
    ) -> Result<()> {
        let missing = kernel.shader.features.difference(self.gpu.features);
        if !missing.is_empty() {
            bail!(
                "{}: needs device features {missing:?}, which '{}' was not opened with",
                kernel.key(),
                self.gpu.info.name
            );
        }
        let pipeline = self.gpu.pipeline(kernel)?;
        if buffers.len() != pipeline.storage_bindings.len() {
            bail!(
                "{}: {} buffers given, the entry point uses bindings {:?}",
                kernel.key(),
                buffers.len(),
                pipeline.storage_bindings
            );
        }
        let bytes = bytemuck::bytes_of(params);
        assert!(
            bytes.len() as u64 <= PARAMS_SLOT,
            "{}: params exceed one slot",
            kernel.key()
        );
        let align = (self.gpu.limits.min_uniform_buffer_offset_alignment as u64).max(PARAMS_SLOT);
        let offset = self.params.len();
        self.params.extend_from_slice(bytes);
        self.params.resize(offset + align as usize, 0);
        let max = self.gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            bail!(
                "{}: grid {groups:?} exceeds {max} workgroups per dimension",
                kernel.key()
            );
        }
        // A dry run stops here, the dispatch validated.
        if groups.contains(&0) || self.gpu.is_dry_run() {
            return Ok(());
        }
        self.records.push(Record {
            pipeline,
            buffers: buffers.iter().map(|&b| b.clone()).collect(),
            params_offset: offset as u32,
            groups,
        });
        Ok(())
    }

    /// Records a flat kernel, one thread per `threads_per_row` of each row, once per row segment
    /// of `tensors` (indexed by the same rows; each segment lies within one chunk of every
    /// tensor). The storage bindings are the tensors' chunks in the order given, then `extra`
    /// (one-chunk tensors such as tables); `params` gives the segment's parameters. The
    /// workgroups follow the entry point's own `@workgroup_size`.
    pub fn launch_rows<P: bytemuck::Pod, const N: usize>(
        &mut self,
        kernel: &Kernel,
        tensors: [&Tensor; N],
        extra: &[&Chunk],
        threads_per_row: usize,
        params: impl Fn(&RowSegment<N>) -> P,
    ) -> Result<()> {
        let Some(first) = tensors.first() else {
            bail!("{}: launch_rows needs a tensor", kernel.key());
        };
        let [workgroup, 1, 1] = self.gpu.pipeline(kernel)?.workgroup_size else {
            bail!("{}: launch_rows needs a 1-D workgroup", kernel.key());
        };
        for rows in row_segments(first.rows(), &tensors) {
            let at = tensors.map(|t| t.row(rows.start));
            let segment = RowSegment {
                first: rows.start,
                count: rows.len(),
                offsets: at.each_ref().map(|r| r.offset),
            };
            let threads = (rows.len() * threads_per_row) as u32;
            let mut buffers: Vec<&Chunk> = at.iter().map(|r| r.buffer).collect();
            buffers.extend_from_slice(extra);
            let groups = linear_groups(self.gpu, threads.div_ceil(workgroup));
            self.dispatch(kernel, &params(&segment), &buffers, groups)?;
        }
        Ok(())
    }

    /// Holds `tensor` until the batch is submitted: a temporary that recorded dispatches use.
    /// Dropping it at once would not free the device memory (the recorded dispatches hold its
    /// buffers), so it stays counted in [`Gpu::memory`] until then.
    pub fn keep(&mut self, tensor: Tensor) {
        self.kept.push(tensor);
    }

    /// Submits what has been recorded so far and goes on with an empty batch, releasing the kept
    /// temporaries (e.g. once per layer, so that they do not pile up over a whole model).
    pub fn flush(&mut self) {
        std::mem::replace(self, self.gpu.batch()).submit();
    }

    /// Number of dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The command buffers of the recorded dispatches — one, or one per dispatch when `split`
    /// (the profile) — and where `timestamps` (if given, not with `split`) can be read back
    /// after the first ran.
    fn encode(
        &self,
        timestamps: Option<&wgpu::QuerySet>,
        split: bool,
    ) -> (Vec<wgpu::CommandBuffer>, Option<wgpu::Buffer>) {
        let gpu = self.gpu;
        if self.records.is_empty() {
            return (Vec::new(), None);
        }
        let mut counts = gpu.dispatches.lock().unwrap();
        for r in &self.records {
            *counts.entry(r.pipeline.name).or_default() += 1;
        }
        drop(counts);
        let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: self.params.len() as u64 + PARAMS_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.queue.write_buffer(&params, 0, &self.params);
        let groups: Vec<wgpu::BindGroup> = self
            .records
            .iter()
            .map(|r| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: 0,
                        size: wgpu::BufferSize::new(PARAMS_SLOT),
                    }),
                }];
                for (&binding, b) in r.pipeline.storage_bindings.iter().zip(&r.buffers) {
                    entries.push(wgpu::BindGroupEntry {
                        binding,
                        resource: b.binding(),
                    });
                }
                gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &r.pipeline.layout,
                    entries: &entries,
                })
            })
            .collect();
        let pairs: Vec<_> = self.records.iter().zip(&groups).collect();
        let passes: Vec<_> = if split {
            pairs.chunks(1).collect()
        } else {
            vec![&pairs[..]]
        };
        let mut read = None;
        let commands = passes
            .into_iter()
            .map(|pass_records| {
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("wgtrain"),
                        timestamp_writes: timestamps.map(|q| wgpu::ComputePassTimestampWrites {
                            query_set: q,
                            beginning_of_pass_write_index: Some(0),
                            end_of_pass_write_index: Some(1),
                        }),
                    });
                    for (r, bg) in pass_records {
                        pass.set_pipeline(&r.pipeline.pipeline);
                        pass.set_bind_group(0, *bg, &[r.params_offset]);
                        pass.dispatch_workgroups(r.groups[0], r.groups[1], r.groups[2]);
                    }
                }
                if let Some(q) = timestamps {
                    let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("timestamps"),
                        size: 16,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    });
                    encoder.resolve_query_set(q, 0..2, &resolve, 0);
                    // `read_buffer` copies it to a mappable staging buffer.
                    read = Some(resolve);
                }
                encoder.finish()
            })
            .collect();
        (commands, read)
    }

    /// Submits the recorded dispatches without waiting for them (nothing in a dry run: nothing
    /// was recorded), then drops the kept temporaries. The device frees their memory once the
    /// work is done; [`Gpu::memory`] stops counting them now. Under the profile, each dispatch
    /// is submitted and waited for on its own, and timed.
    pub fn submit(mut self) {
        let gpu = self.gpu;
        let kept = std::mem::take(&mut self.kept);
        if let Some(profile) = &gpu.profile {
            let (commands, _) = self.encode(None, true);
            for (cmd, r) in commands.into_iter().zip(&self.records) {
                let start = Instant::now();
                gpu.queue.submit([cmd]);
                // A lost device surfaces at the next readback; the profile only times.
                let _ = gpu.wait();
                profile.add(&r.pipeline.variant, r.groups, start.elapsed());
            }
        } else {
            gpu.queue.submit(self.encode(None, false).0);
        }
        drop(kept);
    }

    /// Submits, waits, and returns the GPU time of the pass (timestamp queries where the adapter
    /// has them, wall-clock time around submit-and-wait otherwise).
    pub fn submit_timed(mut self) -> Result<Duration> {
        let gpu = self.gpu;
        if !gpu.has_timestamps() || gpu.profile.is_some() {
            let start = Instant::now();
            self.submit();
            gpu.wait()?;
            return Ok(start.elapsed());
        }
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("pass-time"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let kept = std::mem::take(&mut self.kept);
        let (commands, Some(read)) = self.encode(Some(&queries), false) else {
            return Ok(Duration::ZERO);
        };
        gpu.queue.submit(commands);
        drop(kept);
        let ticks: Vec<u64> = bytemuck::cast_slice(&read_buffer(gpu, &read, 0, 16)?).to_vec();
        let ns = ticks[1].saturating_sub(ticks[0]) as f64 * gpu.queue.get_timestamp_period() as f64;
        Ok(Duration::from_nanos(ns as u64))
    }
}
