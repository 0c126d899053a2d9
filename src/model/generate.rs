//! Autoregressive generation with the KV cache, one sequence or many decoded together, and
//! streaming detokenisation.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use wgtrain_kernels::Gpu;

use super::qwen2::{KvCache, Qwen2};
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after emitting one of these (empty: run to `max_new_tokens`).
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// The new tokens, including the stop token that ended them (as transformers returns it).
    pub tokens: Vec<u32>,
    /// Ended by a stop id rather than by `max_new_tokens`.
    pub stopped: bool,
    /// The prompt's prefill and the choice of the first token.
    pub prefill_time: Duration,
    /// This sequence's share of the decoding steps it took part in: each step's time divided by
    /// the sequences in it, so the shares of a batch add up to its wall-clock time.
    pub decode_time: Duration,
}

/// Prefills `prompt` into a new KV cache, then decodes one token at a time, calling `on_token`
/// with each new id as soon as it is chosen.
pub fn generate(
    model: &Qwen2,
    gpu: &Gpu,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let request = BatchRequest {
        prompt,
        seed: options.sampling.seed,
    };
    let mut out = generate_batch(model, gpu, &[request], options, 1, |event| match event {
        BatchEvent::Token { id, .. } => on_token(id),
        BatchEvent::Done { .. } => Ok(()),
    })?;
    Ok(out.remove(0))
}

/// One sequence of [`generate_batch`].
#[derive(Clone, Copy, Debug)]
pub struct BatchRequest<'a> {
    pub prompt: &'a [u32],
    /// Seed of this sequence's own sampler (in place of `options.sampling.seed`): its tokens do not
    /// depend on which sequences share its batch.
    pub seed: u64,
}

/// What [`generate_batch`] reports as it goes; `index` is the request's.
pub enum BatchEvent<'a> {
    /// A token was chosen.
    Token { index: usize, id: u32 },
    /// The sequence ended (stop id or `max_new_tokens`).
    Done {
        index: usize,
        generation: &'a Generation,
    },
}

/// A sequence being decoded.
struct Live {
    index: usize,
    sampler: Sampler,
    out: Generation,
}

impl Live {
    /// Chooses the next token from `logits` and reports it; true when the sequence has ended.
    fn take(
        &mut self,
        logits: &[f32],
        options: &GenerateOptions,
        on_event: &mut impl FnMut(BatchEvent) -> Result<()>,
    ) -> Result<bool> {
        let id = self
            .sampler
            .sample(logits)
            .with_context(|| format!("sequence {}", self.index))?;
        self.out.tokens.push(id);
        on_event(BatchEvent::Token {
            index: self.index,
            id,
        })?;
        self.out.stopped = options.stop_ids.contains(&id);
        Ok(self.out.stopped || self.out.tokens.len() == options.max_new_tokens)
    }
}

