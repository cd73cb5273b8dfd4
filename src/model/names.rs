//! Tensor names: every weight has a [`Role`] (and a layer), which GGUF names the same way
//! for every family (llama.cpp's names) and Hugging Face checkpoints name per family (each
//! family's table in `arch/`). Both formats' tensors are renamed to roles once, so one
//! builder per family reads either format.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What a weight tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Token embeddings `[vocab, hidden]`.
    TokenEmbd,
    /// Learned position embeddings `[positions, hidden]` (GPT-2).
    PositionEmbd,
    /// The final norm.
    OutputNorm,
    /// The output matrix `[vocab, hidden]` (absent when tied to the embeddings).
    Output,
    /// Per-frequency RoPE divisors (GGUF's way of storing Llama 3 scaling).
    RopeFreqs,
    /// LongRoPE's long-context divisors (GGUF, Phi-3).
    RopeFactorsLong,
    /// LongRoPE's short-context divisors (GGUF, Phi-3).
    RopeFactorsShort,
    /// The norm before attention.
    AttnNorm,
    /// Queries.
    AttnQ,
    /// Keys.
    AttnK,
    /// Values.
    AttnV,
    /// Queries, keys and values in one matrix (Phi-3, GPT-2).
    AttnQkv,
    /// The attention output projection.
    AttnOutput,
    /// The norm of each head's queries.
    AttnQNorm,
    /// The norm of each head's keys.
    AttnKNorm,
    /// The norm after attention (sandwich norms).
    PostAttnNorm,
    /// The norm before the feed-forward network.
    FfnNorm,
    /// The gate projection.
    FfnGate,
    /// The up projection (Phi-3: gate and up in one matrix; GPT-2: the first layer).
    FfnUp,
    /// The down projection.
    FfnDown,
    /// The norm after the feed-forward network (sandwich norms).
    PostFfnNorm,
}

/// Every role, for the name tables.
pub(crate) const ROLES: [Role; 21] = [
    Role::TokenEmbd,
    Role::PositionEmbd,
    Role::OutputNorm,
    Role::Output,
    Role::RopeFreqs,
    Role::RopeFactorsLong,
    Role::RopeFactorsShort,
    Role::AttnNorm,
    Role::AttnQ,
    Role::AttnK,
    Role::AttnV,
    Role::AttnQkv,
    Role::AttnOutput,
    Role::AttnQNorm,
    Role::AttnKNorm,
    Role::PostAttnNorm,
    Role::FfnNorm,
    Role::FfnGate,
    Role::FfnUp,
    Role::FfnDown,
    Role::PostFfnNorm,
];

impl Role {
    /// True for the roles of a block (named with a layer index).
    pub(crate) fn per_layer(self) -> bool {
        !matches!(
            self,
            Role::TokenEmbd
                | Role::PositionEmbd
                | Role::OutputNorm
                | Role::Output
                | Role::RopeFreqs
                | Role::RopeFactorsLong
                | Role::RopeFactorsShort
        )
    }

    /// llama.cpp's name (`blk.N.` before the per-layer ones).
    pub(crate) fn gguf(self) -> &'static str {
        match self {
            Role::TokenEmbd => "token_embd",
            Role::PositionEmbd => "position_embd",
            Role::OutputNorm => "output_norm",
            Role::Output => "output",
            Role::RopeFreqs => "rope_freqs",
            Role::RopeFactorsLong => "rope_factors_long",
            Role::RopeFactorsShort => "rope_factors_short",
            Role::AttnNorm => "attn_norm",
            Role::AttnQ => "attn_q",
            Role::AttnK => "attn_k",
            Role::AttnV => "attn_v",
            Role::AttnQkv => "attn_qkv",
            Role::AttnOutput => "attn_output",
            Role::AttnQNorm => "attn_q_norm",
            Role::AttnKNorm => "attn_k_norm",
            Role::PostAttnNorm => "post_attention_norm",
            Role::FfnNorm => "ffn_norm",
            Role::FfnGate => "ffn_gate",
            Role::FfnUp => "ffn_up",
            Role::FfnDown => "ffn_down",
            Role::PostFfnNorm => "post_ffw_norm",
        }
    }
}

/// Which part of a layer's parameters a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Part {
    /// `.weight`
    Weight,
    /// `.bias`
    Bias,
}

impl Part {
    fn parse(s: &str) -> Option<Part> {
        match s {
            "weight" => Some(Part::Weight),
            "bias" => Some(Part::Bias),
            _ => None,
        }
    }

