//! Vendor neutrality without the hardware: every kernel variant the launchers can build is validated
//! by naga with only WebGPU's baseline capabilities (plus subgroup operations in compute shaders
//! for the kernels that need the SUBGROUP feature, as WebGPU's `subgroups` extension allows) and
//! translated to MSL (Metal), HLSL (DX12), SPIR-V (Vulkan) and GLSL ES 3.1 (GL), and its workgroup
//! memory is checked against WebGPU's baseline limit. Also checks that no file or entry point in
//! shaders/ escapes.
use std::collections::BTreeSet;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};
use wgtrain_kernels::shader::Kernel;
use wgtrain_kernels::{ops, shader};

/// WebGPU's baseline maxComputeWorkgroupStorageSize.
const BASELINE_WORKGROUP_BYTES: u32 = 16384;

fn translate(kernel: &Kernel) -> Result<(), String> {
    let source = &kernel.source();
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let subgroups = kernel.shader.features.contains(wgpu::Features::SUBGROUP);
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::empty());
    if subgroups {
        validator = Validator::new(ValidationFlags::all(), Capabilities::SUBGROUP);
        validator
            .subgroup_stages(ShaderStages::COMPUTE)
            .subgroup_operations(SubgroupOperationSet::BASIC | SubgroupOperationSet::BALLOT);
    }
    let info = validator.validate(&module).map_err(|e| {
        format!(
            "validation (baseline capabilities): {}",
            e.emit_to_string(source)
        )
    })?;
    for (i, ep) in module.entry_points.iter().enumerate() {
        let used = info.get_entry_point(i);
        let workgroup_bytes: u32 = module
            .global_variables
            .iter()
            .filter(|&(h, var)| var.space == naga::AddressSpace::WorkGroup && !used[h].is_empty())
            .map(|(_, var)| module.types[var.ty].inner.size(module.to_ctx()))
            .sum();
        if workgroup_bytes > BASELINE_WORKGROUP_BYTES {
            return Err(format!(
                "{}: {workgroup_bytes} bytes of workgroup memory, over the baseline {BASELINE_WORKGROUP_BYTES}",
                ep.name
            ));
        }
    }
    msl::write_string(
        &module,
        &info,
        &msl::Options::default(),
        &msl::PipelineOptions::default(),
    )
    .map_err(|e| format!("MSL: {e}"))?;
    let mut hlsl_out = String::new();
    hlsl::Writer::new(
        &mut hlsl_out,
        &hlsl::Options::default(),
        &hlsl::PipelineOptions::default(),
    )
    .write(&module, &info, None)
    .map_err(|e| format!("HLSL: {e}"))?;
    spv::write_vec(&module, &info, &spv::Options::default(), None)
        .map_err(|e| format!("SPIR-V: {e}"))?;
    let glsl_options = glsl::Options {
        version: glsl::Version::Embedded {
            version: 310,
            is_webgl: false,
        },
        ..Default::default()
    };
    for ep in &module.entry_points {
        let pipeline = glsl::PipelineOptions {
            shader_stage: ep.stage,
            entry_point: ep.name.clone(),
            multiview: None,
        };
        let mut out = String::new();
        glsl::Writer::new(
            &mut out,
            &module,
            &info,
            &glsl_options,
            &pipeline,
            Default::default(),
        )
        .and_then(|mut w| w.write())
        .map_err(|e| format!("GLSL ({}): {e}", ep.name))?;
    }
    println!("ok {}", kernel.key());
    Ok(())
}

#[test]
fn every_variant_translates_to_every_backend() {
    let variants = ops::variants();
    assert!(!variants.is_empty());
    let failures: Vec<String> = variants
        .iter()
        .filter_map(|k| translate(k).err().map(|e| format!("{}: {e}", k.key())))
        .collect();
    assert!(
        failures.is_empty(),
        "{} variants failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_shader_file_and_entry_point_is_covered() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".wgsl") && name != "common.wgsl")
        .collect();
    let registered: BTreeSet<String> = shader::all_shaders()
        .iter()
        .map(|s| s.file.to_string())
        .collect();
    assert_eq!(
        on_disk, registered,
        "shaders/ and shader::all_shaders() disagree"
    );

    let covered: BTreeSet<(String, String)> = ops::variants()
        .iter()
        .map(|k| (k.shader.file.to_string(), k.entry.to_string()))
        .collect();
    for s in shader::all_shaders() {
        let entries: Vec<String> = s
            .source
            .split("@compute")
            .skip(1)
            .filter_map(|after| {
                let rest = &after[after.find("fn ")? + 3..];
                Some(rest[..rest.find('(')?].trim().to_string())
            })
            .collect();
        for entry in entries {
            assert!(
                covered.contains(&(s.file.to_string(), entry.clone())),
                "{}::{entry} is in no variant",
                s.file
            );
        }
    }
}
