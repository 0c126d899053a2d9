//! `wgtrain perturb`: the paper's perturbed variants of a reasoning dataset.
use crate::data::jsonfile::check_can_write;
use crate::data::perturb::{
    DigitsMode, KeywordMatcher, Perturbation, Perturber, Scope, StepPool, StepSplitter,
};
use crate::data::Dataset;
use crate::eval::wrong_answers::{keep_wrong_answers, GroundTruth};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Permute a fraction F of the thought steps among their positions.
    Shuffle,
    /// Delete a fraction F of the thought steps.
    Delete,
    /// Replace a fraction F of the thought steps by steps of other rows (or of --pool).
    Insert,
    /// Corrupt each digit (or number, --digits-mode number) with probability F.
    Digits,
    /// Remove a fraction F of the sentences holding reflection keywords.
    Keywords,
    /// Keep only the rows whose final answer is wrong against --answers.
    WrongAnswers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DigitsModeArg {
    /// Each digit becomes a different random digit.
    Digit,
    /// Each number (`\b\d+(\.\d+)?\b`, a decimal as one) becomes a random integer 0..=10, as the
    /// authors' released corrupt_data.py does.
    Number,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// The thought block only.
    Thought,
    /// The whole assistant turn, solution and boxed answer included.
    Response,
}

/// Write a perturbed copy of a reasoning dataset (only thought blocks change).
#[derive(Args, Debug)]
pub struct PerturbArgs {
    /// Input dataset: JSON array or JSONL of sharegpt (`conversations`) or `messages` rows.
    #[arg(long)]
    pub data: PathBuf,
    /// Output file, written in the input's format.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Fraction F in [0, 1]: of the steps (shuffle, delete, insert), of the keyword sentences
    /// (keywords), or the per-digit probability (digits). Not used by wrong-answers.
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Seed; each row uses its own stream of it, so rows do not depend on each other.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keywords file for --kind keywords, one keyword or phrase per line (replaces the default list).
    #[arg(long)]
    pub keywords: Option<PathBuf>,
    /// Dataset whose thought steps are inserted (--kind insert); default: the other rows of --data.
    #[arg(long)]
    pub pool: Option<PathBuf>,
    /// Regex that separates steps (default: blank lines).
    #[arg(long)]
    pub split: Option<String>,
    /// What --kind digits corrupts [default: digit].
    #[arg(long, value_enum)]
    pub digits_mode: Option<DigitsModeArg>,
    /// Where --kind digits corrupts [default: thought for --digits-mode digit, as the paper
    /// describes; response for number, as the released script does].
    #[arg(long, value_enum)]
    pub scope: Option<ScopeArg>,
    /// Ground truth for --kind wrong-answers: JSONL of {"problem" | "question" | "index", "answer"};
    /// a benchmark file works as is.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Replace --output if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: PerturbArgs) -> Result<i32> {
    check_options(&args)?;
    check_can_write(&args.output, args.overwrite)?;
    let mut dataset = Dataset::load(&args.data)?;

    if args.kind == Kind::WrongAnswers {
        let answers = args.answers.as_ref().expect("checked above");
        let truth = GroundTruth::load(answers)?;
        let summary = keep_wrong_answers(&mut dataset, &truth);
        dataset.save(&args.output, args.overwrite)?;
        println!(
            "perturb wrong-answers: {} -> {}",
            args.data.display(),
            args.output.display()
        );
        println!("  rows                  {}", summary.rows);
        println!("  kept (wrong answer)   {}", summary.wrong);
        println!("  dropped (correct)     {}", summary.correct);
        println!(
            "  dropped (no answer)   {}  (no ground truth or no assistant turn)",
            summary.without_ground_truth
        );
        return Ok(0);
    }

