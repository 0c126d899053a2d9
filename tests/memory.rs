//! Device memory of training at Qwen2.5-0.5B's real shapes, measured on the real code path (the
//! trainer's step: zero grads, forward + backward, gradient norm, AdamW) on a dry-run device,
//! which allocates every tensor and executes nothing; zero weights, so nothing is uploaded.
//! The target: a LoRA step at T = 16384 fits in 8 GiB.
use wgtrain::model::Proj;
use wgtrain::model::{Grads, LayerActs, LoraDropout, Qwen2, Qwen2Config};
use wgtrain::train::config::{LoraSettings, OptimizerKind, OptimizerSettings};
use wgtrain::train::step::{gradients, new_moments, update, MemoryReport, MicroBatch};
use wgtrain::train::trainer::new_adapter;
use wgtrain_kernels::{DType, Gpu, GpuOptions, Tensor};

const GIB: u64 = 1 << 30;

fn dry_gpu() -> Gpu {
    Gpu::new(&GpuOptions {
        dry_run: true,
        ..GpuOptions::from_env().unwrap()
    })
    .unwrap()
}

/// One AdamW step on one row of `t` tokens, every target supervised, recomputing each layer (what
/// a GPU without a budget does; a CPU adapter keeps the activations where its host's memory
/// allows, docs/training.md).
fn step(gpu: &Gpu, model: &mut Qwen2, t: usize, dropout: Option<LoraDropout>) -> MemoryReport {
    model.set_keep_activations(Some(false));
    let model = &*model;
    let grads = Grads::new(gpu, model).unwrap();
    let params = grads.params(model);
    let moments = new_moments(gpu, &params, OptimizerKind::Adamw).unwrap();
    let norm_sq = Tensor::zeros(gpu, &[1], DType::F32).unwrap();
    let ids: Vec<u32> = (0..t as u32).collect();
    let targets: Vec<u32> = (1..=t as u32).collect();
    let settings = OptimizerSettings {
        kind: OptimizerKind::Adamw,
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    gpu.reset_peak();
    let micro = MicroBatch {
        rows: vec![(&ids, &targets)],
        dropout,
    };
    gradients(gpu, model, &grads, &[micro], &norm_sq).unwrap();
    let clip = Some((&norm_sq, 1.0));
    update(gpu, &params, &moments, &settings, 1e-4, 0, clip).unwrap();
    MemoryReport::new(gpu, model, &params, &moments, (1, t), gpu.memory().peak).unwrap()
}

/// The resident set of this process (Linux), to show that a dry run touches no buffer.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[test]
fn qwen25_05b_lora_step_at_16k_tokens_fits_8_gib() {
    let gpu = dry_gpu();
    let config = Qwen2Config::qwen25("0.5B").unwrap();
    let (hidden, layers) = (config.hidden_size, config.num_hidden_layers);
    let config_intermediate = config.intermediate_size;
    let mut model = Qwen2::zeroed(&gpu, config, false).unwrap();
    let lora = LoraSettings {
        rank: 64,
        alpha: 128.0,
        dropout: 0.0,
        targets: Proj::ALL.to_vec(),
    };
    model
        .apply_adapter(&gpu, &new_adapter(&model.config, &lora, 0).unwrap())
        .unwrap();
    let t = 16384;
    let r = step(&gpu, &mut model, t, None);
    eprintln!("{r}");
    // 494M bf16 weights (the tied embedding counted once) and 35M LoRA parameters, ×4 with grads
    // and moments.
    assert!((940 << 20..950 << 20).contains(&r.frozen), "{r:?}");
    assert!((130 << 20..140 << 20).contains(&r.trainable), "{r:?}");
    assert_eq!((r.gradients, r.optimizer), (r.trainable, 2 * r.trainable));
    // Every layer's input is kept for the backward, and one layer's activations recomputed: a
    // counter that misses tensors falls below.
    let layer_inputs = ((layers + 1) * t * hidden * 4) as u64;
    let state = r.trainable + r.gradients + r.optimizer;
    let floor = r.frozen + state + layer_inputs + LayerActs::bytes(&model, t);
    assert!(r.peak > floor, "{r:?}");
    assert!(r.peak <= 8 * GIB, "{r:?}");
    // LoRA dropout adds its materialised inputs of one layer, and still fits.
    let with_dropout = step(&gpu, &mut model, t, Some(LoraDropout { p: 0.1, seed: 1 }));
    eprintln!("with LoRA dropout 0.1: {with_dropout}");
    let one_layer_inputs = (t * (6 * hidden + config_intermediate) * 4) as u64;
    assert!(
        with_dropout.peak >= r.peak + one_layer_inputs / 2,
        "{with_dropout:?}"
    );
    assert!(with_dropout.peak <= 8 * GIB, "{with_dropout:?}");
    if let Some(rss) = rss_bytes() {
        eprintln!("resident set: {} MiB", rss >> 20);
        assert!(
            rss < r.peak / 4,
            "the dry run touched device memory: RSS {rss}"
        );
    }
}

#[test]
fn qwen25_05b_full_finetuning_at_4k_tokens_holds_weights_grads_and_moments() {
    let gpu = dry_gpu();
    let config = Qwen2Config::qwen25("0.5B").unwrap();
    let (hidden, layers) = (config.hidden_size, config.num_hidden_layers);
    let mut model = Qwen2::zeroed(&gpu, config, true).unwrap();
    let t = 4096;
    let r = step(&gpu, &mut model, t, None);
    eprintln!("{r}");
    // f32 master weights are the trainable parameters: 494M × 4 bytes, and as much again for the
    // gradients and each AdamW moment.
    let weights = model.device_bytes();
    assert!((1880 << 20..1890 << 20).contains(&weights), "{weights}");
    assert_eq!((r.frozen, r.trainable), (0, weights));
    assert_eq!((r.gradients, r.optimizer), (weights, 2 * weights));
    // On top: the layer inputs and one layer's recomputed activations, then that layer's
    // activation gradients and the kernels' temporaries (under 0.5 GiB at 4096 tokens).
    let floor = 4 * weights + ((layers + 1) * t * hidden * 4) as u64 + LayerActs::bytes(&model, t);
    assert!((floor..floor + GIB / 2).contains(&r.peak), "{r:?}");
}
