//! `wgtrain eval`: grade math generations the way the Qwen2.5-Math harness does.
use crate::eval::generations::load_generations;
use crate::eval::results::{GradedRow, ResultsDir};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Grade generations (no model needed) and write results.jsonl and summary.json.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Generations to grade: JSONL or JSON array of harness rows (`code`, `gt`) or simple rows
    /// (`generation`, `answer`, optional `id`/`idx` and `tokens`).
    #[arg(long)]
    pub grade: PathBuf,
    /// Output directory for results.jsonl and summary.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Reuse an existing output directory, replacing its results.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: EvalArgs) -> Result<i32> {
    let generations = load_generations(&args.grade)?;
    let results = ResultsDir::create(&args.output, args.overwrite)?;
    let rows: Vec<GradedRow> = generations.iter().map(GradedRow::grade).collect();
    let summary = results.write(&rows)?;
    println!("graded {}", args.grade.display());
    println!("{}", summary.table());
    println!(
        "wrote {}/results.jsonl and summary.json",
        results.path().display()
    );
    Ok(0)
}
