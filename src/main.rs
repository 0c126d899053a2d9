use clap::{Parser, Subcommand};
use wgtrain::cli;

/// wgtrain: LLM fine-tuning on any GPU (Vulkan, Metal, DX12, GL) with hand-written WGSL kernels.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter wgpu can see, with backend, driver, features and limits.
    Devices(cli::device::DevicesArgs),
    /// Run every kernel against its CPU reference on the chosen device and print a table.
    Selftest(cli::device::SelftestArgs),
    /// Write a perturbed copy of a reasoning dataset: shuffled, deleted or inserted steps,
    /// corrupted digits, removed reflection keywords, or only the wrong answers.
    Perturb(cli::perturb::PerturbArgs),
    /// Grade math generations like the Qwen2.5-Math harness (--grade FILE needs no model).
    Eval(cli::eval::EvalArgs),
    /// Masked mean next-token loss of a model (and adapter) over a dataset, as JSON.
    Loss(cli::loss::LossArgs),
    /// Generate text from a prompt with the KV cache (greedy or sampled), streamed to stdout.
    Generate(cli::generate::GenerateArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(args) => cli::device::devices(args),
        Command::Selftest(args) => cli::device::selftest(args),
        Command::Perturb(args) => cli::perturb::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Loss(args) => cli::loss::run(args),
        Command::Generate(args) => cli::generate::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    }
}
