//! Batched generation on the tiny fixtures: KV-cache slots of different lengths decoded together
//! give each sequence the logits of its own full forward (through a slot move), and batched greedy
//! and seeded sampling give every sequence the tokens it gets alone.
use std::path::{Path, PathBuf};

use serde_json::Value;
use wgtrain::model::{
    generate, generate_batch, Adapter, BatchEvent, BatchRequest, GenerateOptions, KvCache, Qwen2,
    SamplingParams,
};
use wgtrain_kernels::Gpu;

mod common;
use common::max_abs_diff;

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's 37 reference ids.
fn reference_ids(name: &str) -> Vec<u32> {
    let path = model_dir(name).join("reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    reference["logits_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `count` prompts of different lengths (1 to 30 tokens) cut from the reference ids.
fn prompts(name: &str, count: usize) -> Vec<Vec<u32>> {
    let ids = reference_ids(name);
    (0..count)
        .map(|i| ids[i % 7..][..1 + (i * 13) % 30].to_vec())
        .collect()
}

/// Ten sequences (more rows than the matrix-vector path takes) prefilled into their own slots and
/// decoded together for 40 steps, their caches growing past the 64-key tile: every step's logits
/// equal the sequence's full forward at that position. At step 15 the sequence in slot 3 ends and
/// the last one moves into its slot, as generation does, and decoding goes on.
#[test]
fn slots_decoded_together_match_each_full_forward() {
    let name = "tiny-qwen2-tied";
    let gpu = Gpu::from_env().unwrap();
    let mut model = Qwen2::load(&gpu, model_dir(name)).unwrap();
    let adapter = Adapter::load(model_dir(name).join("adapter-random"), &model.config).unwrap();
    model.apply_adapter(&gpu, &adapter).unwrap();
    let vocab = model.config.vocab_size;
    let (count, steps) = (10, 40);
    let feed = |seq: usize, step: usize| ((seq * 31 + step * 7) % vocab) as u32;
    let prompts = prompts(name, count);
    let full: Vec<Vec<f32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let seq: Vec<u32> = p
                .iter()
                .copied()
                .chain((0..steps).map(|t| feed(i, t)))
                .collect();
            model.logits(&gpu, &seq, 0..seq.len()).unwrap()
        })
        .collect();
    // full[i] at the row of sequence i's token `step` (0: the last prompt token).
    let want = |i: usize, step: usize| {
        let row = prompts[i].len() - 1 + step;
        &full[i][row * vocab..(row + 1) * vocab]
    };

    let capacity = 30 + steps;
    let mut cache = KvCache::with_slots(&gpu, &model, count, capacity).unwrap();
    let mut worst = 0.0f32;
    for (i, prompt) in prompts.iter().enumerate() {
        let logits = model.prefill_slot(&gpu, &mut cache, i, prompt).unwrap();
        worst = worst.max(max_abs_diff(&logits, want(i, 0)));
    }
    // slot_of[s]: the sequence in slot s.
    let mut slot_of: Vec<usize> = (0..count).collect();
    for step in 0..steps {
        if step == 15 {
            let last = slot_of.len() - 1;
            slot_of.swap_remove(3);
            cache.clear(3);
            cache.move_slot(&gpu, last, 3).unwrap();
        }
        let ids: Vec<u32> = slot_of.iter().map(|&i| feed(i, step)).collect();
        let logits = model.decode_slots(&gpu, &mut cache, &ids).unwrap();
        for (row, &i) in logits.chunks(vocab).zip(&slot_of) {
            worst = worst.max(max_abs_diff(row, want(i, step + 1)));
        }
    }
    let lens: Vec<usize> = slot_of.iter().map(|&i| prompts[i].len() + steps).collect();
    assert_eq!(&cache.lens()[..count - 1], &lens[..]);
    assert_eq!(cache.lens()[count - 1], 0);
    println!("{name}: max |batched decode - full forward| = {worst:.3e}");
    assert!(worst < 1e-4, "batched decoding differs by {worst}");

    // Slots past the cache, a cached slot out of place, a full slot: errors, nothing written.
    assert!(model.decode_slots(&gpu, &mut cache, &[1; 11]).is_err());
    assert!(model.prefill_slot(&gpu, &mut cache, 2, &[1]).is_err());
    let mut small = KvCache::with_slots(&gpu, &model, 2, 4).unwrap();
    model.prefill_slot(&gpu, &mut small, 1, &[1, 2, 3]).unwrap();
    let err = model
        .prefill_slot(&gpu, &mut small, 0, &[1; 5])
        .unwrap_err();
    assert!(err.to_string().contains("slot 0 holds 4 tokens"), "{err}");
    assert_eq!(small.lens(), &[0, 3]);
}

