//! LoRA adapters in PEFT's layout, read and written: `adapter_config.json` plus
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{l}.{self_attn|mlp}.{proj}.lora_A.weight` ([r, in]) and
//! `...lora_B.weight` ([out, r]). The scale is `lora_alpha / r` (`lora_alpha / sqrt(r)` with
//! `use_rslora`). What wgtrain would apply differently from PEFT (DoRA, per-module rank or alpha
//! patterns, trained biases, `fan_in_fan_out`, modules to save, layer subsets) is refused by name.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use super::config::Qwen2Config;
use super::params::{names, PerProj, Proj};
use super::weights::{WeightDType, WeightView};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's `target_modules`: module names (a module matches if its dotted path ends with one) or
/// one regular expression that must match the whole path (e.g. `model.layers.0.mlp.up_proj`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Whether PEFT would put a LoRA on the module at `path`.
    fn matches(&self, path: &str, regex: Option<&regex::Regex>) -> bool {
        match self {
            TargetModules::List(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            TargetModules::Regex(_) => regex.is_some_and(|r| r.is_match(path)),
        }
    }
}

/// The parts of `adapter_config.json` that change what the adapter computes, and the dropout it
/// was trained with (training only: inference ignores it, as PEFT's eval mode does).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Written back as PEFT's `base_model_name_or_path`.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    /// The factor on `B·A·x`: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (self.lora_alpha / if self.use_rslora { r.sqrt() } else { r }) as f32
    }

    pub fn parse(json: &str) -> Result<AdapterConfig> {
        let value: Value = serde_json::from_str(json).context("not valid JSON")?;
        let obj = value.as_object().context("must be a JSON object")?;
        let field = |key: &str| obj.get(key).filter(|v| !v.is_null());
        if let Some(t) = field("peft_type").and_then(Value::as_str) {
            ensure!(
                t == "LORA",
                "peft_type = {t:?}: only LORA adapters are supported"
            );
        }
        let r = field("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .context("\"r\" must be a positive integer")? as usize;
        let lora_alpha = match field("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(v) => v.as_f64().context("\"lora_alpha\" must be a number")?,
        };
        let lora_dropout = match field("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|p| (0.0..1.0).contains(p))
                .context("\"lora_dropout\" must be a number in [0, 1)")?,
        };
        let target_modules = match field("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => {
                TargetModules::List(Proj::ALL.iter().map(|p| p.module().to_string()).collect())
            }
            Some(Value::String(s)) => {
                regex::Regex::new(&format!("^(?:{s})$"))
                    .with_context(|| format!("target_modules {s:?} is not a valid regex"))?;
                TargetModules::Regex(s.clone())
            }
            Some(Value::Array(list)) => TargetModules::List(
                list.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .context("target_modules must be a list of strings or one regex string")?,
            ),
            _ => bail!("\"target_modules\" (a list of module names or a regex) is required"),
        };
        let flag = |key: &str| field(key).and_then(Value::as_bool).unwrap_or(false);
        ensure!(
            !flag("fan_in_fan_out"),
            "fan_in_fan_out = true is not supported (Qwen2 projections store [out, in])"
        );
        ensure!(!flag("use_dora"), "use_dora = true (DoRA) is not supported");
        if let Some(bias) = field("bias").and_then(Value::as_str) {
            ensure!(
                bias == "none",
                "bias = {bias:?} is not supported (only \"none\")"
            );
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = field(key) {
                ensure!(
                    v.as_object().is_some_and(|m| m.is_empty()),
                    "{key} = {v} is not supported (one rank and alpha for every module)"
                );
            }
        }
        for key in [
            "modules_to_save",
            "layers_to_transform",
            "layer_replication",
        ] {
            if let Some(v) = field(key) {
                bail!("{key} = {v} is not supported");
            }
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            use_rslora: flag("use_rslora"),
            base_model: field("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The config as PEFT writes it (PEFT fills in whatever is left out with its defaults).
    pub fn to_json(&self) -> Value {
        let targets = match &self.target_modules {
            TargetModules::List(l) => json!(l),
            TargetModules::Regex(r) => json!(r),
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

/// One projection's LoRA factors on the host, row-major f32: A [r, in], B [out, r].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A LoRA adapter for a Qwen2 model: its config and the factors of every targeted projection.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub modules: BTreeMap<(usize, Proj), LoraPair>,
}

/// The safetensors name of a factor (`which`: "A" or "B").
pub fn tensor_name(layer: usize, proj: Proj, which: &str) -> String {
    format!(
        "base_model.model.{}.lora_{which}.weight",
        names::module(layer, proj)
    )
}

impl Adapter {
    /// The rank of each projection that has a LoRA in some layer.
    pub fn ranks(&self) -> PerProj<Option<usize>> {
        let mut ranks = PerProj::default();
        for &(_, p) in self.modules.keys() {
            ranks[p] = Some(self.config.r);
        }
        ranks
    }

    /// The (layer, projection) pairs `config` targets in `model`.
    pub fn targets(config: &AdapterConfig, model: &Qwen2Config) -> Result<Vec<(usize, Proj)>> {
        let regex = match &config.target_modules {
            TargetModules::Regex(r) => Some(regex::Regex::new(&format!("^(?:{r})$"))?),
            TargetModules::List(_) => None,
        };
        let all = (0..model.num_hidden_layers).flat_map(|l| Proj::ALL.map(|p| (l, p)));
        let found: Vec<_> = all
            .filter(|&(l, p)| {
                config
                    .target_modules
                    .matches(&names::module(l, p), regex.as_ref())
            })
            .collect();
        ensure!(
            !found.is_empty(),
            "target_modules {:?} matches none of the model's projections",
            config.target_modules
        );
        Ok(found)
    }

    /// Reads a PEFT adapter directory and checks every tensor against `model`'s shapes.
    pub fn load(dir: impl AsRef<Path>, model: &Qwen2Config) -> Result<Adapter> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading the adapter config {}", config_path.display()))?;
        let config =
            AdapterConfig::parse(&text).with_context(|| format!("in {}", config_path.display()))?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading the adapter weights {}", path.display()))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let mut tensors: HashMap<String, _> = file.tensors().into_iter().collect();

        let mut modules = BTreeMap::new();
        for (layer, proj) in Adapter::targets(&config, model)? {
            let (out_f, in_f) = proj.shape(model);
            let mut factor = |which: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
                let name = tensor_name(layer, proj, which);
                let view = tensors.remove(&name).with_context(|| {
                    format!(
                        "{}: tensor {name} is missing (adapter_config.json targets this module)",
                        path.display()
                    )
                })?;
                read_f32(&name, &view, &shape, &path)
            };
            let a = factor("A", [config.r, in_f])?;
            let b = factor("B", [out_f, config.r])?;
            modules.insert((layer, proj), LoraPair { a, b });
        }
        if let Some(name) = tensors.keys().min() {
            bail!(
                "{}: tensor {name} is not a LoRA factor of a projection adapter_config.json \
                 targets ({} unexpected tensors)",
                path.display(),
                tensors.len()
            );
        }
        Ok(Adapter { config, modules })
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32), loadable by
    /// PEFT's `PeftModel.from_pretrained` and by [`Adapter::load`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let r = self.config.r;
        let mut factors = Vec::new();
        for (&(layer, proj), pair) in &self.modules {
            ensure!(
                pair.a.len() % r == 0 && pair.b.len() % r == 0,
                "LoRA factors of layer {layer} {} are not of rank {r}",
                proj.path()
            );
            for (which, data, shape) in [
                ("A", &pair.a, vec![r, pair.a.len() / r]),
                ("B", &pair.b, vec![pair.b.len() / r, r]),
            ] {
                let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                factors.push((tensor_name(layer, proj, which), shape, bytes));
            }
        }
        let views = factors
            .iter()
            .map(|(name, shape, bytes)| {
                Ok((name, TensorView::new(Dtype::F32, shape.clone(), bytes)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join(WEIGHTS_FILE);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::tensor::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("writing {}", path.display()))?;
        crate::data::jsonfile::set_created_mode(&path)?;
        let config_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config.to_json())?;
        std::fs::write(&config_path, text + "\n")
            .with_context(|| format!("writing {}", config_path.display()))
    }
}

/// A factor as f32, checking its shape and dtype.
fn read_f32(name: &str, view: &TensorView, shape: &[usize], file: &Path) -> Result<Vec<f32>> {
    ensure!(
        view.shape() == shape,
        "{}: tensor {name} has shape {:?}, expected {shape:?}",
        file.display(),
        view.shape()
    );
    let dtype = match view.dtype() {
        Dtype::F32 => WeightDType::F32,
        Dtype::BF16 => WeightDType::BF16,
        Dtype::F16 => WeightDType::F16,
        other => bail!(
            "{}: tensor {name} has dtype {other:?}; LoRA factors must be F32, BF16 or F16",
            file.display()
        ),
    };
    let weight = WeightView {
        name,
        dtype,
        shape,
        bytes: view.data(),
        file,
    };
    Ok(weight.to_f32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Qwen2Config {
        Qwen2Config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-qwen2-untied"
        ))
        .unwrap()
    }

    #[test]
    fn targets_follow_peft_matching() {
        let model = tiny();
        let cfg = |t: TargetModules| AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: t,
            use_rslora: false,
            base_model: None,
        };
        let list = cfg(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(
            Adapter::targets(&list, &model).unwrap(),
            vec![(0, Proj::Q), (0, Proj::V), (1, Proj::Q), (1, Proj::V)]
        );
        let regex = cfg(TargetModules::Regex(r".*\.1\.mlp\.(up|down)_proj".into()));
        assert_eq!(
            Adapter::targets(&regex, &model).unwrap(),
            vec![(1, Proj::Up), (1, Proj::Down)]
        );
        let none = cfg(TargetModules::List(vec!["lm_head".into()]));
        assert!(Adapter::targets(&none, &model).is_err());
    }

    #[test]
    fn config_parsing_and_refusals() {
        let base = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]});
        let parse = |patch: Value| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            AdapterConfig::parse(&v.to_string())
        };
        assert_eq!(parse(json!({})).unwrap().scale(), 2.0);
        assert_eq!(
            parse(json!({"use_rslora": true})).unwrap().scale(),
            16.0 / 8f32.sqrt()
        );
        for (patch, needle) in [
            (json!({"fan_in_fan_out": true}), "fan_in_fan_out"),
            (json!({"bias": "all"}), "bias"),
            (json!({"use_dora": true}), "DoRA"),
            (json!({"rank_pattern": {"q_proj": 4}}), "rank_pattern"),
            (json!({"r": 0}), "\"r\""),
            (json!({"target_modules": "(("}), "regex"),
        ] {
            let err = format!("{:#}", parse(patch.clone()).unwrap_err());
            assert!(err.contains(needle), "{patch}: {err}");
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let model = tiny();
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-qwen2-untied/adapter-random"
        );
        let adapter = Adapter::load(fixture, &model).unwrap();
        assert_eq!(adapter.modules.len(), 2 * 7);
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path()).unwrap();
        assert_eq!(Adapter::load(dir.path(), &model).unwrap(), adapter);
    }

    #[test]
    fn unexpected_or_missing_tensors_are_named() {
        let model = tiny();
        let mut adapter = Adapter {
            config: AdapterConfig {
                r: 2,
                lora_alpha: 4.0,
                lora_dropout: 0.0,
                target_modules: TargetModules::List(vec!["q_proj".into()]),
                use_rslora: false,
                base_model: None,
            },
            modules: BTreeMap::new(),
        };
        let (out_f, in_f) = Proj::Q.shape(&model);
        let pair = LoraPair {
            a: vec![0.0; 2 * in_f],
            b: vec![0.0; out_f * 2],
        };
        adapter.modules.insert((0, Proj::Q), pair);
        let dir = tempfile::tempdir().unwrap();
        adapter.save(dir.path()).unwrap();
        let err = format!("{:#}", Adapter::load(dir.path(), &model).unwrap_err());
        assert!(err.contains(&tensor_name(1, Proj::Q, "A")), "{err}");

        adapter.config.target_modules = TargetModules::Regex(r"model\.layers\.0\..*q_proj".into());
        adapter
            .modules
            .insert((0, Proj::K), adapter.modules[&(0, Proj::Q)].clone());
        adapter.save(dir.path()).unwrap();
        let err = format!("{:#}", Adapter::load(dir.path(), &model).unwrap_err());
        assert!(err.contains("k_proj.lora_A.weight"), "{err}");
    }
}
