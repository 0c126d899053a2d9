//! One module per kernel family: typed launchers (`*_forward` / `*_backward`) that check shapes and
//! walk tensor chunks, plus `cpu`, the f64 reference the tests and `wgtrain selftest` compare with.
pub mod attention;
pub mod check;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod optim;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use anyhow::Result;

use crate::bench::{BenchConfig, BenchResult};
use crate::gpu::Gpu;
use crate::shader::{Kernel, ParamsLayout};

pub use check::Check;

/// Every family's selftest cases, run in order on `gpu`.
pub fn selftest(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    checks.extend(elementwise::selftest(gpu)?);
    checks.extend(matmul::selftest(gpu)?);
    checks.extend(lora::selftest(gpu)?);
    checks.extend(cross_entropy::selftest(gpu)?);
    checks.extend(attention::selftest(gpu)?);
    checks.extend(rope::selftest(gpu)?);
    checks.extend(rmsnorm::selftest(gpu)?);
    checks.extend(swiglu::selftest(gpu)?);
    checks.extend(embedding::selftest(gpu)?);
    checks.extend(optim::selftest(gpu)?);
    Ok(checks)
}

/// Every kernel variant the launchers can build (for the naga translation test).
pub fn variants() -> Vec<Kernel> {
    let mut all = elementwise::variants();
    all.extend(matmul::variants());
    all.extend(lora::variants());
    all.extend(cross_entropy::variants());
    all.extend(attention::variants());
    all.extend(rope::variants());
    all.extend(rmsnorm::variants());
    all.extend(swiglu::variants());
    all.extend(embedding::variants());
    all.extend(optim::variants());
    all
}

/// Every family's uniform `Params` as Rust lays it out (LoRA launches the matmul kernels with
/// theirs), for the test that holds each against its WGSL struct.
pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![
        elementwise::params_layout(),
        matmul::params_layout(),
        cross_entropy::params_layout(),
        attention::params_layout(),
        rope::params_layout(),
        rmsnorm::params_layout(),
        swiglu::params_layout(),
        embedding::params_layout(),
        optim::params_layout(),
    ]
}

/// A family's benchmarks at Qwen2.5 model shapes.
pub type BenchFn = fn(&Gpu, &BenchConfig) -> Result<Vec<BenchResult>>;

/// Every family's benchmarks, by family name (so `cargo bench -- NAME` runs only that family).
pub fn benches() -> Vec<(&'static str, BenchFn)> {
    vec![
        ("elementwise", elementwise::bench),
        ("matmul", matmul::bench),
        ("matmul_decode", matmul::bench_decode),
        ("lora", lora::bench),
        ("cross_entropy", cross_entropy::bench),
        ("attention", attention::bench),
        ("rope", rope::bench),
        ("rmsnorm", rmsnorm::bench),
        ("swiglu", swiglu::bench),
        ("embedding", embedding::bench),
        ("optim", optim::bench),
    ]
}
