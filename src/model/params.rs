//! The parameters of a Qwen2 model, written down once: the seven projections of a decoder layer
//! ([`Proj`], with their module paths and shapes), a value per projection ([`PerProj`]), the
//! Hugging Face names of every checkpoint tensor ([`names`]) and the table of a checkpoint's
//! tensors with their shapes ([`qwen2_tensors`]). Loading, the demo model, gradients, optimizer
//! moments, checkpoints and PEFT names all derive from these.
use super::config::Qwen2Config;

/// The seven linear projections of a decoder layer (LoRA targets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module's own name, as PEFT's `target_modules` lists it.
    pub fn module(self) -> &'static str {
        self.path().rsplit('.').next().unwrap_or_default()
    }

    /// The module path inside a decoder layer.
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// (out_features, in_features).
    pub fn shape(self, c: &Qwen2Config) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Proj::Q => (c.q_dim(), h),
            Proj::K | Proj::V => (c.kv_dim(), h),
            Proj::O => (h, c.q_dim()),
            Proj::Gate | Proj::Up => (i, h),
            Proj::Down => (h, i),
        }
    }

    /// Qwen2 has biases on q, k and v only.
    pub fn has_bias(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V)
    }

    /// Its place in [`Proj::ALL`] (and in a [`PerProj`]).
    pub fn index(self) -> usize {
        match self {
            Proj::Q => 0,
            Proj::K => 1,
            Proj::V => 2,
            Proj::O => 3,
            Proj::Gate => 4,
            Proj::Up => 5,
            Proj::Down => 6,
        }
    }
}

/// One value for each projection of a decoder layer, indexed by [`Proj`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerProj<T>([T; 7]);

impl<T> PerProj<T> {
    pub fn from_fn(f: impl FnMut(Proj) -> T) -> Self {
        PerProj(Proj::ALL.map(f))
    }

    pub fn try_from_fn<E>(mut f: impl FnMut(Proj) -> Result<T, E>) -> Result<Self, E> {
        let mut values = Vec::with_capacity(Proj::ALL.len());
        for p in Proj::ALL {
            values.push(f(p)?);
        }
        Ok(PerProj(values.try_into().unwrap_or_else(|_| {
            unreachable!("one value per projection")
        })))
    }

    /// (projection, value) in [`Proj::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (Proj, &T)> {
        Proj::ALL.into_iter().zip(&self.0)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut()
    }
}

impl<T> std::ops::Index<Proj> for PerProj<T> {
    type Output = T;
    fn index(&self, p: Proj) -> &T {
        &self.0[p.index()]
    }
}

impl<T> std::ops::IndexMut<Proj> for PerProj<T> {
    fn index_mut(&mut self, p: Proj) -> &mut T {
        &mut self.0[p.index()]
    }
}

/// The Hugging Face names of a Qwen2 checkpoint's tensors.
pub mod names {
    use super::Proj;

    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";

    /// The prefix of every decoder layer's tensors.
    pub const LAYERS: &str = "model.layers.";

    /// The prefix of decoder layer `l`'s tensors.
    pub fn layer(l: usize) -> String {
        format!("{LAYERS}{l}.")
    }

    /// The module path of projection `p` of layer `l` (what PEFT's `target_modules` matches).
    pub fn module(l: usize, p: Proj) -> String {
        format!("{}{}", layer(l), p.path())
    }

    pub fn input_norm(l: usize) -> String {
        format!("{}input_layernorm.weight", layer(l))
    }

    pub fn post_norm(l: usize) -> String {
        format!("{}post_attention_layernorm.weight", layer(l))
    }

    pub fn weight(l: usize, p: Proj) -> String {
        format!("{}.weight", module(l, p))
    }

    pub fn bias(l: usize, p: Proj) -> String {
        format!("{}.bias", module(l, p))
    }
}

/// Expected name and shape of one checkpoint tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every tensor a Qwen2 checkpoint of `config` holds, in the checkpoints' order (embedding; per
/// layer its input norm, the attention projections, the post-attention norm, the MLP
/// projections; final norm; lm_head unless tied), with its shape. Linear weights are
/// [out_features, in_features].
pub fn qwen2_tensors(config: &Qwen2Config) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let spec = |name: String, shape: &[usize]| TensorSpec {
        name,
        shape: shape.to_vec(),
    };
    let mut specs = vec![spec(names::EMBED.into(), &[config.vocab_size, h])];
    for l in 0..config.num_hidden_layers {
        specs.push(spec(names::input_norm(l), &[h]));
        for p in Proj::ALL {
            if p == Proj::Gate {
                specs.push(spec(names::post_norm(l), &[h]));
            }
            let (out_f, in_f) = p.shape(config);
            specs.push(spec(names::weight(l, p), &[out_f, in_f]));
            if p.has_bias() {
                specs.push(spec(names::bias(l, p), &[out_f]));
            }
        }
    }
    specs.push(spec(names::FINAL_NORM.into(), &[h]));
    if !config.tie_word_embeddings {
        specs.push(spec(names::LM_HEAD.into(), &[config.vocab_size, h]));
    }
    specs
}
