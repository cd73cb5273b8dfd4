//! GGUF → Hugging Face folder conversion (`ember convert`).
//!
//! Writes `config.json`, `model.safetensors` (F32, F16 or BF16; quantized weights are
//! dequantized), `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
//! `generation_config.json`. GGUF-specific layouts are undone: Llama Q/K rows go back to the
//! "rotate half" order and GPT-2 matrices back to `Conv1D`'s `[n_in, n_out]`.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;
use crate::model::names::{gguf_key, Part, Role};
use crate::model::{arch, Architecture, Model, ModelConfig, RopeScaling};
use crate::tensor::DType;

/// Converts the GGUF file `input` into a Hugging Face model folder `out_dir` (created if
/// needed) with weights stored as `dtype` (F32, F16 or BF16).
pub fn gguf_to_hf_folder(input: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "convert writes F32, F16 or BF16, not {}",
            dtype.name()
        )));
    }
    let file = GgufFile::open(input)?;
    // The model must load: this validates every tensor before anything is written.
    let model = Model::from_gguf_file(&file)?;
    let config = model.config();
    if !matches!(
        config.architecture,
        Architecture::Llama | Architecture::Qwen2 | Architecture::Gpt2
    ) {
        return Err(Error::Unsupported(format!(
            "converting {} models (ember convert writes llama, qwen2 and gpt2 folders)",
            config.architecture.name()
        )));
    }
    if matches!(config.rope.scaling, RopeScaling::Factors(_)) {
        return Err(Error::Unsupported(
            "converting models with RoPE frequency factors (rope_freqs, Llama 3 scaling)".into(),
        ));
    }
    let names = arch::family(config.architecture).hf_names;
    let (tokenizer_json, _) = crate::tokenizer::tokenizer_json_from_gguf(&file.metadata)?
        .ok_or_else(|| Error::Unsupported("the GGUF file has no tokenizer".into()))?;
    let tokenizer_json = serde_json::to_string_pretty(&tokenizer_json)
        .map_err(|e| Error::Internal(format!("tokenizer.json: {e}")))?;

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let gpt2 = config.architecture == Architecture::Gpt2;
    for (name, tensor) in &file.tensors {
        let key @ (role, _, part) =
            gguf_key(name).ok_or_else(|| Error::Internal(format!("tensor {name}")))?;
        let mut hf_name = names
            .name(key)
            .ok_or_else(|| Error::Internal(format!("no Hugging Face name for {name}")))?;
        let mut shape = tensor.shape().to_vec();
        let mut values = crate::kernels::to_f32_vec(tensor);
        if config.rope_interleaved
            && matches!(role, Role::AttnQ | Role::AttnK)
            && part == Part::Weight
        {
            values = rotate_half_rows(&values, shape[1], config.head_dim);
        }
        if gpt2 {
            if shape.len() == 2 && role.per_layer() && part == Part::Weight {
                values = transpose(&values, shape[0], shape[1]);
                shape.swap(0, 1);
            }
            if role != Role::Output {
                hf_name = format!("transformer.{hf_name}");
            }
        }
        tensors.insert(hf_name, (shape, encode(&values, dtype)));
    }
    let st_dtype = match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    };
    let views = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Internal(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let weights_path = out_dir.join("model.safetensors");
    let info = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::tensor::serialize_to_file(views, &info, &weights_path).map_err(|e| {
        Error::io(
            &weights_path,
            std::io::Error::other(format!("writing safetensors: {e}")),
        )
    })?;

    let write_json = |name: &str, value: &Value| -> Result<()> {
        let path = out_dir.join(name);
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| Error::Internal(format!("{name}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &hf_config(config, dtype))?;
    let tokenizer_path = out_dir.join("tokenizer.json");
    std::fs::write(&tokenizer_path, &tokenizer_json).map_err(|e| Error::io(&tokenizer_path, e))?;
    write_json(
        "tokenizer_config.json",
        &tokenizer_config(&file, &tokenizer_json)?,
    )?;
    let mut generation = json!({});
    if let Some(bos) = config.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    if let Some(&eos) = config.eos_token_ids.first() {
        generation["eos_token_id"] = json!(eos);
    }
    write_json("generation_config.json", &generation)
}

/// Undoes GGUF's Q/K row order: within each head, rows `2i` and `2i + 1` go back to rows
/// `i` and `i + head_dim / 2`.
fn rotate_half_rows(values: &[f32], row_len: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    let n_rows = values.len() / row_len;
    let half = head_dim / 2;
    for row in 0..n_rows {
        let (head, within) = (row / head_dim, row % head_dim);
        let (pair, second) = (within / 2, within % 2);
        let target = head * head_dim + second * half + pair;
        out[target * row_len..(target + 1) * row_len]
            .copy_from_slice(&values[row * row_len..(row + 1) * row_len]);
    }
    out
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Little-endian bytes of `values` as `dtype`.
fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A transformers `config.json` for the model.
fn hf_config(c: &ModelConfig, dtype: DType) -> Value {
    let torch_dtype = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let eos = c.eos_token_ids.first();
    match c.architecture {
        Architecture::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_inner": c.intermediate_size,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_positions": c.max_position_embeddings,
            "n_ctx": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": torch_dtype,
        }),
        _ => {
            let qwen = c.architecture == Architecture::Qwen2;
            let mut config = json!({
                "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
                "model_type": if qwen { "qwen2" } else { "llama" },
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads,
                "head_dim": c.head_dim,
                "max_position_embeddings": c.max_position_embeddings,
                "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope.theta,
                "hidden_act": "silu",
                "tie_word_embeddings": c.tie_word_embeddings,
                "bos_token_id": c.bos_token_id,
                "eos_token_id": eos,
                "torch_dtype": torch_dtype,
            });
            if qwen {
                config["use_sliding_window"] = json!(false);
            }
            config
        }
    }
}

/// Whether the tokenizer's post-processor puts a special token before a single sequence (the
/// GGUF loader decides that from `add_bos_token` and the pre-tokenizer's default).
fn adds_bos(tokenizer: &Value) -> bool {
    tokenizer["post_processor"]["single"]
        .get(0)
        .is_some_and(|first| first.get("SpecialToken").is_some())
}

/// A `tokenizer_config.json` naming the special tokens and holding the chat template.
fn tokenizer_config(file: &GgufFile, tokenizer_json: &str) -> Result<Value> {
    let meta = &file.metadata;
    let tokens = meta.str_array("tokenizer.ggml.tokens")?.unwrap_or_default();
    let token = |key: &str| -> Result<Value> {
        Ok(match meta.usize(key)? {
            Some(id) if id < tokens.len() => json!(tokens[id]),
            _ => Value::Null,
        })
    };
    let tokenizer: Value = serde_json::from_str(tokenizer_json)
        .map_err(|e| Error::Internal(format!("tokenizer.json: {e}")))?;
    // transformers rebuilds special tokens from this table.
    let mut added = serde_json::Map::new();
    for t in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = t.get("id").and_then(Value::as_u64) {
            let mut entry = t.clone();
            if let Some(o) = entry.as_object_mut() {
                o.remove("id");
            }
            added.insert(id.to_string(), entry);
        }
    }
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id")?,
        "eos_token": token("tokenizer.ggml.eos_token_id")?,
        "unk_token": token("tokenizer.ggml.unknown_token_id")?,
        "pad_token": token("tokenizer.ggml.padding_token_id")?,
        "add_bos_token": adds_bos(&tokenizer),
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": Value::Object(added),
    });
    if let Some(template) = meta.str("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    Ok(config)
}
