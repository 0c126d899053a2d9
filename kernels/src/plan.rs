//! Which variant of each hot kernel family runs on this adapter: chosen once when the device
//! opens, from what the adapter reports (device type, features, subgroup sizes), printed by
//! `wgtrain devices` and `selftest`, and forced with `WGTRAIN_KERNELS` (e.g.
//! `WGTRAIN_KERNELS=gemm=tiled,attention=tiled`) so that every variant can be tested on any
//! adapter that can run it. A family's launcher reads its entry of [`Gpu::plan`]; a new variant
//! (a CPU-adapter design, subgroups, cooperative matrices) is one more enum value here plus the
//! rule that picks it.
use anyhow::{bail, ensure, Result};

/// What the choice depends on, as the adapter reports it.
#[derive(Clone, Debug)]
pub struct AdapterTraits {
    pub device_type: wgpu::DeviceType,
    /// The features the device was opened with (a subset of [`crate::gpu::OPTIONAL_FEATURES`]).
    pub features: wgpu::Features,
    /// The subgroup sizes the adapter may use (`min_subgroup_size..=max_subgroup_size`); a
    /// subgroup variant must be correct for every size in the range.
    pub subgroup_sizes: (u32, u32),
}

macro_rules! variants {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $spelling:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $spelling),+
                }
            }

            fn parse(family: &str, value: &str) -> Result<$name> {
                match value {
                    $($spelling => Ok($name::$variant),)+
                    _ => bail!(
                        "WGTRAIN_KERNELS: {family}={value} is not a variant (expected one of: {})",
                        [$($spelling),+].join(", ")
                    ),
                }
            }
        }
    };
}

variants!(
    /// Matrix products (projections, their gradients, LoRA, the LM head).
    GemmVariant {
        /// Workgroup-memory tiles: the portable baseline, and what discrete GPUs run.
        Tiled = "tiled",
        /// No workgroup memory and no barriers, A shared across a subgroup by `subgroupBroadcast`
        /// (shaders/matmul_subgroup.wgsl): what CPU adapters run, where barriers and per-lane
        /// loads cost and FMAs are nearly free.
        Subgroup = "subgroup",
    }
);

/// Lanes 0..7 of each subgroup hold the values the subgroup kernels broadcast (the GEMM's A, the
/// attention's key / value / query rows).
const SUBGROUP_LANES: u32 = 8;

/// Whether the adapter runs the subgroup kernels of `family` correctly, and if not, why.
fn subgroup_kernels_run_on(family: &str, adapter: &AdapterTraits) -> Result<()> {
    ensure!(
        adapter.features.contains(wgpu::Features::SUBGROUP),
        "WGTRAIN_KERNELS: {family}=subgroup needs the SUBGROUP feature, which this adapter lacks"
    );
    let (min, max) = adapter.subgroup_sizes;
    ensure!(
        min >= SUBGROUP_LANES,
        "WGTRAIN_KERNELS: {family}=subgroup needs subgroups of at least {SUBGROUP_LANES} lanes, \
         and this adapter may use {min}..={max}"
    );
    Ok(())
}

impl GemmVariant {
    /// Whether the adapter can run this variant correctly, and if not, why.
    fn runs_on(self, adapter: &AdapterTraits) -> Result<()> {
        match self {
            GemmVariant::Tiled => Ok(()),
            GemmVariant::Subgroup => subgroup_kernels_run_on("gemm", adapter),
        }
    }
}

variants!(
    /// Flash attention forward, backward and decode.
    AttentionVariant {
        /// Key/query tiles in workgroup memory: the portable baseline.
        Tiled = "tiled",
        /// The forward (training and decode) with a few query rows per invocation, their heads
        /// in registers, keys and values streamed as vec4 loads; no workgroup memory, no
        /// barriers: for CPU adapters, where each memory operation and barrier costs and FMAs
        /// are nearly free. The backward stays tiled. Baseline WGSL only: CPU adapters without
        /// subgroups of 8 run it.
        Rows = "rows",
        /// Forward and backward with one row per lane, the other side's rows loaded once per
        /// subgroup and shared by `subgroupBroadcast` (shaders/attention_subgroup.wgsl): what
        /// CPU adapters with subgroups of 8 or more run.
        Subgroup = "subgroup",
    }
);

