//! Models larger than the device (`--device-memory`): decoder layers streamed from the memory map
//! through a ring of device slots, the LM head's vocabulary chunks streamed through slots of
//! their own and the embedding's rows gathered on the host give bit-identical losses, logits,
//! generations, gradients and adapters to the resident model; a budget that cannot be met is
//! refused with the size that would fit; the dry run plans from a directory holding only
//! config.json and the tokenizer.
mod common;

use std::path::{Path, PathBuf};

use common::{as_batch, fixtures, metrics, supervised_rows, train_args, wgtrain};
use wgtrain::model::residency::{weight_bytes, Working};
use wgtrain::model::{
    generate, Adapter, GenerateOptions, Grads, LoraDropout, MemoryPlan, Proj, Qwen2, Qwen2Config,
    SamplingParams,
};
use wgtrain::train::config::LoraSettings;
use wgtrain::train::demo::write_random_weights;
use wgtrain::train::trainer::new_adapter;
use wgtrain_kernels::{Gpu, GpuOptions};

fn gpu_with(device_memory: Option<u64>) -> Gpu {
    Gpu::new(&GpuOptions {
        device_memory,
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap()
}

/// tiny-qwen2-tied's shapes with `layers` decoder layers of random weights, in `dir`.
fn deep_model(dir: &Path, layers: usize) -> PathBuf {
    model_with(dir, &[("num_hidden_layers", layers.into())])
}

/// tiny-qwen2-tied's shapes and tokenizer with the config keys `changes`, of random weights, in
/// `dir`.
fn model_with(dir: &Path, changes: &[(&str, serde_json::Value)]) -> PathBuf {
    let source = fixtures().join("tiny-qwen2-tied");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let text = std::fs::read_to_string(source.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (key, value) in changes {
        json[*key] = value.clone();
    }
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let config = Qwen2Config::load(dir).unwrap();
    write_random_weights(dir, &config, 7).unwrap();
    dir.to_path_buf()
}

/// Everything the model computes, as bits: loss, logits, a greedy generation (prefill and
/// KV-cached decoding) and the LoRA gradients of two micro-batches with dropout (the second
/// starting from the slots the first left).
fn outputs(gpu: &Gpu, dir: &Path) -> (Vec<u64>, Qwen2) {
    let mut model = Qwen2::load(gpu, dir).unwrap();
    // The fixture's trained adapter, or a fresh one (B zero) on the generated model.
    let adapter = match dir.join("adapter-random") {
        trained if trained.is_dir() => Adapter::load(&trained, &model.config).unwrap(),
        _ => {
            let lora = LoraSettings {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: Proj::ALL.to_vec(),
            };
            new_adapter(&model.config, &lora, 1).unwrap()
        }
    };
    model.apply_adapter(gpu, &adapter).unwrap();
    let rows = supervised_rows(&[13, 6]);
    let batch = as_batch(&rows);
    let mut bits = vec![model.loss_sum(gpu, &batch).unwrap().sum.to_bits()];
    let ids = &rows[0].0;
    let logits = model.logits(gpu, ids, 0..ids.len()).unwrap();
    bits.extend(logits.iter().map(|x| x.to_bits() as u64));
    let options = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
    };
    let generation = generate(&model, gpu, &ids[..5], &options, |_| Ok(())).unwrap();
    bits.extend(generation.tokens.iter().map(|&t| t as u64));
    if model
        .layers
        .iter()
        .any(|l| l.proj.values().any(|p| p.lora.is_some()))
    {
        let grads = Grads::new(gpu, &model).unwrap();
        for seed in [3, 4] {
            let dropout = Some(LoraDropout { p: 0.2, seed });
            let loss = model.forward_backward(gpu, &grads, &batch, 0.5, dropout);
            bits.push(loss.unwrap().sum.to_bits());
        }
        for p in grads.params(&model) {
            bits.extend(
                p.grad
                    .to_f32(gpu)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64),
            );
        }
    }
    (bits, model)
}

/// The streamed run of `dir` with room for `layers` decoder layers beside the other weights
/// gives the resident run's bits, with `resident` layers resident and `slots` slots.
fn assert_streams_identically(dir: &Path, layers: u64, (resident, slots): (usize, usize)) {
    let (layer, other) = weight_bytes(&Qwen2Config::load(dir).unwrap(), false);
    let plan = assert_identical(dir, other + layers * layer);
    assert_eq!(
        (plan.resident_layers, plan.slots),
        (resident, slots),
        "{plan:?}"
    );
}

/// The run of `dir` under `budget` gives the resident run's bits; its plan.
fn assert_identical(dir: &Path, budget: u64) -> MemoryPlan {
    let (resident_bits, model) = outputs(&gpu_with(None), dir);
    assert!(model.memory_plan().is_none());
    let (streamed_bits, model) = outputs(&gpu_with(Some(budget)), dir);
    let plan = model
        .memory_plan()
        .expect("a budget below the model streams")
        .clone();
    assert_eq!(resident_bits.len(), streamed_bits.len());
    let differ = resident_bits
        .iter()
        .zip(&streamed_bits)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ,
        0,
        "{}: {differ} values differ when streamed under {plan:?}",
        dir.display()
    );
    assert!(
        model.streamed_bytes() >= plan.layer_bytes,
        "nothing was streamed"
    );
    plan
}

