//! The WGSL sources and kernel variants.
//!
//! A kernel variant is `const` declarations (chosen by the launcher, e.g. `const W_BF16: bool = true;`)
//! followed by `shaders/common.wgsl` and the family's file. Using `const` rather than runtime flags lets
//! the driver fold the untaken branches away, and keeps one WGSL file per family instead of copies.
use std::fmt::Write;

/// One WGSL file of `shaders/`.
#[derive(Debug)]
pub struct Shader {
    pub file: &'static str,
    pub source: &'static str,
    /// A file whose declarations this one uses, loaded before it (a variant that needs a feature
    /// lives in a file of its own, since naga validates a module's every entry point).
    pub base: Option<&'static Shader>,
    /// Device features its kernels need.
    pub features: wgpu::Features,
}

macro_rules! shader {
    ($name:ident, $file:literal) => {
        shader!($name, $file, None, wgpu::Features::empty());
    };
    ($name:ident, $file:literal, $base:expr, $features:expr) => {
        pub static $name: Shader = Shader {
            file: $file,
            source: include_str!(concat!("../../shaders/", $file)),
            base: $base,
            features: $features,
        };
    };
}

shader!(COMMON, "common.wgsl");
shader!(ELEMENTWISE, "elementwise.wgsl");
shader!(MATMUL, "matmul.wgsl");
shader!(
    MATMUL_SUBGROUP,
    "matmul_subgroup.wgsl",
    Some(&MATMUL),
    wgpu::Features::SUBGROUP
);
shader!(CROSS_ENTROPY, "cross_entropy.wgsl");
shader!(ATTENTION, "attention.wgsl");
shader!(
    ATTENTION_SUBGROUP,
    "attention_subgroup.wgsl",
    Some(&ATTENTION),
    wgpu::Features::SUBGROUP
);
shader!(ROPE, "rope.wgsl");
shader!(RMSNORM, "rmsnorm.wgsl");
shader!(SWIGLU, "swiglu.wgsl");
shader!(EMBEDDING, "embedding.wgsl");
shader!(OPTIM, "optim.wgsl");

/// Every shader file a kernel is built from (all but `common.wgsl`, which each one includes).
pub fn all_shaders() -> Vec<&'static Shader> {
    vec![
        &ELEMENTWISE,
        &MATMUL,
        &MATMUL_SUBGROUP,
        &CROSS_ENTROPY,
        &ATTENTION,
        &ATTENTION_SUBGROUP,
        &ROPE,
        &RMSNORM,
        &SWIGLU,
        &EMBEDDING,
        &OPTIM,
    ]
}

/// A compile-time constant that selects a kernel variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Const {
    Bool(bool),
    U32(u32),
    F32(f32),
    /// A type, declared as `alias NAME = TYPE;` (e.g. the element type of a binding).
    Type(&'static str),
}

/// A compute entry point of a shader file plus the constants of its variant.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub shader: &'static Shader,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, Const)>,
}

impl Kernel {
    pub fn new(shader: &'static Shader, entry: &'static str) -> Self {
        Kernel {
            shader,
            entry,
            consts: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: Const) -> Self {
        self.consts.push((name, value));
        self
    }

    /// Cache key: file, entry point and constants identify the pipeline.
    pub fn key(&self) -> String {
        let mut key = format!("{}:{}", self.shader.file, self.entry);
        for (name, value) in &self.consts {
            let _ = write!(key, ":{name}={value:?}");
        }
        key
    }

    /// The entry point and its constants, compactly (e.g. `gemm_sg SG_ROWS=32 TRANS_B=true`).
    pub fn describe(&self) -> String {
        let mut name = self.entry.to_string();
        for (const_name, value) in &self.consts {
            let _ = match value {
                Const::Bool(b) => write!(name, " {const_name}={b}"),
                Const::U32(v) => write!(name, " {const_name}={v}"),
                Const::F32(v) => write!(name, " {const_name}={v}"),
                Const::Type(ty) => write!(name, " {const_name}={ty}"),
            };
        }
        name
    }

    /// The full WGSL text of this variant.
    pub fn source(&self) -> String {
        let mut src = String::new();
        for (name, value) in &self.consts {
            let _ = match value {
                Const::Bool(b) => writeln!(src, "const {name}: bool = {b};"),
                Const::U32(v) => writeln!(src, "const {name}: u32 = {v}u;"),
                Const::F32(v) => writeln!(src, "const {name}: f32 = {v:?};"),
                Const::Type(ty) => writeln!(src, "alias {name} = {ty};"),
            };
        }
        src.push_str(COMMON.source);
        for shader in [self.shader.base, Some(self.shader)].into_iter().flatten() {
            src.push('\n');
            src.push_str(shader.source);
        }
        src
    }
}

/// A family's uniform parameter struct as Rust lays it out: the shader whose `struct Params` it
/// mirrors, its members (name, byte offset, byte size) in declaration order and its size.
/// `kernels/tests/params.rs` holds it against the WGSL struct through naga's layouter.
#[derive(Debug)]
pub struct ParamsLayout {
    pub shader: &'static Shader,
    pub members: Vec<(&'static str, usize, usize)>,
    pub size: usize,
}

/// Declares a family's `Params`, the uniform its shader reads as `p` (plain `#[repr(C)]` Pod), and
/// `params_layout()`, which describes it for the Rust/WGSL agreement test: the struct is written
/// once in Rust and once in WGSL, and nothing but that test sees a member out of step.
macro_rules! params {
    ($shader:expr, $(#[$attr:meta])* struct Params {
        $($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?
    }) => {
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $(#[$attr])*
        struct Params {
            $($(#[$doc])* $field: $ty),*
        }

        /// This family's `Params` as Rust lays it out (see [`crate::shader::ParamsLayout`]).
        pub fn params_layout() -> $crate::shader::ParamsLayout {
            $crate::shader::ParamsLayout {
                shader: &$shader,
                members: vec![$((
                    stringify!($field),
                    std::mem::offset_of!(Params, $field),
                    std::mem::size_of::<$ty>(),
                )),*],
                size: std::mem::size_of::<Params>(),
            }
        }
    };
}
pub(crate) use params;