impl AttentionVariant {
    /// Whether the adapter can run this variant correctly, and if not, why.
    fn runs_on(self, adapter: &AdapterTraits) -> Result<()> {
        match self {
            AttentionVariant::Tiled | AttentionVariant::Rows => Ok(()),
            AttentionVariant::Subgroup => subgroup_kernels_run_on("attention", adapter),
        }
    }
}

variants!(
    /// Row-wise kernels: RMSNorm forward (with or without the residual add) and its dX, the
    /// cross-entropy's row statistics over a vocabulary chunk, and the embedding gather.
    RowwiseVariant {
        /// A workgroup per row, its threads across the row (reducing with barriers): GPUs.
        Workgroup = "workgroup",
        /// A thread per row, 8 rows per workgroup, no barrier: CPU adapters, where barriers and
        /// per-workgroup costs outweigh the work of a row.
        Thread = "thread",
    }
);

impl RowwiseVariant {
    /// Rows of a workgroup of the row kernels (their `ROWS_PER_GROUP`): a thread per row takes 8,
    /// one SIMD group of a 256-bit llvmpipe.
    pub fn rows_per_group(self) -> u32 {
        match self {
            RowwiseVariant::Workgroup => 1,
            RowwiseVariant::Thread => 8,
        }
    }
}

/// The variant of each family that this device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPlan {
    pub gemm: GemmVariant,
    pub attention: AttentionVariant,
    pub rowwise: RowwiseVariant,
}

impl KernelPlan {
    /// The plan for an adapter opened with `features`, with the families in `forced`
    /// (`WGTRAIN_KERNELS`) forced.
    pub fn for_adapter(
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        forced: Option<&str>,
    ) -> Result<KernelPlan> {
        let adapter = AdapterTraits {
            device_type: info.device_type,
            features,
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        };
        let plan = KernelPlan::choose(&adapter);
        match forced {
            Some(spec) => plan.forced(spec, &adapter),
            None => Ok(plan),
        }
    }

    /// The plan for an adapter: the fastest variant it runs correctly, measured per device
    /// type; discrete GPUs keep the tiled kernels until a measurement on one says otherwise.
    pub fn choose(adapter: &AdapterTraits) -> KernelPlan {
        let cpu = adapter.device_type == wgpu::DeviceType::Cpu;
        KernelPlan {
            gemm: if cpu && GemmVariant::Subgroup.runs_on(adapter).is_ok() {
                GemmVariant::Subgroup
            } else {
                GemmVariant::Tiled
            },
            // Measured on lavapipe (docs/benchmarks.md, attention variants).
            attention: if cpu && AttentionVariant::Subgroup.runs_on(adapter).is_ok() {
                AttentionVariant::Subgroup
            } else if cpu {
                AttentionVariant::Rows
            } else {
                AttentionVariant::Tiled
            },
            rowwise: if cpu {
                RowwiseVariant::Thread
            } else {
                RowwiseVariant::Workgroup
            },
        }
    }

