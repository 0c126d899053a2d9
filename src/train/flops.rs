//! Model FLOPs of a training step, for the achieved TFLOP/s and MFU of the step log.
//!
//! Counted as model FLOPs (PaLM's convention): the per-layer recomputation is not counted, so MFU
//! compares the useful work with the device's peak. A matrix product of m×k by k×n is 2·m·k·n.
//! Forward per token: every projection and the LM head (2 × parameters), plus causal attention
//! over the row's earlier tokens (QKᵀ and PV: 2 · 2 · head_dim · heads per key). Backward: the
//! input gradient of every product (1 × forward), plus the weight gradients of what trains: all of
//! it under full fine-tuning (another 1 × forward), only the LoRA factors under LoRA (their
//! forward is 2 · r · (in + out) per token and projection; backward twice that).
use crate::model::{PerProj, Proj, Qwen2Config};

/// What a step trains: every weight, or LoRA factors of the given rank on each projection that
/// has one (as [`crate::model::Qwen2::lora_ranks`] reports them).
pub enum Trainable {
    Full,
    Lora(PerProj<Option<usize>>),
}

/// Model FLOPs of one training pass over a row of `len` tokens.
pub fn row_flops(c: &Qwen2Config, trained: &Trainable, len: usize) -> f64 {
    let layers = c.num_hidden_layers as f64;
    let dense: f64 = Proj::ALL
        .iter()
        .map(|p| {
            let (out_f, in_f) = p.shape(c);
            (out_f * in_f) as f64
        })
        .sum();
    let head = (c.vocab_size * c.hidden_size) as f64;
    let tokens = len as f64;
    let matmul_forward = 2.0 * tokens * (layers * dense + head);
    // Token t attends to t + 1 keys: sum over the row = len (len + 1) / 2.
    let keys = tokens * (tokens + 1.0) / 2.0;
    let attention_forward = layers * 4.0 * (c.num_attention_heads * c.head_dim) as f64 * keys;
    let forward = matmul_forward + attention_forward;
    match trained {
        Trainable::Full => 3.0 * forward,
        Trainable::Lora(ranks) => {
            let adapter: f64 = ranks
                .iter()
                .filter_map(|(p, rank)| rank.map(|r| (p.shape(c), r)))
                .map(|((out_f, in_f), r)| 2.0 * (r * (in_f + out_f)) as f64)
                .sum();
            let adapter_forward = tokens * layers * adapter;
            2.0 * forward + 3.0 * adapter_forward
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Qwen2Config {
        Qwen2Config::parse(
            r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 1,
                "num_key_value_heads": 1, "vocab_size": 100, "tie_word_embeddings": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn counts_by_hand() {
        let c = config();
        // Per layer: q, k, v, o 64×64 each, gate, up, down 64×160 each.
        let dense = 4.0 * 64.0 * 64.0 + 3.0 * 64.0 * 160.0;
        let head = 100.0 * 64.0;
        // Two tokens: keys 1 + 2 = 3.
        let forward = 2.0 * 2.0 * (2.0 * dense + head) + 2.0 * 4.0 * 64.0 * 3.0;
        assert_eq!(row_flops(&c, &Trainable::Full, 2), 3.0 * forward);
        let mut ranks = PerProj::default();
        ranks[Proj::Q] = Some(4);
        ranks[Proj::Down] = Some(4);
        let lora = Trainable::Lora(ranks);
        let adapter = 2.0 * 4.0 * (128.0 + 224.0);
        assert_eq!(
            row_flops(&c, &lora, 2),
            2.0 * forward + 3.0 * 2.0 * 2.0 * adapter
        );
    }
}