/// Generates for every request with up to `batch_size` sequences decoded together: each step
/// runs one token of every active sequence through the model as one batch (matrix products
/// rather than matrix-vector products), each sequence attending to its own KV-cache slot. A
/// sequence that ends leaves the batch at once — the last active one moves into its slot, so the
/// rest stay slots 0..B and a finished one costs nothing — and the next request is prefilled into
/// the free slot, so up to `batch_size` sequences are always in flight. Every sequence samples
/// with its own seeded [`Sampler`]. Returns the generations in request order.
pub fn generate_batch(
    model: &Qwen2,
    gpu: &Gpu,
    requests: &[BatchRequest],
    options: &GenerateOptions,
    batch_size: usize,
    mut on_event: impl FnMut(BatchEvent) -> Result<()>,
) -> Result<Vec<Generation>> {
    ensure!(batch_size > 0, "the batch size must be at least 1");
    for (i, request) in requests.iter().enumerate() {
        ensure!(!request.prompt.is_empty(), "prompt {i} has no tokens");
    }
    let Some(longest) = requests.iter().map(|r| r.prompt.len()).max() else {
        return Ok(Vec::new());
    };
    Sampler::new(options.sampling)?;
    let slots = batch_size.min(requests.len());
    let mut cache = KvCache::with_slots(gpu, model, slots, longest + options.max_new_tokens)?;
    let vocab = model.config.vocab_size;
    let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut finish = |live: Live, on_event: &mut dyn FnMut(BatchEvent) -> Result<()>| {
        on_event(BatchEvent::Done {
            index: live.index,
            generation: &live.out,
        })?;
        done[live.index] = Some(live.out);
        Ok::<_, anyhow::Error>(())
    };
    // active[s] decodes in cache slot s.
    let mut active: Vec<Live> = Vec::with_capacity(slots);
    let mut next = 0;
    loop {
        while active.len() < slots && next < requests.len() {
            let (index, slot) = (next, active.len());
            next += 1;
            let start = Instant::now();
            let logits = model
                .prefill_slot(gpu, &mut cache, slot, requests[index].prompt)
                .with_context(|| format!("prefilling sequence {index}"))?;
            let mut live = Live {
                index,
                sampler: Sampler::new(SamplingParams {
                    seed: requests[index].seed,
                    ..options.sampling
                })?,
                out: Generation {
                    tokens: Vec::with_capacity(options.max_new_tokens),
                    stopped: false,
                    prefill_time: Duration::ZERO,
                    decode_time: Duration::ZERO,
                },
            };
            let ended =
                options.max_new_tokens == 0 || live.take(&logits, options, &mut on_event)?;
            live.out.prefill_time = start.elapsed();
            if ended {
                cache.clear(slot);
                finish(live, &mut on_event)?;
            } else {
                active.push(live);
            }
        }
        if active.is_empty() {
            break;
        }

        let start = Instant::now();
        let ids: Vec<u32> = active
            .iter()
            .map(|l| l.out.tokens[l.out.tokens.len() - 1])
            .collect();
        let logits = model.decode_slots(gpu, &mut cache, &ids)?;
        let mut ended_slots = Vec::new();
        for (slot, (live, row)) in active.iter_mut().zip(logits.chunks(vocab)).enumerate() {
            if live.take(row, options, &mut on_event)? {
                ended_slots.push(slot);
            }
        }
        // Highest first, so the last active sequence that fills a hole has not ended itself.
        let mut ended: Vec<Live> = ended_slots
            .into_iter()
            .rev()
            .map(|slot| {
                let live = active.swap_remove(slot);
                cache.clear(slot);
                if slot < active.len() {
                    cache.move_slot(gpu, active.len(), slot)?;
                }
                Ok(live)
            })
            .collect::<Result<_>>()?;
        let share = start.elapsed() / (active.len() + ended.len()) as u32;
        for live in active.iter_mut().chain(&mut ended) {
            live.out.decode_time += share;
        }
        for live in ended {
            finish(live, &mut on_event)?;
        }
    }
    Ok(done.into_iter().flatten().collect())
}

/// Turns a growing token stream into text pieces that are never cut inside a character: a byte-level
/// token may hold part of a UTF-8 sequence, which decodes as U+FFFD until the rest arrives. Decodes
/// only a short window (from the last emitted boundary), the way text-generation-inference does.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this are emitted.
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds a token; returns the newly completed text (empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tokenizer.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(piece) = now.get(before.len()..) else {
            return Ok(String::new());
        };
        let piece = piece.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_pieces_are_whole_characters_and_add_up() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-tokenizer");
        let tok = Tokenizer::load(dir).unwrap();
        let text = "Héllo → 世界 🎉 (3 + 4) * 5 = 35";
        let ids = tok.encode(text).unwrap();
        // The tiny vocabulary splits these characters into byte tokens that decode to U+FFFD alone.
        assert!(ids
            .iter()
            .any(|&id| tok.decode(&[id], true).unwrap().contains('\u{FFFD}')));
        let mut stream = StreamDecoder::new();
        let mut joined = String::new();
        for &id in &ids {
            let piece = stream.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            joined.push_str(&piece);
        }
        joined.push_str(&stream.finish(&tok).unwrap());
        assert_eq!(joined, tok.decode(&ids, true).unwrap());
        assert_eq!(joined, text);
    }
}