/// The least budget `dir`'s model loads under for inference (everything paged, one slot), as
/// the refusal of a smaller one names it.
fn least_inference_budget(dir: &Path) -> u64 {
    let config = Qwen2Config::load(dir).unwrap();
    let err = MemoryPlan::fit(&config, Some(1), Working::default()).unwrap_err();
    let least = least_budget(&err.to_string());
    least.trim_end_matches('B').parse().unwrap()
}

#[test]
fn paged_head_and_embedding_compute_what_resident_ones_compute() {
    // The untied fixture (sharded, five files): its embedding's rows are gathered on the host;
    // its head, one vocabulary chunk, would take as much room paged as resident.
    let dir = fixtures().join("tiny-qwen2-untied");
    let plan = assert_identical(&dir, least_inference_budget(&dir));
    assert!(plan.paging.embedding && !plan.paging.head, "{plan:?}");
    // 70000 entries: three chunks through two slots, each uploaded once per pass, the next
    // one's upload queued before the current one's work; tied, and untied beside the paged
    // embedding.
    for tied in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let changes = [
            ("vocab_size", 70_000.into()),
            ("tie_word_embeddings", tied.into()),
        ];
        let wide = model_with(tmp.path(), &changes);
        let plan = assert_identical(&wide, least_inference_budget(&wide));
        assert!(plan.paging.embedding && plan.paging.head, "{plan:?}");
        assert_eq!((plan.head_ring.chunks, plan.head_ring.slots), (3, 2));
    }
}

/// Relative difference of two runs' values, normwise: max |a - b| / max |a|.
fn max_relative(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale
}

#[test]
fn a_paged_head_split_across_bindings_differs_by_rounding_only() {
    // Storage bindings of 1 MiB: the resident head is split into buffers at other rows than its
    // chunk's slot, so the backward sums its dhidden over other pieces.
    let tmp = tempfile::tempdir().unwrap();
    let wide = model_with(tmp.path(), &[("vocab_size", 70_000.into())]);
    let gpu = |device_memory| {
        Gpu::new(&GpuOptions {
            device_memory,
            max_binding_bytes: Some(1 << 20),
            ..GpuOptions::from_env().unwrap()
        })
        .unwrap()
    };
    let run = |gpu: &Gpu| {
        let mut model = Qwen2::load(gpu, &wide).unwrap();
        let lora = LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Proj::ALL.to_vec(),
        };
        let mut adapter = new_adapter(&model.config, &lora, 1).unwrap();
        for pair in adapter.modules.values_mut() {
            pair.b.iter_mut().for_each(|b| *b = 0.01);
        }
        model.apply_adapter(gpu, &adapter).unwrap();
        let rows = supervised_rows(&[13, 6]);
        let batch = as_batch(&rows);
        let grads = Grads::new(gpu, &model).unwrap();
        let loss = model
            .forward_backward(gpu, &grads, &batch, 1.0, None)
            .unwrap();
        let mut values = vec![loss.sum as f32];
        for p in grads.params(&model) {
            values.extend(p.grad.to_f32(gpu).unwrap());
        }
        (values, model.memory_plan().cloned())
    };
    let (resident, _) = run(&gpu(None));
    let (paged, plan) = run(&gpu(Some(least_inference_budget(&wide))));
    assert!(plan.unwrap().paging.head);
    let rel = max_relative(&resident, &paged);
    assert!(rel <= 1e-6, "paged differs from resident by {rel:e}");
}

