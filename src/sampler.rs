//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, and a
//! seeded random draw (same seed, same tokens).

use std::collections::VecDeque;

use crate::constraint::{Constraint, ConstraintState};
use crate::error::{Error, Result};

/// How to sample. The defaults give greedy decoding without penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1 = off).
    pub repetition_penalty: f32,
    /// Subtract this from the logit of every recent token (0 = off).
    pub presence_penalty: f32,
    /// Subtract this times its count from the logit of every recent token (0 = off).
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_window: usize,
    /// Seed of the random generator.
    pub seed: u64,
    /// Added to the logits of these tokens before anything else (`-inf` bans a token);
    /// a token outside the vocabulary is an error when sampling.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: 64,
            seed: 0x5eed,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplerOptions {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidArgument(format!("sampler: {what}")));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be finite and >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be positive");
        }
        if !(self.presence_penalty.is_finite() && self.frequency_penalty.is_finite()) {
            return bad("presence and frequency penalties must be finite");
        }
        if self.penalty_window > 1 << 20 {
            return bad("penalty_window is too large");
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad("more than 2^20 logit biases");
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| b.is_nan() || *b == f32::INFINITY)
        {
            return bad(&format!(
                "logit bias {b} of token {t} (must be finite, or -inf to ban)"
            ));
        }
        Ok(())
    }
}

/// Most logit biases a sampler takes (more than any vocabulary).
pub const MAX_LOGIT_BIAS: usize = 1 << 20;

/// The index of the largest logit (the first one on ties); NaN never wins. 0 for an empty
/// slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64: a small, well-mixed generator whose whole state is one seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token sampler with its random state and the recent tokens the penalties look at.
#[derive(Debug, Clone)]
pub struct Sampler {
    options: SamplerOptions,
    rng: Rng,
    recent: VecDeque<u32>,
    /// (logit, token) candidates, reused between calls.
    candidates: Vec<(f32, u32)>,
    /// The grammar every drawn token must keep satisfiable, if any.
    constraint: Option<Constraint>,
}

