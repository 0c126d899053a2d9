//! `wgtrain generate`: KV-cached decoding from a prompt, streamed to stdout.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::device::ModelDeviceArgs;
use crate::data::chat::ChatEncoder;
use crate::data::{Message, Role};
use crate::model::{
    generate, Adapter, GenerateOptions, GenerationConfig, Qwen2, SamplingParams, StreamDecoder,
};

/// Generate text from a prompt (greedy by default).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory, applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as one user turn through the checkpoint's chat template, with the
    /// assistant generation prompt (otherwise the text is tokenized as is).
    #[arg(long)]
    pub chat: bool,
    /// System prompt for --chat (default: whatever the template inserts).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not stop at the end-of-sequence ids of generation_config.json.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print {"prompt_ids", "tokens", "text", "stopped"} at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: ModelDeviceArgs,
}

pub fn run(args: GenerateArgs) -> Result<i32> {
    ensure!(
        args.model.is_dir(),
        "model directory {} does not exist",
        args.model.display()
    );
    let encoder = ChatEncoder::load(&args.model)?;
    let tokenizer = encoder.tokenizer();
    let prompt_ids = if args.chat {
        let system = args.system.iter().map(|s| Message {
            role: Role::System,
            content: s.clone(),
        });
        let user = Message {
            role: Role::User,
            content: args.prompt.clone(),
        };
        let messages: Vec<Message> = system.chain([user]).collect();
        encoder.apply_chat_template(&messages, true)?
    } else {
        tokenizer.encode(&args.prompt)?
    };

    let gpu = args.device.open()?;
    let mut model = Qwen2::load(&gpu, &args.model)?;
    if let Some(dir) = &args.adapter {
        let adapter = Adapter::load(dir, &model.config)?;
        model.apply_adapter(&gpu, &adapter)?;
    }
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        GenerationConfig::load(&args.model, &model.config)?.stop_ids(tokenizer.eos_id())
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_ids,
    };

    let mut stdout = std::io::stdout().lock();
    let mut stream = StreamDecoder::new();
    let generation = generate(&model, &gpu, &prompt_ids, &options, |id| {
        if !args.json {
            let piece = stream.push(tokenizer, id)?;
            stdout.write_all(piece.as_bytes())?;
            stdout.flush().context("writing to stdout")?;
        }
        Ok(())
    })?;
    if args.json {
        let out = json!({
            "prompt_ids": prompt_ids,
            "tokens": generation.tokens,
            "text": tokenizer.decode(&generation.tokens, true)?,
            "stopped": generation.stopped,
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout, "{}", stream.finish(tokenizer)?)?;
    }
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt {} tokens ({:.1} tok/s), generated {} tokens ({:.1} tok/s) on {}",
        prompt_ids.len(),
        rate(prompt_ids.len(), generation.prefill_time),
        generation.tokens.len(),
        rate(
            generation.tokens.len().saturating_sub(1),
            generation.decode_time
        ),
        gpu.describe()
    );
    Ok(0)
}
