//! Model-driven evaluation (`wgtrain eval --model`): generate an answer to every benchmark problem
//! with the KV cache, grade it, and append it to `results.jsonl` as soon as it and every problem
//! before it are done, so a run that stops (crash, Ctrl-C) resumes after the last written row.
//!
//! Every (problem, sample) pair is one sequence of [`generate_batch`]: up to `batch_size` of them
//! decode together, a finished one's slot going to the next pair at once, each with its own
//! seeded sampler, so the rows do not depend on the batch size (greedy rows are identical; see
//! docs/eval.md). Rows are written in problem order: a finished problem waits for the earlier ones
//! still in flight, and a stopped run loses those in flight and those waiting.
//!
//! The output directory holds `run.json` (what was evaluated and how), `results.jsonl` (one row per
//! problem, in benchmark order) and `summary.json`. A directory is only ever resumed by the same
//! run: another benchmark, model, prompt or decoding setting is an error, not a silent mix (the
//! batch size is none of these, and may change between runs).
use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wgtrain_kernels::Gpu;

use super::bench::{self, Problem};
use super::generations::Generation;
use super::grader::{Benchmark, GroundTruth};
use super::prompt;
use super::results::{GradedRow, Summary};
use crate::data::chat::ChatEncoder;
use crate::data::jsonfile;
use crate::model::{
    generate_batch, Adapter, BatchEvent, BatchRequest, GenerateOptions, GenerationConfig, KvCache,
    Qwen2, SamplingParams,
};

pub const RUN_FILE: &str = "run.json";
pub const RESULTS_FILE: &str = "results.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub bench: PathBuf,
    /// The benchmark's name in run.json and the summary (default: the file's stem).
    pub name: Option<String>,
    pub output: PathBuf,
    /// The prompt's name (`NamedPrompt::name`, or `prompt::CUSTOM_PROMPT` for `--system`), for
    /// run.json and the summary.
    pub prompt: String,
    pub system: String,
    pub max_new_tokens: usize,
    /// `seed` is the run's seed; each sample draws its own from it (see `sample_seeds`).
    pub sampling: SamplingParams,
    pub samples: usize,
    /// Evaluate only the first `limit` problems.
    pub limit: Option<usize>,
    /// Sequences (problem, sample pairs) decoded together.
    pub batch_size: usize,
    /// Start over in an existing output directory.
    pub overwrite: bool,
}

/// One generation beyond a problem's first (with `samples` > 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub generation: String,
    pub extracted: String,
    pub correct: bool,
    pub tokens: u64,
    pub truncated: bool,
    pub seconds: f64,
}

/// A row of `results.jsonl`: the first sample graded as `wgtrain eval --grade` writes it (so
/// `correct` is greedy pass@1), then the other samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    #[serde(flatten)]
    pub first: GradedRow,
    /// Cut at `max_new_tokens` rather than ended by an end-of-sequence id.
    pub truncated: bool,
    /// Generation time of the first sample: its prefill plus its share of each batched decoding
    /// step (the step's time over the sequences in it), so the rows' times add up to the run's.
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_samples: Vec<Sample>,
}

/// What the summary needs of one sample.
struct SampleStats {
    correct: bool,
    tokens: u64,
    truncated: bool,
    seconds: f64,
}

impl EvalRow {
    /// Every sample, the first included.
    fn samples(&self) -> impl Iterator<Item = SampleStats> + '_ {
        let first = SampleStats {
            correct: self.first.correct,
            tokens: self.first.tokens.unwrap_or(0),
            truncated: self.truncated,
            seconds: self.seconds,
        };
        std::iter::once(first).chain(self.more_samples.iter().map(|s| SampleStats {
            correct: s.correct,
            tokens: s.tokens,
            truncated: s.truncated,
            seconds: s.seconds,
        }))
    }
}

/// `summary.json`: the `--grade` summary of the first samples plus the sampling and speed figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalSummary {
    pub bench: String,
    /// The prompt's name (see `EvalOptions::prompt`).
    pub prompt: String,
    #[serde(flatten)]
    pub graded: Summary,
    pub samples_per_problem: usize,
    /// Fraction correct over every sample of every problem (= accuracy with one sample).
    pub mean_sample_accuracy: f64,
    /// Samples cut at max_new_tokens.
    pub truncated: usize,
    pub generated_tokens: u64,
    /// Generation time of every sample (also of rows generated by earlier runs): the wall-clock
    /// time of generating them, batched as they were.
    pub generation_seconds: f64,
    pub tokens_per_second: f64,
    /// Problems generated by this invocation; the others were already in results.jsonl.
    pub generated_this_run: usize,
    pub device: String,
}