#[test]
fn streamed_layers_compute_what_resident_layers_compute() {
    // One slot: every layer is uploaded before it runs (the LoRA fixture, and the sharded one).
    assert_streams_identically(&fixtures().join("tiny-qwen2-tied"), 1, (0, 1));
    assert_streams_identically(&fixtures().join("tiny-qwen2-untied"), 1, (0, 1));
    // Five layers: two slots (the next layer's upload queued before this one runs), and two
    // layers resident beside them.
    let tmp = tempfile::tempdir().unwrap();
    let deep = deep_model(tmp.path(), 5);
    assert_streams_identically(&deep, 2, (0, 2));
    assert_streams_identically(&deep, 4, (2, 2));
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `--device-memory NB` an error names as the least that fits.
fn least_budget(err: &str) -> String {
    let at = err.find("(--device-memory ").expect(err) + "(--device-memory ".len();
    let size = &err[at..];
    size[..size.find(')').unwrap()].to_string()
}

/// Each line of a run's metrics without its timing fields.
fn metrics_without_timing(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir)
        .into_iter()
        .map(|mut v| {
            let m = v.as_object_mut().unwrap();
            m.retain(|k, _| !k.contains("_s") && !k.contains("per_s") && !k.contains("peak"));
            v
        })
        .collect()
}

#[test]
fn lora_training_streamed_matches_resident_through_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    // The tied fixture's shapes with 70000 vocabulary entries (three LM head chunks).
    let model_dir = tmp.path().join("wide");
    std::fs::create_dir(&model_dir).unwrap();
    let wide = model_with(&model_dir, &[("vocab_size", 70_000.into())]);
    let init = fixtures().join("tiny-qwen2-tied/adapter-random");
    #[rustfmt::skip]
    let recipe = [
        "--init-adapter", init.to_str().unwrap(), "--optimizer", "adamw", "--lr", "1e-3",
        "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2",
        "--lora-dropout", "0.1",
    ];
    let args_for = |out: &Path| {
        let mut args = train_args(out, &recipe);
        args[2] = wide.display().to_string();
        args
    };
    let resident_dir = tmp.path().join("resident");
    let out = wgtrain(&args_for(&resident_dir));
    assert!(out.status.success(), "{}", stderr(&out));

    // The least budget the run accepts streams every layer through one slot, pages the tied
    // embedding and LM head and offloads the checkpointed layer inputs to host memory.
    let streamed_dir = tmp.path().join("streamed");
    let mut args = args_for(&streamed_dir);
    args.extend(["--device-memory".into(), "1MiB".into()]);
    let refused = wgtrain(&args);
    let err = stderr(&refused);
    assert!(
        !refused.status.success() && err.contains("needs at least"),
        "{err}"
    );
    let least = least_budget(&err);
    *args.last_mut().unwrap() = least.clone();
    let out = wgtrain(&args);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("streamed: layers 0..2, 1 slot(s)"), "{err}");
    assert!(
        err.contains("paged: LM head (tied), 3 chunk(s), 2 slot(s)"),
        "{err}"
    );
    assert!(err.contains("paged: embedding rows of a forward"), "{err}");
    let resident = metrics_without_timing(&resident_dir);
    assert_eq!(resident.len(), 4);
    assert_eq!(metrics_without_timing(&streamed_dir), resident);
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&streamed_dir), adapter(&resident_dir));

    // Resumed from its checkpoint, still streamed: the same steps and adapter.
    let checkpoint = streamed_dir.join("checkpoint-2");
    args.extend(["--resume".into(), checkpoint.display().to_string()]);
    let out = wgtrain(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(metrics_without_timing(&streamed_dir), resident);
    assert_eq!(adapter(&streamed_dir), adapter(&resident_dir));
}

