//! Choosing the next token from logits: greedy (temperature 0) or sampling with temperature, top-k
//! and top-p applied in that order (transformers' order), from a seeded ChaCha8 stream so a seed
//! reproduces a generation on any machine.
use anyhow::{bail, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities reach top_p together; 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// The index of the largest logit (the first of equal ones, as torch.argmax); an error on NaN.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        ensure!(!x.is_nan(), "logit {i} is NaN");
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    match best {
        Some((i, _)) => Ok(i as u32),
        None => bail!("no logits to choose from"),
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        let SamplingParams {
            temperature, top_p, ..
        } = params;
        ensure!(
            temperature.is_finite() && temperature >= 0.0,
            "temperature must be a finite number >= 0, got {temperature}"
        );
        ensure!(
            top_p > 0.0 && top_p <= 1.0,
            "top_p must be in (0, 1], got {top_p}"
        );
        Ok(Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        })
    }

    /// The next token id.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let p = self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = Vec::with_capacity(logits.len());
        for (i, &x) in logits.iter().enumerate() {
            ensure!(!x.is_nan(), "logit {i} is NaN");
            cand.push((i as u32, x / p.temperature));
        }
        ensure!(!cand.is_empty(), "no logits to sample from");
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(desc);
        let max = cand[0].1 as f64;
        ensure!(max.is_finite(), "every logit is infinite");
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 as f64 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        if p.top_p < 1.0 {
            // The smallest prefix reaching top_p (at least one token).
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cum += q / total;
                    cum >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.gen::<f64>() * total;
        for (c, q) in cand.iter().zip(&probs) {
            if u < *q {
                return Ok(c.0);
            }
            u -= q;
        }
        // Rounding left u just above the sum: the last kept token.
        Ok(cand[probs.len() - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
        .unwrap()
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 3.0];

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sampler(0.0, 0, 1.0, 0).sample(&LOGITS).unwrap(), 1);
        assert!(argmax(&[0.0, f32::NAN]).is_err());
        assert!(argmax(&[]).is_err());
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy() {
        for seed in 0..20 {
            assert_eq!(sampler(1.5, 1, 1.0, seed).sample(&LOGITS).unwrap(), 1);
            assert_eq!(sampler(1.5, 0, 1e-6, seed).sample(&LOGITS).unwrap(), 1);
        }
    }

    #[test]
    fn filters_restrict_the_support() {
        let mut s = sampler(1.0, 3, 1.0, 7);
        for _ in 0..500 {
            assert!([1, 2, 4].contains(&s.sample(&LOGITS).unwrap()));
        }
        // p = softmax: 0.39, 0.39, 0.24, ...; top_p 0.7 keeps the two tied leaders.
        let mut s = sampler(1.0, 0, 0.7, 7);
        for _ in 0..500 {
            assert!([1, 4].contains(&s.sample(&LOGITS).unwrap()));
        }
    }

    #[test]
    fn frequencies_follow_the_tempered_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let t = 2.0;
        let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
        let mut s = sampler(t as f32, 0, 1.0, 3);
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = (logits[i] as f64 / t).exp() / z;
            let got = c as f64 / n as f64;
            assert!(
                (got - expected).abs() < 0.015,
                "token {i}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn a_seed_reproduces_and_bad_params_are_refused() {
        let draw = |seed| {
            let mut s = sampler(1.0, 0, 0.95, seed);
            (0..50)
                .map(|_| s.sample(&LOGITS).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let params = SamplingParams {
                temperature: t,
                top_p: p,
                ..Default::default()
            };
            assert!(Sampler::new(params).is_err(), "{t} {p}");
        }
    }
}
