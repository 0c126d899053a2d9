//! The Qwen2 model family: config, safetensors weights, tokenizer, the forward pass on the GPU
//! kernels, PEFT LoRA adapters and token sampling.
pub mod adapter;
pub mod backward;
pub mod config;
pub mod generate;
pub mod params;
pub mod qwen2;
pub mod residency;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use adapter::{Adapter, AdapterConfig, LoraPair, TargetModules};
pub use backward::{Grads, Param};
pub use config::{GenerationConfig, Qwen2Config, TorchDType, QWEN25_SIZES};
pub use generate::{
    generate, generate_batch, BatchEvent, BatchRequest, GenerateOptions, Generation, StreamDecoder,
};
pub use params::{qwen2_tensors, PerProj, Proj, TensorSpec};
pub use qwen2::{next_token_targets, KvCache, LayerActs, LoraDropout, LossSum, Qwen2, IGNORE};
pub use residency::{parse_size, MemoryPlan};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{Encoding, SpecialTokens, Tokenizer};
pub use weights::{to_device, WeightDType, WeightView, Weights, HF_SIDE_FILES};
