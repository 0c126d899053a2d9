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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(args) => cli::device::devices(args),
        Command::Selftest(args) => cli::device::selftest(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    }
}