    /// The name's suffix.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Bias => "bias",
        }
    }
}

/// A tensor's place in the model.
pub(crate) type Key = (Role, Option<usize>, Part);

/// How a family's Hugging Face checkpoints name their tensors.
#[derive(Debug)]
pub(crate) struct HfNames {
    /// Prefix of per-layer names, with `{}` for the layer index (`model.layers.{}.`).
    pub(crate) layer_prefix: &'static str,
    /// Each role's name: after the layer prefix for per-layer roles, whole otherwise.
    pub(crate) names: &'static [(Role, &'static str)],
    /// Prefixes some exporters add to every name (`transformer.` for GPT-2).
    pub(crate) optional_prefix: Option<&'static str>,
    /// Buffers some exporters save, which carry no weights.
    pub(crate) ignored_suffixes: &'static [&'static str],
}

impl HfNames {
    /// The Hugging Face name of a tensor.
    pub(crate) fn name(&self, (role, layer, part): Key) -> Option<String> {
        let &(_, stem) = self.names.iter().find(|(r, _)| *r == role)?;
        Some(match layer {
            Some(i) => format!(
                "{}{stem}.{}",
                self.layer_prefix.replace("{}", &i.to_string()),
                part.suffix()
            ),
            None => format!("{stem}.{}", part.suffix()),
        })
    }

    /// The key of a Hugging Face tensor name, `None` for names the family does not use.
    fn key(&self, name: &str) -> Option<Key> {
        let name = match self.optional_prefix {
            Some(p) => name.strip_prefix(p).unwrap_or(name),
            None => name,
        };
        let (stem, part) = name.rsplit_once('.')?;
        let part = Part::parse(part)?;
        let (before, after) = self.layer_prefix.split_once("{}")?;
        if let Some(rest) = stem.strip_prefix(before) {
            if let Some((layer, within)) = rest.split_once(after) {
                if let Ok(layer) = layer.parse::<usize>() {
                    return self
                        .names
                        .iter()
                        .find(|(r, n)| r.per_layer() && *n == within)
                        .map(|&(r, _)| (r, Some(layer), part));
                }
            }
        }
        self.names
            .iter()
            .find(|(r, n)| !r.per_layer() && *n == stem)
            .map(|&(r, _)| (r, None, part))
    }
}

/// The key of a GGUF tensor name (`blk.3.attn_q.weight`, `token_embd.weight`).
pub(crate) fn gguf_key(name: &str) -> Option<Key> {
    let (stem, part) = name.rsplit_once('.')?;
    let part = Part::parse(part)?;
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, role) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let role = ROLES.iter().find(|r| r.per_layer() && r.gguf() == role)?;
        return Some((*role, Some(layer), part));
    }
    let role = ROLES.iter().find(|r| !r.per_layer() && r.gguf() == stem)?;
    Some((*role, None, part))
}

/// The GGUF name of a key.
pub(crate) fn gguf_name((role, layer, part): Key) -> String {
    match layer {
        Some(i) => format!("blk.{i}.{}.{}", role.gguf(), part.suffix()),
        None => format!("{}.{}", role.gguf(), part.suffix()),
    }
}

/// A model file's tensors by key, consumed as the model takes them.
#[derive(Debug, Default)]
pub(crate) struct Weights {
    tensors: HashMap<Key, (String, Tensor)>,
    /// Names that no role of the family matches.
    unknown: Vec<String>,
    /// How many of the file's tensors have each element type.
    counts: BTreeMap<&'static str, usize>,
    /// The Hugging Face names, for a checkpoint's tensors (else GGUF's names are used).
    hf_names: Option<&'static HfNames>,
}

impl Weights {
    fn insert(&mut self, key: Key, name: &str, tensor: Tensor) -> Result<()> {
        if let Some((other, _)) = self.tensors.insert(key, (name.to_string(), tensor)) {
            return Err(Error::format(format!(
                "tensors {other} and {name} have the same role"
            )));
        }
        Ok(())
    }

