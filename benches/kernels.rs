//! `cargo bench`: every kernel family at Qwen2.5 model shapes on the default device
//! (`WGTRAIN_BACKEND` / `WGTRAIN_DEVICE` choose another; `WGTRAIN_BENCH_T`, `WGTRAIN_BENCH_REPS`
//! size the runs). Prints a Markdown table for docs/benchmarks.md.
use wgtrain_kernels::bench::BenchConfig;
use wgtrain_kernels::{ops, Gpu};

fn main() -> anyhow::Result<()> {
    // `cargo bench -- <family>...` runs only those families (matmul, attention, ...).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let gpu = Gpu::from_env()?;
    let config = BenchConfig::for_gpu(&gpu);
    println!("device: {}", gpu.describe());
    println!(
        "sequence length {}, median of {} runs, GPU timestamps: {}\n",
        config.seq_len,
        config.reps,
        gpu.has_timestamps()
    );
    println!("| kernel | shape | time (ms) | GFLOP/s | GB/s |");
    println!("|---|---|---:|---:|---:|");
    let families = ops::benches();
    let selected = families
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| f == name));
    for r in selected
        .map(|(_, bench)| bench(&gpu, config))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
    {
        let gflops = if r.flops > 0.0 {
            format!("{:.1}", r.gflops())
        } else {
            "-".into()
        };
        let gbytes = if r.bytes > 0.0 {
            format!("{:.1}", r.gbytes())
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {:.3} | {} | {} |",
            r.kernel,
            r.shape,
            r.time.as_secs_f64() * 1e3,
            gflops,
            gbytes
        );
    }
    Ok(())
}
