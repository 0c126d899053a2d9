//! Each family's parameter struct is written twice, in Rust (the bytes a launch uploads) and in
//! WGSL (how its shader reads them): member names, offsets and sizes must agree, and the Rust
//! struct must be exactly as large as the WGSL one. naga's layouter computes the WGSL side.
use naga::proc::Layouter;
use naga::TypeInner;
use wgtrain_kernels::ops;

/// (member, byte offset, byte size).
type Members = Vec<(String, usize, usize)>;

/// The members of the struct `Params` in `source`, and its size.
fn wgsl_params(source: &str) -> Result<(Members, usize), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let mut layouter = Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| format!("layout: {e}"))?;
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, ty)| ty.name.as_deref() == Some("Params"))
        .ok_or("no `struct Params`")?;
    let TypeInner::Struct { members, span } = &ty.inner else {
        return Err("`Params` is not a struct".into());
    };
    let members = members
        .iter()
        .map(|m| {
            let name = m.name.clone().unwrap_or_default();
            let size = layouter[m.ty].size as usize;
            (name, m.offset as usize, size)
        })
        .collect();
    Ok((members, *span as usize))
}

#[test]
fn rust_and_wgsl_params_agree() {
    let variants = ops::variants();
    let layouts = ops::params_layouts();
    let mut problems = Vec::new();
    for layout in &layouts {
        let file = layout.shader.file;
        // Any variant of the family's shader: constants choose code paths, not the struct.
        let Some(kernel) = variants.iter().find(|k| k.shader.file == file) else {
            problems.push(format!("{file}: no kernel variant uses it"));
            continue;
        };
        let (wgsl, wgsl_size) = match wgsl_params(&kernel.source()) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.push(format!("{file}: {e}"));
                continue;
            }
        };
        let rust: Members = layout
            .members
            .iter()
            .map(|&(name, offset, size)| (name.to_string(), offset, size))
            .collect();
        if rust != wgsl || layout.size != wgsl_size {
            problems.push(format!(
                "{file}: Rust Params {rust:?} ({} bytes) != WGSL Params {wgsl:?} ({wgsl_size} bytes)",
                layout.size
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every shader file with a uniform `Params` is covered.
    for shader in wgtrain_kernels::shader::all_shaders() {
        if shader.source.contains("var<uniform> p: Params") {
            assert!(
                layouts.iter().any(|l| l.shader.file == shader.file),
                "{} has a uniform Params that no family's params_layout describes",
                shader.file
            );
        }
    }
}
