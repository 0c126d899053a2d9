//! Autoregressive generation with the KV cache, and streaming detokenisation.
use std::time::{Duration, Instant};

use anyhow::Result;
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
    pub prefill_time: Duration,
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
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let mut sampler = Sampler::new(options.sampling)?;
    let mut cache = KvCache::new(gpu, model, prompt.len() + options.max_new_tokens)?;
    let start = Instant::now();
    let mut logits = model.forward_cached(gpu, &mut cache, prompt)?;
    let prefill_time = start.elapsed();
    let start = Instant::now();
    let mut out = Generation {
        tokens: Vec::with_capacity(options.max_new_tokens),
        stopped: false,
        prefill_time,
        decode_time: Duration::ZERO,
    };
    for i in 0..options.max_new_tokens {
        let next = sampler.sample(&logits)?;
        out.tokens.push(next);
        on_token(next)?;
        if options.stop_ids.contains(&next) {
            out.stopped = true;
            break;
        }
        if i + 1 < options.max_new_tokens {
            logits = model.forward_cached(gpu, &mut cache, &[next])?;
        }
    }
    out.decode_time = start.elapsed();
    Ok(out)
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