fn options(max_new_tokens: usize, sampling: SamplingParams, stop_ids: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling,
        stop_ids,
    }
}

/// (tokens, stopped) of every request, generated together `batch_size` at a time; also checks
/// that the events report each token, and each sequence's end once.
fn batched(
    model: &Qwen2,
    gpu: &Gpu,
    requests: &[BatchRequest],
    options: &GenerateOptions,
    batch_size: usize,
) -> Vec<(Vec<u32>, bool)> {
    let mut streamed = vec![Vec::new(); requests.len()];
    let mut ended = vec![0; requests.len()];
    let out = generate_batch(model, gpu, requests, options, batch_size, |event| {
        match event {
            BatchEvent::Token { index, id } => streamed[index].push(id),
            BatchEvent::Done { index, generation } => {
                assert_eq!(generation.tokens, streamed[index]);
                ended[index] += 1;
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(ended, vec![1; requests.len()]);
    out.into_iter().map(|g| (g.tokens, g.stopped)).collect()
}

/// Greedy: five prompts of different lengths generated together (3 at a time, so finished ones
/// hand their slots on, and all at once) give exactly the tokens each gets alone; the stop ids are
/// chosen from the tokens generated alone so that the sequences end at different steps.
#[test]
fn batched_greedy_equals_single_sequence_greedy() {
    let gpu = Gpu::from_env().unwrap();
    for name in ["tiny-qwen2-untied", "tiny-qwen2-tied"] {
        let model = Qwen2::load(&gpu, model_dir(name)).unwrap();
        let prompts = prompts(name, 5);
        let greedy = SamplingParams::default();
        let alone = |stop_ids: &[u32]| -> Vec<(Vec<u32>, bool)> {
            let options = options(12, greedy, stop_ids.to_vec());
            prompts
                .iter()
                .map(|p| {
                    let g = generate(&model, &gpu, p, &options, |_| Ok(())).unwrap();
                    (g.tokens, g.stopped)
                })
                .collect()
        };
        let free = alone(&[]);
        let stop_ids = vec![free[1].0[5], free[3].0[2]];
        let want = alone(&stop_ids);
        let lengths: Vec<usize> = want.iter().map(|(t, _)| t.len()).collect();
        assert!(lengths.iter().any(|&n| n < 12), "{name}: {lengths:?}");
        let requests: Vec<BatchRequest> = prompts
            .iter()
            .map(|p| BatchRequest { prompt: p, seed: 0 })
            .collect();
        let options = options(12, greedy, stop_ids);
        for batch_size in [3, 16] {
            let got = batched(&model, &gpu, &requests, &options, batch_size);
            assert_eq!(got, want, "{name}, batch size {batch_size}");
        }
    }
}

/// Seeded sampling: each sequence draws from its own sampler, so it samples the same tokens in a
/// batch of four as alone.
#[test]
fn sampled_sequences_are_the_same_alone_and_batched() {
    let name = "tiny-qwen2-untied";
    let gpu = Gpu::from_env().unwrap();
    let model = Qwen2::load(&gpu, model_dir(name)).unwrap();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        seed: 0,
    };
    let options = options(16, sampling, Vec::new());
    let prompts = prompts(name, 4);
    let requests: Vec<BatchRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| BatchRequest {
            prompt: p,
            seed: 100 + i as u64,
        })
        .collect();
    let together = batched(&model, &gpu, &requests, &options, 4);
    for (request, got) in requests.iter().zip(&together) {
        let alone = batched(&model, &gpu, std::slice::from_ref(request), &options, 1);
        assert_eq!(&alone[0], got);
    }
    // Different seeds draw different sequences from the same prompt.
    let same_prompt: Vec<BatchRequest> = (0..2)
        .map(|seed| BatchRequest {
            prompt: &prompts[0],
            seed,
        })
        .collect();
    let two = batched(&model, &gpu, &same_prompt, &options, 2);
    assert_ne!(two[0], two[1]);
}