#[test]
fn budgets_that_cannot_be_met_or_read_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-qwen2-tied");
    let data = common::short_data(tmp.path());
    let out = wgtrain(&[
        "loss",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device-memory",
        "100KiB",
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--device-memory 0.1MiB: this run needs at least"),
        "{err}"
    );
    // At the least size named, loss streams every layer and prints the resident loss.
    let loss = |budget: &[&str]| {
        let mut args = vec!["loss", "--model", model.to_str().unwrap()];
        args.extend(["--data", data.to_str().unwrap()]);
        args.extend(budget);
        let out = wgtrain(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
    };
    let least = least_budget(&err);
    assert_eq!(loss(&["--device-memory", &least]), loss(&[]));

    for bad in ["24", "24XB", "GiB", "0MiB", "1.2.3GiB"] {
        let out = wgtrain(&train_args(
            &tmp.path().join("bad"),
            &["--device-memory", bad],
        ));
        let err = stderr(&out);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(
            err.contains(&format!("device memory '{bad}'")),
            "{bad}: {err}"
        );
    }

    // Full fine-tuning's weights do not stream: refused with the size it needs.
    let out = wgtrain(&train_args(
        &tmp.path().join("full"),
        &["--adapter", "full", "--device-memory", "2MiB"],
    ));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("too small for full fine-tuning") && err.contains("it needs"),
        "{err}"
    );
}

#[test]
fn dry_run_plans_from_a_config_only_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-qwen2-untied");
    let config_only = tmp.path().join("config-only");
    std::fs::create_dir(&config_only).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(source.join(file), config_only.join(file)).unwrap();
    }
    // 70000 vocabulary entries: an LM head of three chunks.
    let text = std::fs::read_to_string(source.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["vocab_size"] = 70_000.into();
    std::fs::write(config_only.join("config.json"), json.to_string()).unwrap();
    let run = |extra: &[&str]| {
        let mut args = train_args(&tmp.path().join("run"), extra);
        args[2] = config_only.display().to_string();
        wgtrain(&args)
    };
    let out = run(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout.contains("every weight resident"), "{stdout}");
    assert!(
        stdout.contains("peak device memory during the step"),
        "{stdout}"
    );

    let least = least_budget(&stderr(&run(&["--dry-run", "--device-memory", "1MiB"])));
    let out = run(&["--dry-run", "--device-memory", &least]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout.contains("streamed: layers 0..2, 1 slot(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("peak device memory during the step"),
        "{stdout}"
    );
    // The embedding's rows and the LM head's chunks are paged.
    assert!(
        stdout.contains("paged: embedding rows of a forward")
            && stdout.contains("paged: LM head, 3 chunk(s), 2 slot(s)"),
        "{stdout}"
    );
    // Two layers uploaded: each once in the forward and the backward, but for the one the slot
    // still holds where the forward ends; the head's chunks 0 and 2, which take turns in slot 0,
    // in each (chunk 1 stays in slot 1); and the micro-batch's embedding rows (bf16) and their
    // order (u32).
    let config = Qwen2Config::load(&config_only).unwrap();
    let (layer, _) = weight_bytes(&config, false);
    let head = 2 * ((32768 + 70_000 - 65536) * config.hidden_size as u64 * 2);
    let tokens: u64 = stdout
        .split(" row(s) x ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect(&stdout);
    let rows = tokens * (2 * config.hidden_size as u64 + 4);
    let uploaded = format!(
        "{:10.1} MiB",
        (2 * layer + head + rows) as f64 / (1 << 20) as f64
    );
    assert!(
        stdout.contains(&format!("streamed host -> device in the step   {uploaded}")),
        "{stdout}"
    );
    // Without --dry-run, the missing weights are an error.
    let err = stderr(&run(&[]));
    assert!(err.contains("no weights in"), "{err}");
}
