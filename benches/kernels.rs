//! `cargo bench`: every kernel family at Qwen2.5 model shapes on the default device
//! (`WGTRAIN_BACKEND` / `WGTRAIN_DEVICE` choose another; `WGTRAIN_BENCH_T`, `WGTRAIN_BENCH_REPS`
//! size the runs; `WGTRAIN_BENCH_SIZES=0.5B,1.5B` measures only those models; `WGTRAIN_PEAK_GFLOPS`
//! — the device's FP32 peak — adds a % of peak column).
//! Prints a Markdown table for docs/benchmarks.md.
use wgtrain::model::Qwen2Config;
use wgtrain_kernels::bench::BenchConfig;
use wgtrain_kernels::{ops, Gpu};

/// The Qwen2.5 sizes measured, smallest first.
const SIZES: [&str; 3] = ["0.5B", "1.5B", "7B"];

fn main() -> anyhow::Result<()> {
    // `cargo bench -- <family>...` runs only those families (matmul, attention, ...).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let gpu = Gpu::from_env()?;
    let sizes: Vec<&str> = match std::env::var("WGTRAIN_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|name| {
                SIZES
                    .iter()
                    .copied()
                    .find(|&s| s == name.trim())
                    .ok_or_else(|| {
                        anyhow::anyhow!("WGTRAIN_BENCH_SIZES: '{name}' is not one of {SIZES:?}")
                    })
            })
            .collect::<anyhow::Result<_>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let shapes = sizes
        .iter()
        .map(|&name| Ok(Qwen2Config::qwen25(name)?.kernel_shape(name)))
        .collect::<anyhow::Result<_>>()?;
    let config = BenchConfig::for_gpu(&gpu, shapes);
    println!("device: {}", gpu.describe());
    println!(
        "sequence length {}, median of {} runs, GPU timestamps: {}\n",
        config.seq_len,
        config.reps,
        gpu.has_timestamps()
    );
    let peak: Option<f64> = std::env::var("WGTRAIN_PEAK_GFLOPS")
        .ok()
        .and_then(|v| v.parse().ok());
    println!("| kernel | shape | time (ms) | GFLOP/s | GB/s | % FP32 peak |");
    println!("|---|---|---:|---:|---:|---:|");
    let families = ops::benches();
    let selected = families
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| f == name));
    for (_, bench) in selected {
        // Printed family by family: a full run takes minutes on a CPU adapter.
        for r in bench(&gpu, &config)? {
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
            let of_peak = match peak {
                Some(p) if r.flops > 0.0 => format!("{:.1}", 100.0 * r.gflops() / p),
                _ => "-".into(),
            };
            println!(
                "| {} | {} | {:.3} | {} | {} | {} |",
                r.kernel,
                r.shape,
                r.time.as_secs_f64() * 1e3,
                gflops,
                gbytes,
                of_peak
            );
        }
    }
    Ok(())
}