impl EvalSummary {
    pub fn of(
        bench: &str,
        prompt: &str,
        rows: &[EvalRow],
        generated_this_run: usize,
        device: String,
    ) -> Self {
        let firsts: Vec<GradedRow> = rows.iter().map(|row| row.first.clone()).collect();
        let samples: Vec<_> = rows.iter().flat_map(EvalRow::samples).collect();
        let generated_tokens: u64 = samples.iter().map(|s| s.tokens).sum();
        let generation_seconds: f64 = samples.iter().map(|s| s.seconds).sum();
        let correct = samples.iter().filter(|s| s.correct).count();
        EvalSummary {
            bench: bench.to_string(),
            prompt: prompt.to_string(),
            graded: Summary::of(&firsts),
            samples_per_problem: rows.first().map_or(0, |row| 1 + row.more_samples.len()),
            mean_sample_accuracy: correct as f64 / samples.len().max(1) as f64,
            truncated: samples.iter().filter(|s| s.truncated).count(),
            generated_tokens,
            generation_seconds,
            tokens_per_second: generated_tokens as f64 / generation_seconds.max(1e-9),
            generated_this_run,
            device,
        }
    }

    /// The `--grade` table with the benchmark, sampling and throughput lines around it.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{}: {} problems, {} sample(s) each, {} cut at --max-new-tokens\n{}\n",
            self.bench,
            self.graded.n,
            self.samples_per_problem,
            self.truncated,
            self.graded.table()
        );
        if self.samples_per_problem > 1 {
            out += &format!(
                "mean accuracy over all samples: {:.1}%\n",
                100.0 * self.mean_sample_accuracy
            );
        }
        out += &format!(
            "throughput: {} tokens in {:.2} s = {:.1} tokens/s ({} generated now, {} resumed) on {}",
            self.generated_tokens,
            self.generation_seconds,
            self.tokens_per_second,
            self.generated_this_run,
            self.graded.n - self.generated_this_run,
            self.device
        );
        out
    }
}

/// `run.json`: everything that decides the rows (not `--limit`, which only says how many).
#[derive(Serialize)]
struct RunInfo<'a> {
    bench: &'a str,
    bench_problems: usize,
    bench_fingerprint: String,
    model: String,
    adapter: Option<String>,
    prompt: &'a str,
    system_prompt: &'a str,
    max_new_tokens: usize,
    samples: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
}