    /// A GGUF file's tensors.
    pub(crate) fn from_gguf<'a>(
        tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    ) -> Result<Weights> {
        let mut w = Weights::default();
        for (name, tensor) in tensors {
            w.count(tensor);
            match gguf_key(name) {
                Some(key) => w.insert(key, name, tensor.clone())?,
                None => w.unknown.push(name.clone()),
            }
        }
        Ok(w)
    }

    /// A Hugging Face checkpoint's tensors, named by `names`.
    pub(crate) fn from_hf(
        tensors: HashMap<String, Tensor>,
        names: &'static HfNames,
    ) -> Result<Weights> {
        let mut w = Weights {
            hf_names: Some(names),
            ..Weights::default()
        };
        for (name, tensor) in tensors {
            w.count(&tensor);
            if names.ignored_suffixes.iter().any(|s| name.ends_with(s)) {
                continue;
            }
            match names.key(&name) {
                Some(key) => w.insert(key, &name, tensor)?,
                None => w.unknown.push(name),
            }
        }
        Ok(w)
    }

    fn count(&mut self, tensor: &Tensor) {
        *self.counts.entry(tensor.dtype().name()).or_default() += 1;
    }

    /// How many of the file's tensors have each element type.
    pub(crate) fn type_counts(&self) -> &BTreeMap<&'static str, usize> {
        &self.counts
    }

    /// True when the file has this tensor.
    pub(crate) fn has(&self, role: Role, layer: Option<usize>) -> bool {
        self.tensors.contains_key(&(role, layer, Part::Weight))
    }

    /// The shape of a tensor the file has.
    pub(crate) fn shape(&self, role: Role, layer: Option<usize>) -> Option<&[usize]> {
        self.tensors
            .get(&(role, layer, Part::Weight))
            .map(|(_, t)| t.shape())
    }

    /// Removes and returns a tensor that may be absent, checking its shape when present.
    pub(crate) fn take_optional(
        &mut self,
        role: Role,
        layer: Option<usize>,
        part: Part,
        shape: &[usize],
    ) -> Result<Option<Tensor>> {
        match self.tensors.remove(&(role, layer, part)) {
            None => Ok(None),
            Some((name, tensor)) => {
                tensor.expect_shape(&name, shape)?;
                Ok(Some(tensor))
            }
        }
    }

    /// Removes and returns a required tensor, checking its shape.
    pub(crate) fn take(
        &mut self,
        role: Role,
        layer: Option<usize>,
        part: Part,
        shape: &[usize],
    ) -> Result<Tensor> {
        self.take_optional(role, layer, part, shape)?
            .ok_or_else(|| {
                let key = (role, layer, part);
                let name = self
                    .hf_names
                    .and_then(|n| n.name(key))
                    .unwrap_or_else(|| gguf_name(key));
                Error::format(format!("tensor {name} is missing"))
            })
    }

    /// Removes a required tensor, checking its shape, and returns its values as f32 (norms,
    /// biases, RoPE factors).
    pub(crate) fn take_f32(
        &mut self,
        role: Role,
        layer: Option<usize>,
        part: Part,
        shape: &[usize],
    ) -> Result<Vec<f32>> {
        Ok(crate::kernels::to_f32_vec(
            &self.take(role, layer, part, shape)?,
        ))
    }

    /// Fails if tensors remain that the model did not use.
    pub(crate) fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self
            .tensors
            .values()
            .map(|(name, _)| name)
            .chain(&self.unknown)
            .collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(first) => Err(Error::format(format!(
                "unexpected tensor {first} ({} unused in all)",
                left.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_keys() {
        for role in ROLES {
            let layer = role.per_layer().then_some(7);
            for part in [Part::Weight, Part::Bias] {
                let key = (role, layer, part);
                assert_eq!(gguf_key(&gguf_name(key)), Some(key));
            }
        }
        let names = HfNames {
            layer_prefix: "model.layers.{}.",
            names: &[
                (Role::TokenEmbd, "model.embed_tokens"),
                (Role::AttnQ, "self_attn.q_proj"),
            ],
            optional_prefix: None,
            ignored_suffixes: &[],
        };
        let key = (Role::AttnQ, Some(12), Part::Bias);
        assert_eq!(
            names.name(key).as_deref(),
            Some("model.layers.12.self_attn.q_proj.bias")
        );
        assert_eq!(
            names.key("model.layers.12.self_attn.q_proj.bias"),
            Some(key)
        );
        assert_eq!(
            names.key("model.embed_tokens.weight"),
            Some((Role::TokenEmbd, None, Part::Weight))
        );
        assert_eq!(names.key("model.layers.x.self_attn.q_proj.weight"), None);
        assert_eq!(gguf_key("blk.3.unknown.weight"), None);
    }
}