    let fraction = args.fraction.expect("checked above");
    let splitter = match &args.split {
        Some(separator) => StepSplitter::new(separator)?,
        None => StepSplitter::default(),
    };
    let perturbation = match args.kind {
        Kind::Shuffle => Perturbation::Shuffle,
        Kind::Delete => Perturbation::Delete,
        Kind::Insert => Perturbation::Insert(match &args.pool {
            Some(pool) => {
                let pool_data = Dataset::load(pool)?;
                let steps = StepPool::from_dataset(&pool_data, &splitter, false);
                if steps.is_empty() {
                    bail!("the pool {} has no thought steps", pool.display());
                }
                steps
            }
            None => StepPool::from_dataset(&dataset, &splitter, true),
        }),
        Kind::Digits => {
            let mode = match args.digits_mode.unwrap_or(DigitsModeArg::Digit) {
                DigitsModeArg::Digit => DigitsMode::Digit,
                DigitsModeArg::Number => DigitsMode::Number,
            };
            let scope = match args.scope {
                Some(ScopeArg::Thought) => Scope::Thought,
                Some(ScopeArg::Response) => Scope::Response,
                None => mode.default_scope(),
            };
            Perturbation::Digits { mode, scope }
        }
        Kind::Keywords => Perturbation::Keywords(match &args.keywords {
            Some(path) => KeywordMatcher::from_file(path)?,
            None => KeywordMatcher::default(),
        }),
        Kind::WrongAnswers => unreachable!("handled above"),
    };
    let perturber = Perturber {
        perturbation,
        fraction,
        seed: args.seed,
        splitter,
    };
    let summary = perturber.apply(&mut dataset)?;
    dataset
        .save(&args.output, args.overwrite)
        .with_context(|| format!("saving the perturbed dataset to {}", args.output.display()))?;

    let (before, after) = summary.mean_steps();
    let kind = Kind::to_possible_value(&args.kind).expect("kind name");
    let mode = match &perturber.perturbation {
        Perturbation::Digits { mode, .. } => format!(", {mode:?} mode").to_lowercase(),
        _ => String::new(),
    };
    let (scope, nothing_in_scope) = match perturber.perturbation.scope() {
        Scope::Thought => ("thought block", "no thought block"),
        Scope::Response => ("whole assistant turn", "no assistant turn"),
    };
    println!(
        "perturb {}{mode} (fraction {fraction}, seed {}): {} -> {}",
        kind.get_name(),
        args.seed,
        args.data.display(),
        args.output.display()
    );
    println!("  scope                 {scope}");
    println!("  rows                  {}", summary.rows);
    println!("  perturbed             {}", summary.perturbed);
    println!(
        "  unchanged             {}  (in scope, nothing changed)",
        summary.unchanged
    );
    println!(
        "  passed through        {}  ({nothing_in_scope})",
        summary.passed_through
    );
    println!("  mean steps per row    {before:.2} before, {after:.2} after");
    Ok(0)
}

/// Options that only make sense for some kinds are errors with the others.
fn check_options(args: &PerturbArgs) -> Result<()> {
    let kind = args.kind;
    let only_for = |given: bool, option: &str, for_kind: Kind| -> Result<()> {
        if given && kind != for_kind {
            bail!(
                "{option} only applies to --kind {}",
                for_kind.to_possible_value().expect("name").get_name()
            );
        }
        Ok(())
    };
    only_for(args.pool.is_some(), "--pool", Kind::Insert)?;
    only_for(args.keywords.is_some(), "--keywords", Kind::Keywords)?;
    only_for(args.digits_mode.is_some(), "--digits-mode", Kind::Digits)?;
    only_for(args.scope.is_some(), "--scope", Kind::Digits)?;
    only_for(args.answers.is_some(), "--answers", Kind::WrongAnswers)?;
    match (kind, args.fraction) {
        (Kind::WrongAnswers, None) if args.answers.is_none() => {
            bail!("--kind wrong-answers needs --answers FILE")
        }
        (Kind::WrongAnswers, None) => Ok(()),
        (Kind::WrongAnswers, Some(_)) => bail!("--fraction does not apply to --kind wrong-answers"),
        (_, None) => bail!("--fraction F (between 0 and 1) is required"),
        (_, Some(f)) if !(0.0..=1.0).contains(&f) => {
            bail!("--fraction must be between 0 and 1, not {f}")
        }
        _ => Ok(()),
    }
}