    /// `self` with the families named in `spec` (`family=variant,...`, as `WGTRAIN_KERNELS`
    /// takes it) forced, each checked against what the adapter can run.
    pub fn forced(self, spec: &str, adapter: &AdapterTraits) -> Result<KernelPlan> {
        let mut plan = self;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((family, value)) = item.split_once('=') else {
                bail!("WGTRAIN_KERNELS: '{item}' is not family=variant (e.g. gemm=tiled)");
            };
            match family.trim() {
                "gemm" => plan.gemm = GemmVariant::parse(family, value.trim())?,
                "attention" => plan.attention = AttentionVariant::parse(family, value.trim())?,
                "rowwise" => plan.rowwise = RowwiseVariant::parse(family, value.trim())?,
                other => bail!(
                    "WGTRAIN_KERNELS: no kernel family '{other}' (families: gemm, attention, rowwise)"
                ),
            }
        }
        plan.check(adapter)?;
        Ok(plan)
    }

    /// Refuses a variant the adapter cannot run (a missing feature or subgroup size).
    fn check(&self, adapter: &AdapterTraits) -> Result<()> {
        self.gemm.runs_on(adapter)?;
        self.attention.runs_on(adapter)
    }

    /// One line for `wgtrain devices`, `selftest` and run logs, e.g.
    /// `gemm=tiled attention=tiled rowwise=workgroup`.
    pub fn describe(&self) -> String {
        format!(
            "gemm={} attention={} rowwise={}",
            self.gemm.name(),
            self.attention.name(),
            self.rowwise.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lavapipe() -> AdapterTraits {
        AdapterTraits {
            device_type: wgpu::DeviceType::Cpu,
            features: wgpu::Features::SUBGROUP,
            subgroup_sizes: (8, 8),
        }
    }

    #[test]
    fn cpu_adapters_with_wide_subgroups_take_the_subgroup_gemm() {
        assert_eq!(KernelPlan::choose(&lavapipe()).gemm, GemmVariant::Subgroup);
        let gpu = AdapterTraits {
            device_type: wgpu::DeviceType::DiscreteGpu,
            subgroup_sizes: (32, 32),
            ..lavapipe()
        };
        assert_eq!(KernelPlan::choose(&gpu).gemm, GemmVariant::Tiled);
        // Forcing it onto a GPU that can run it is allowed (that is how it gets measured there).
        let forced = KernelPlan::choose(&gpu)
            .forced("gemm=subgroup", &gpu)
            .unwrap();
        assert_eq!(forced.gemm, GemmVariant::Subgroup);
    }

    #[test]
    fn subgroup_kernels_are_refused_where_they_would_be_wrong() {
        let no_subgroups = AdapterTraits {
            features: wgpu::Features::empty(),
            ..lavapipe()
        };
        let narrow = AdapterTraits {
            subgroup_sizes: (4, 32),
            ..lavapipe()
        };
        for (adapter, expected) in [
            (&no_subgroups, "needs the SUBGROUP feature"),
            (
                &narrow,
                "needs subgroups of at least 8 lanes, and this adapter may use 4..=32",
            ),
        ] {
            let plan = KernelPlan::choose(adapter);
            assert_eq!(plan.gemm, GemmVariant::Tiled);
            assert_eq!(plan.attention, AttentionVariant::Rows);
            for family in ["gemm", "attention"] {
                let spec = format!("{family}=subgroup");
                let err = plan.forced(&spec, adapter).unwrap_err().to_string();
                assert!(err.contains(&format!("{spec} {expected}")), "{err}");
            }
        }
    }

    #[test]
    fn cpu_adapters_take_subgroup_attention_and_thread_rows_and_gpus_tiled() {
        let cpu = KernelPlan::choose(&lavapipe());
        assert_eq!(cpu.attention, AttentionVariant::Subgroup);
        assert_eq!(cpu.rowwise, RowwiseVariant::Thread);
        for device_type in [
            wgpu::DeviceType::DiscreteGpu,
            wgpu::DeviceType::IntegratedGpu,
        ] {
            let gpu = AdapterTraits {
                device_type,
                features: wgpu::Features::SUBGROUP,
                subgroup_sizes: (32, 32),
            };
            let plan = KernelPlan::choose(&gpu);
            assert_eq!(plan.attention, AttentionVariant::Tiled);
            assert_eq!(plan.rowwise, RowwiseVariant::Workgroup);
        }
        let forced = KernelPlan::choose(&lavapipe())
            .forced("attention=tiled", &lavapipe())
            .unwrap();
        assert_eq!(forced.attention, AttentionVariant::Tiled);
    }

    #[test]
    fn forcing_names_family_and_variant() {
        let adapter = lavapipe();
        let plan = KernelPlan::choose(&adapter);
        let forced = plan
            .forced("gemm=tiled, attention=tiled, rowwise=workgroup", &adapter)
            .unwrap();
        assert_eq!(
            forced.describe(),
            "gemm=tiled attention=tiled rowwise=workgroup"
        );
        for (spec, expected) in [
            ("gemm", "is not family=variant"),
            (
                "gemm=fast",
                "gemm=fast is not a variant (expected one of: tiled, subgroup",
            ),
            ("softmax=tiled", "no kernel family 'softmax'"),
        ] {
            let err = plan.forced(spec, &adapter).unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }
}