/// FNV-1a over ids, problems and answers: an edited or different file with the same name is not
/// the same benchmark.
fn fingerprint(problems: &[Problem]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for p in problems {
        for field in [p.id.to_string().as_str(), &p.problem, &p.answer] {
            for byte in field.bytes().chain([0]) {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    format!("{hash:016x}")
}

fn canonical(path: &Path) -> Result<String> {
    let path =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(path.display().to_string())
}

/// Makes `dir` ready for this run: new, emptied of results (`overwrite`), or resumable because
/// its run.json describes the same run.
fn prepare_dir(dir: &Path, info: &str, overwrite: bool) -> Result<()> {
    let run_path = dir.join(RUN_FILE);
    if overwrite {
        for name in [RESULTS_FILE, SUMMARY_FILE] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    } else if run_path.exists() {
        let text = std::fs::read_to_string(&run_path)
            .with_context(|| format!("reading {}", run_path.display()))?;
        let old: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", run_path.display()))?;
        let new: Value = serde_json::from_str(info)?;
        let differences = differences(&old, &new);
        if !differences.is_empty() {
            bail!(
                "{} holds the results of a different run ({}); pass --overwrite to start over, or \
                 choose another --output",
                dir.display(),
                differences.join("; ")
            );
        }
        return Ok(());
    } else if dir.exists() {
        let mut entries = dir
            .read_dir()
            .with_context(|| format!("reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty and has no {RUN_FILE} of `wgtrain eval --model`; refusing to mix \
                 results into it (pass --overwrite to replace its results, or choose another \
                 --output)",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    jsonfile::write_atomically(&run_path, info.as_bytes(), true)
}

/// "key: was X, now Y" for each field of `new` that `old` lacks or holds differently.
fn differences(old: &Value, new: &Value) -> Vec<String> {
    let short = |v: Option<&Value>| {
        let text = v.map_or("nothing".to_string(), Value::to_string);
        match text.char_indices().nth(60) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        }
    };
    let Some(fields) = new.as_object() else {
        return Vec::new();
    };
    fields
        .iter()
        .filter(|(key, value)| old.get(key.as_str()) != Some(*value))
        .map(|(key, value)| {
            format!(
                "{key}: was {}, now {}",
                short(old.get(key.as_str())),
                short(Some(value))
            )
        })
        .collect()
}

/// The rows already in `path`, checked against the benchmark's ids in order. A last line without
/// its newline is a row cut off by a crash: it is removed and its problem generated again.
fn read_rows(path: &Path, problems: &[Problem]) -> Result<Vec<EvalRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    let mut whole = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if !line.ends_with('\n') {
            eprintln!(
                "{}:{}: dropping an unfinished row (the run stopped while writing it)",
                path.display(),
                index + 1
            );
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(whole as u64));
            file.with_context(|| format!("truncating {}", path.display()))?;
            break;
        }
        let at = || format!("{}:{}", path.display(), index + 1);
        let row: EvalRow = serde_json::from_str(line)
            .with_context(|| format!("{}: not a row of `wgtrain eval --model`", at()))?;
        let Some(problem) = problems.get(index) else {
            bail!("{}: more rows than the benchmark has problems", at());
        };
        ensure!(
            row.first.id == problem.id,
            "{}: row for id {} where the benchmark has {}: the rows are not this benchmark's \
             (pass --overwrite to start over)",
            at(),
            row.first.id,
            problem.id
        );
        rows.push(row);
        whole += line.len();
    }
    Ok(rows)
}

/// Seeds of a problem's samples: a ChaCha8 stream per problem index, so they depend only on the
/// run's seed and the problem, not on where a run was resumed.
fn sample_seeds(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// One graded sample: the row, whether it was cut at max_new_tokens, its generation time.
type Graded = (GradedRow, bool, f64);

impl EvalRow {
    /// The row of one problem's samples, in sample order.
    fn of(samples: Vec<Graded>) -> Result<EvalRow> {
        let mut samples = samples.into_iter();
        let Some((first, truncated, seconds)) = samples.next() else {
            bail!("--samples must be at least 1");
        };
        let more_samples = samples
            .map(|(row, truncated, seconds)| Sample {
                generation: row.generation,
                extracted: row.extracted,
                correct: row.correct,
                tokens: row.tokens.unwrap_or(0),
                truncated,
                seconds,
            })
            .collect();
        Ok(EvalRow {
            first,
            truncated,
            seconds,
            more_samples,
        })
    }
}

/// The loaded model and what generation needs besides it.
struct Generator<'a> {
    gpu: &'a Gpu,
    model: Qwen2,
    encoder: ChatEncoder,
    options: GenerateOptions,
}

impl Generator<'_> {
    /// Generates and grades every sample of problems `todo`, `eval.batch_size` sequences at a
    /// time, handing each problem's row to `on_row` in problem order as soon as it and the ones
    /// before it are done.
    fn rows(
        &self,
        eval: &EvalOptions,
        problems: &[Problem],
        todo: Range<usize>,
        mut on_row: impl FnMut(usize, EvalRow) -> Result<()>,
    ) -> Result<()> {
        let Generator {
            gpu,
            model,
            encoder,
            options,
        } = self;
        let prompts = todo
            .clone()
            .map(|i| {
                let messages = prompt::messages(&eval.system, &problems[i].problem);
                encoder.apply_chat_template(&messages, true)
            })
            .collect::<Result<Vec<_>>>()?;
        let samples = eval.samples;
        let mut requests = Vec::with_capacity(prompts.len() * samples);
        for (prompt, index) in prompts.iter().zip(todo.clone()) {
            let mut seeds = sample_seeds(eval.sampling.seed, index);
            for _ in 0..samples {
                requests.push(BatchRequest {
                    prompt,
                    seed: seeds.next_u64(),
                });
            }
        }
        let slots = eval.batch_size.min(requests.len());
        let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + options.max_new_tokens;
        eprintln!(
            "generating {} sequences, up to {slots} at a time (KV cache {slots} x {capacity} \
             tokens, {} MiB)",
            requests.len(),
            KvCache::bytes(&model.config, slots, capacity) >> 20
        );
        // Each problem's finished samples, until its row is handed on.
        let mut finished: Vec<Vec<Option<Graded>>> = vec![vec![None; samples]; prompts.len()];
        let mut handed = 0;
        let tokenizer = encoder.tokenizer();
        generate_batch(model, gpu, &requests, options, eval.batch_size, |event| {
            let BatchEvent::Done { index, generation } = event else {
                return Ok(());
            };
            let problem = &problems[todo.start + index / samples];
            let graded = GradedRow::grade(
                &Generation {
                    id: problem.id.clone(),
                    text: tokenizer.decode(&generation.tokens, true)?,
                    ground_truth: GroundTruth::from_answer(&problem.answer),
                    tokens: Some(generation.tokens.len() as u64),
                },
                Benchmark::DEFAULT,
            );
            let seconds = (generation.prefill_time + generation.decode_time).as_secs_f64();
            finished[index / samples][index % samples] =
                Some((graded, !generation.stopped, seconds));
            while handed < finished.len() && finished[handed].iter().all(Option::is_some) {
                let row = EvalRow::of(
                    std::mem::take(&mut finished[handed])
                        .into_iter()
                        .flatten()
                        .collect(),
                )?;
                on_row(todo.start + handed, row)?;
                handed += 1;
            }
            Ok(())
        })
        .with_context(|| {
            format!(
                "generating problems {} to {} (ids {} to {})",
                todo.start + 1,
                todo.end,
                problems[todo.start].id,
                problems[todo.end - 1].id
            )
        })?;
        Ok(())
    }
}

/// Runs (or resumes) an evaluation; writes summary.json and returns the summary of the first
/// `limit` problems.
pub fn evaluate(gpu: &Gpu, eval: &EvalOptions) -> Result<EvalSummary> {
    ensure!(eval.samples > 0, "--samples must be at least 1");
    ensure!(
        eval.max_new_tokens > 0,
        "--max-new-tokens must be at least 1"
    );
    ensure!(
        eval.samples == 1 || eval.sampling.temperature > 0.0,
        "--samples {} with greedy decoding would repeat one generation; set --temperature",
        eval.samples
    );
    ensure!(eval.limit != Some(0), "--limit must be at least 1");
    ensure!(eval.batch_size > 0, "--batch-size must be at least 1");
    // Refuse bad temperature/top-p before any file is touched.
    crate::model::Sampler::new(eval.sampling)?;
    ensure!(
        eval.model.is_dir(),
        "model directory {} does not exist",
        eval.model.display()
    );
    let problems = bench::load(&eval.bench)?;
    ensure!(
        !problems.is_empty(),
        "{}: no problems",
        eval.bench.display()
    );
    let n = eval.limit.map_or(problems.len(), |l| l.min(problems.len()));
    let name = match &eval.name {
        Some(name) => name.clone(),
        None => eval
            .bench
            .file_stem()
            .map_or("bench".into(), |s| s.to_string_lossy().into_owned()),
    };
    let info = RunInfo {
        bench: &name,
        bench_problems: problems.len(),
        bench_fingerprint: fingerprint(&problems),
        model: canonical(&eval.model)?,
        adapter: eval.adapter.as_deref().map(canonical).transpose()?,
        prompt: &eval.prompt,
        system_prompt: &eval.system,
        max_new_tokens: eval.max_new_tokens,
        samples: eval.samples,
        temperature: eval.sampling.temperature,
        top_k: eval.sampling.top_k,
        top_p: eval.sampling.top_p,
        seed: eval.sampling.seed,
    };
    prepare_dir(
        &eval.output,
        &(serde_json::to_string_pretty(&info)? + "\n"),
        eval.overwrite,
    )?;
    let results_path = eval.output.join(RESULTS_FILE);
    let mut rows = read_rows(&results_path, &problems)?;
    if !rows.is_empty() {
        eprintln!(
            "resuming {}: {} of {n} problems already done",
            eval.output.display(),
            rows.len().min(n)
        );
    }
    let resumed = rows.len();
    if resumed < n {
        let encoder = ChatEncoder::load(&eval.model)?;
        let mut model = Qwen2::load(gpu, &eval.model)?;
        if let Some(dir) = &eval.adapter {
            let adapter = Adapter::load(dir, &model.config)?;
            model.apply_adapter(gpu, &adapter)?;
        }
        let stop_ids = GenerationConfig::load(&eval.model, &model.config)?
            .stop_ids(encoder.tokenizer().eos_id());
        let generator = Generator {
            gpu,
            model,
            encoder,
            options: GenerateOptions {
                max_new_tokens: eval.max_new_tokens,
                sampling: eval.sampling,
                stop_ids,
            },
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .with_context(|| format!("opening {}", results_path.display()))?;
        let on_row = |index: usize, row: EvalRow| -> Result<()> {
            let line = serde_json::to_string(&row)? + "\n";
            // One write per row, synced: a crash leaves whole rows and at most one cut-off line.
            file.write_all(line.as_bytes())
                .and_then(|()| file.sync_data())
                .with_context(|| format!("appending to {}", results_path.display()))?;
            let tokens = row.first.tokens.unwrap_or(0);
            eprintln!(
                "[{}/{n}] id {}: {}, {tokens} tokens, {:.1} tokens/s",
                index + 1,
                problems[index].id,
                if row.first.correct {
                    "correct"
                } else {
                    "wrong"
                },
                tokens as f64 / row.seconds.max(1e-9)
            );
            rows.push(row);
            Ok(())
        };
        generator.rows(eval, &problems, resumed..n, on_row)?;
    }
    let summary = EvalSummary::of(
        &name,
        &eval.prompt,
        &rows[..n],
        n.saturating_sub(resumed),
        gpu.describe(),
    );
    let summary_json = serde_json::to_string_pretty(&summary)? + "\n";
    jsonfile::write_atomically(
        &eval.output.join(SUMMARY_FILE),
        summary_json.as_bytes(),
        true,
    )?;
    Ok(summary)
}