impl Sampler {
    /// A sampler with validated options.
    pub fn new(options: SamplerOptions) -> Result<Sampler> {
        options.validate()?;
        Ok(Sampler {
            rng: Rng(options.seed),
            recent: VecDeque::with_capacity(options.penalty_window),
            candidates: Vec::new(),
            constraint: None,
            options,
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// Restarts the random sequence from the seed, forgets recent tokens, and restarts the
    /// constraint's output.
    pub fn reset(&mut self) {
        self.rng = Rng(self.options.seed);
        self.recent.clear();
        self.restart_constraint();
    }

    /// Sets (or, with `None`, removes) the constraint every drawn token must satisfy; make
    /// one with [`crate::Model::constraint`]. Each [`Sampler::sample`] then draws only among
    /// the tokens that keep the output valid, and feeds the token drawn to it.
    pub fn set_constraint(&mut self, constraint: Option<Constraint>) {
        self.constraint = constraint;
    }

    /// The constraint, if one is set.
    pub fn constraint(&self) -> Option<&Constraint> {
        self.constraint.as_ref()
    }

    /// Where the constraint's output stands (`None` without a constraint).
    pub fn constraint_state(&mut self) -> Result<Option<ConstraintState>> {
        self.constraint.as_mut().map(|c| c.state()).transpose()
    }

    /// Starts the constraint's output over (a new generation). A constraint that failed
    /// stays failed: the next draw reports it.
    pub fn restart_constraint(&mut self) {
        if let Some(c) = &mut self.constraint {
            let _ = c.reset();
        }
    }

    /// Records a token (of the prompt, or generated) for the penalties.
    pub fn accept(&mut self, token: u32) {
        if self.options.penalty_window == 0 {
            return;
        }
        if self.recent.len() == self.options.penalty_window {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    fn penalties_active(&self) -> bool {
        let o = &self.options;
        !self.recent.is_empty()
            && (o.repetition_penalty != 1.0
                || o.presence_penalty != 0.0
                || o.frequency_penalty != 0.0)
    }

    /// Picks the next token from `logits` and records it (see [`Sampler::accept`]).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() || logits.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument(
                "sampler: logits must hold 1..2^32 values".into(),
            ));
        }
        let token = self.choose(logits)?;
        if let Some(c) = &mut self.constraint {
            c.accept(token)?;
        }
        self.accept(token);
        Ok(token)
    }

    fn choose(&mut self, logits: &[f32]) -> Result<u32> {
        let penalise = self.penalties_active();
        let Sampler {
            options: o,
            rng,
            recent,
            candidates: c,
            constraint,
        } = self;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (if l.is_nan() { f32::NEG_INFINITY } else { l }, i as u32)),
        );
        if let Some(constraint) = constraint {
            constraint.mask_candidates(c)?;
        }
        for &(t, bias) in &o.logit_bias {
            match c.get_mut(t as usize) {
                // Biases add up (a token may be listed twice) but never to +inf.
                Some((l, _)) => *l = (*l + bias).min(f32::MAX),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "sampler: logit bias for token {t}, outside the vocabulary (0..{})",
                        c.len()
                    )))
                }
            }
        }
        if penalise {
            let mut counts: Vec<(u32, u32)> = Vec::with_capacity(recent.len());
            for &t in recent.iter() {
                match counts.iter_mut().find(|(tok, _)| *tok == t) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t, 1)),
                }
            }
            for (t, n) in counts {
                if let Some((l, _)) = c.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / o.repetition_penalty
                    } else {
                        *l * o.repetition_penalty
                    };
                    *l -= o.presence_penalty + o.frequency_penalty * n as f32;
                }
            }
        }
        if o.temperature == 0.0 {
            let best = c.iter().fold((f32::NEG_INFINITY, None), |best, &(l, t)| {
                if l > best.0 {
                    (l, Some(t))
                } else {
                    best
                }
            });
            return best.1.ok_or_else(|| {
                Error::InvalidArgument(
                    "sampler: every logit is -inf or NaN (or the constraint allows none of the \
                     tokens left)"
                        .into(),
                )
            });
        }
        // Sort the candidates that can matter, most likely first (only when a filter needs
        // the order: plain sampling draws from the unsorted distribution).
        if o.top_k > 0 || o.top_p < 1.0 || o.min_p > 0.0 {
            let keep = if o.top_k > 0 {
                o.top_k.min(c.len())
            } else {
                c.len()
            };
            let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if keep < c.len() {
                c.select_nth_unstable_by(keep - 1, by_logit);
                c.truncate(keep);
            }
            c.sort_unstable_by(by_logit);
        }
        let max = c.iter().fold(f32::NEG_INFINITY, |m, &(l, _)| m.max(l));
        if max == f32::NEG_INFINITY {
            return Err(Error::InvalidArgument(
                "sampler: every logit is -inf or NaN".into(),
            ));
        }
        // Probabilities at this temperature (in place of the logits); the best is 1.
        let mut total = 0.0f64;
        for (l, _) in c.iter_mut() {
            let p = (((*l - max) / o.temperature) as f64).exp();
            *l = p as f32;
            total += p;
        }
        // top-p: the shortest prefix reaching the mass; min-p: relative to the best.
        let mut cut = c.len();
        if o.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, (p, _)) in c.iter().enumerate() {
                mass += *p as f64 / total;
                if mass >= o.top_p as f64 {
                    cut = i + 1;
                    break;
                }
            }
        }
        if o.min_p > 0.0 {
            let floor = o.min_p;
            cut = cut.min(c.iter().take_while(|(p, _)| *p >= floor).count().max(1));
        }
        c.truncate(cut);
        let total: f64 = c.iter().map(|(p, _)| *p as f64).sum();
        let mut target = rng.next_f64() * total;
        for &(p, t) in c.iter() {
            target -= p as f64;
            if target < 0.0 {
                return Ok(t);
            }
        }
        Ok(c[c.len() - 1].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(options: SamplerOptions) -> Sampler {
        Sampler::new(options).unwrap()
    }

    #[test]
    fn logit_bias_shifts_and_bans_tokens() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        let with = |bias: Vec<(u32, f32)>, temperature: f32| {
            Sampler::new(SamplerOptions {
                logit_bias: bias,
                temperature,
                ..Default::default()
            })
        };
        let mut s = with(vec![(1, f32::NEG_INFINITY)], 0.0).unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 2, "the best token is banned");
        let mut s = with(vec![(3, 10.0)], 0.0).unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 3);
        // Banned tokens are never drawn at any temperature.
        let mut s = with(vec![(1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)], 2.0).unwrap();
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits).unwrap(), 0 | 3));
        }
        let mut s = with(vec![(4, 1.0)], 0.0).unwrap();
        assert!(s.sample(&logits).is_err(), "token outside the vocabulary");
        assert!(with(vec![(0, f32::NAN)], 0.0).is_err());
        assert!(with(vec![(0, f32::INFINITY)], 0.0).is_err());
        let mut s = with(vec![(0, 3e38), (0, 3e38), (1, 3e38)], 1.0).unwrap();
        for _ in 0..50 {
            assert!(
                matches!(s.sample(&logits).unwrap(), 0 | 1),
                "no overflow to +inf"
            );
        }
        let all_banned = (0..4).map(|t| (t, f32::NEG_INFINITY)).collect();
        assert!(with(all_banned, 1.0).unwrap().sample(&logits).is_err());
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = sampler(SamplerOptions::default());
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9]).unwrap(), 1);
        assert!(s.sample(&[f32::NEG_INFINITY, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect();
        let options = SamplerOptions {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let run = |mut s: Sampler| {
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run(sampler(options.clone()));
        assert_eq!(a, run(sampler(options.clone())));
        assert_ne!(
            a,
            run(sampler(SamplerOptions {
                seed: 43,
                ..options.clone()
            }))
        );
        let mut s = sampler(options);
        let first = (0..50)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>();
        s.reset();
        assert_eq!(
            first,
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_choice() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0];
        let draw = |options: SamplerOptions| {
            let mut s = sampler(options);
            let mut seen = [0usize; 5];
            for _ in 0..2000 {
                seen[s.sample(&logits).unwrap() as usize] += 1;
            }
            seen
        };
        let warm = SamplerOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let k2 = draw(SamplerOptions {
            top_k: 2,
            ..warm.clone()
        });
        assert!(
            k2[0] > 0 && k2[1] > 0 && k2[2..].iter().all(|&n| n == 0),
            "{k2:?}"
        );
        // p(0) ≈ 0.66, p(1) ≈ 0.24: top_p 0.8 keeps two tokens.
        let p = draw(SamplerOptions {
            top_p: 0.8,
            ..warm.clone()
        });
        assert!(
            p[0] > 0 && p[1] > 0 && p[2..].iter().all(|&n| n == 0),
            "{p:?}"
        );
        // min_p 0.3 keeps tokens at least 0.3 x p(0): only 0 and 1 (e^-1 ≈ 0.37).
        let m = draw(SamplerOptions {
            min_p: 0.3,
            ..warm.clone()
        });
        assert!(
            m[0] > 0 && m[1] > 0 && m[2..].iter().all(|&n| n == 0),
            "{m:?}"
        );
        let all = draw(warm);
        assert!(all[..4].iter().all(|&n| n > 0), "{all:?}");
        // Temperature near zero behaves greedily.
        let cold = draw(SamplerOptions {
            temperature: 1e-3,
            ..Default::default()
        });
        assert_eq!(cold[0], 2000);
    }

    #[test]
    fn penalties_discourage_recent_tokens() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = sampler(SamplerOptions {
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits).unwrap(), 0);
        assert_eq!(
            s.sample(&logits).unwrap(),
            1,
            "0 was penalised: 2.0 / 1.5 < 1.9"
        );
        let mut s = sampler(SamplerOptions {
            frequency_penalty: 0.1,
            penalty_window: 4,
            ..Default::default()
        });
        s.accept(0);
        s.accept(0);
        assert_eq!(s.sample(&logits).unwrap(), 1, "2.0 - 2 * 0.1 < 1.9");
        let mut s = sampler(SamplerOptions {
            presence_penalty: 0.2,
            penalty_window: 1,
            ..Default::default()
        });
        s.accept(0);
        s.accept(2); // the window holds one token: 0 is forgotten
        assert_eq!(s.sample(&logits).unwrap(), 0);
    }

    #[test]
    fn invalid_options_are_rejected() {
        for bad in [
            SamplerOptions {
                temperature: -1.0,
                ..Default::default()
            },
            SamplerOptions {
                top_p: 0.0,
                ..Default::default()
            },
            SamplerOptions {
                min_p: 2.0,
                ..Default::default()
            },
            SamplerOptions {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplerOptions {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
    }
}
