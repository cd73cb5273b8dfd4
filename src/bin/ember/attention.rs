//! `ember attention MODEL TEXT [--token WORD] [--layer L,..] [--head H,..] [--top 5]
//! [--png FILE]`: what a query token attends to, from the engine's own attention weights.
//!
//! The text is read in one step with every chosen layer and head captured for every token.
//! Printed: for the query token (`--token WORD`: the first token whose text is WORD, or the
//! last of the tokens spelling it; default the last token), the positions it attends to
//! most, per head of each `--layer` given and averaged over heads (with no `--layer`, each
//! layer's average over its heads and the average over all). `--png` draws the same rows and
//! averages as heatmaps of every query over every key.

use ember::{AttentionSelection, Session, SessionOptions};

use crate::heatmap::{self, Layout, Panel};
use crate::{load, Args};

/// Largest capture buffer the command allocates.
const MAX_CAPTURE_BYTES: usize = 2 << 30;

/// One printed line and picture panel: a head, or an average of several.
struct Entry {
    title: String,
    /// `[n, n]`: every query's weights over every key (0 where it does not look).
    weights: Vec<f32>,
    /// The layer, when all of the entry's heads are in one (its sliding window applies).
    layer: Option<usize>,
}

/// Indices from `--name 1,2,5` (default: every one of `0..n`).
fn indices(args: &Args, name: &str, n: usize, what: &str) -> Result<(Vec<usize>, bool), String> {
    let Some(list) = args.get(name) else {
        return Ok(((0..n).collect(), false));
    };
    let chosen = list
        .split(',')
        .map(|v| match v.trim().parse::<usize>() {
            Ok(i) if i < n => Ok(i),
            Ok(i) => Err(format!("--{name} {i}: the model has {n} {what}s (0..{n})")),
            Err(_) => Err(format!("--{name} takes indices such as 0,3, not {v:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((chosen, true))
}

/// The query token for `--token WORD`: the first token whose text is WORD (spaces around
/// it aside), or else the last token of the first run of tokens that spells it.
fn find_word(pieces: &[String], word: &str) -> Option<usize> {
    if let Some(i) = pieces.iter().position(|p| p.trim() == word) {
        return Some(i);
    }
    (0..pieces.len()).find_map(|start| {
        let mut spelled = String::new();
        for (end, piece) in pieces.iter().enumerate().skip(start) {
            spelled.push_str(piece);
            if spelled.trim() == word {
                return Some(end);
            }
            if spelled.trim_start().len() >= word.len() {
                return None;
            }
        }
        None
    })
}

/// The element-wise mean of `entries`' weights.
fn mean(title: String, entries: &[Entry], layer: Option<usize>) -> Entry {
    let mut weights = vec![0f32; entries[0].weights.len()];
    for e in entries {
        for (m, w) in weights.iter_mut().zip(&e.weights) {
            *m += w / entries.len() as f32;
        }
    }
    Entry {
        title,
        weights,
        layer,
    }
}

/// Runs the command.
pub fn attention(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["q8_0"]);
    let text = args
        .positional
        .get(1)
        .ok_or_else(|| format!("missing TEXT\n{}", crate::usage()))?;
    let (model, _) = load(args.model()?, &args)?;
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let tokens = tokenizer
        .encode(text, true, false)
        .map_err(|e| e.to_string())?;
    if tokens.is_empty() {
        return Err("the text has no tokens".into());
    }
    let pieces = tokens
        .iter()
        .map(|&t| tokenizer.decode(&[t]).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let n = tokens.len();
    let query = match args.get("token") {
        None => n - 1,
        Some(word) => find_word(&pieces, word).ok_or_else(|| {
            let shown: Vec<String> = pieces.iter().map(|p| format!("{p:?}")).collect();
            format!(
                "no token of the text is {word:?}; its tokens: {}",
                shown.join(" ")
            )
        })?,
    };
    let c = model.config();
    let (layers, layers_given) = indices(&args, "layer", c.n_layers, "layer")?;
    let (heads, heads_given) = indices(&args, "head", c.n_heads, "head")?;
    let top = args.number("top", 5)?.max(1);

    let selection = AttentionSelection {
        layers: layers.clone(),
        heads: heads.clone(),
        max_queries: n,
    };
    let bytes =
        Session::attention_capture_bytes(&model, n, &selection).map_err(|e| e.to_string())?;
    if bytes > MAX_CAPTURE_BYTES {
        return Err(format!(
            "capturing {} layers x {} heads over {n} tokens takes {} MiB: choose fewer with \
             --layer and --head, or a shorter text",
            layers.len(),
            heads.len(),
            bytes >> 20
        ));
    }
    let options = SessionOptions {
        n_ctx: n,
        n_threads: ember::defaults::threads(args.number("threads", 0)?),
        ubatch: ember::defaults::UBATCH,
        kv_type: args.kv_type()?,
    };
    let mut session = Session::new(model.clone(), &options).map_err(|e| e.to_string())?;
    session
        .capture_attention(Some(&selection))
        .map_err(|e| e.to_string())?;
    session.step(&tokens).map_err(|e| e.to_string())?;

    // Per head of each chosen layer, then the averages the options ask for.
    let mut entries = Vec::new();
    let mut layer_means = Vec::new();
    for &layer in &layers {
        let mut per_head = Vec::new();
        for &head in &heads {
            let rows = session.attention(layer, head).map_err(|e| e.to_string())?;
            let mut weights = vec![0f32; n * n];
            rows.copy_to(&mut weights);
            per_head.push(Entry {
                title: format!("layer {layer} head {head}"),
                weights,
                layer: Some(layer),
            });
        }
        let layer_mean = mean(format!("layer {layer} mean"), &per_head, Some(layer));
        if layers_given || heads_given {
            entries.extend(per_head);
        }
        if !(layers_given || heads_given) || heads.len() > 1 {
            entries.push(Entry {
                title: layer_mean.title.clone(),
                weights: layer_mean.weights.clone(),
                layer: Some(layer),
            });
        }
        layer_means.push(layer_mean);
    }
    if layers.len() > 1 {
        // Every layer has as many chosen heads, so this is the mean over all of them.
        entries.push(mean("mean of all".into(), &layer_means, None));
    }

    let label = |i: usize| match pieces[i].trim() {
        "" => format!("{:?}({i})", pieces[i]),
        word => format!("{word}({i})"),
    };
    out!(
        "{n} tokens: {}",
        (0..n).map(label).collect::<Vec<_>>().join(" ")
    );
    out!(
        "query {}: the {top} positions it attends to most (weights sum to 1 over positions 0..={query})",
        label(query)
    );
    for e in &entries {
        let row = &e.weights[query * n..query * n + query + 1];
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let best: Vec<String> = order
            .iter()
            .take(top)
            .map(|&k| format!("{} {:.3}", label(k), row[k]))
            .collect();
        out!("{:<20} {}", e.title, best.join("  "));
    }

    if let Some(path) = args.get("png") {
        let panels: Vec<Panel> = entries
            .into_iter()
            .map(|e| {
                let window = e.layer.and_then(|l| c.layers[l].sliding_window);
                let mut weights = e.weights;
                // Keys a query does not see are drawn apart from weights of 0.
                for q in 0..n {
                    for k in 0..n {
                        let outside = window.is_some_and(|w| q >= k + w);
                        if k > q || outside {
                            weights[q * n + k] = -1.0;
                        }
                    }
                }
                Panel {
                    title: e.title,
                    weights,
                }
            })
            .collect();
        let labels: Vec<String> = pieces.iter().map(|p| heatmap::label(p)).collect();
        let label_chars = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
        let layout = Layout::new(n, panels.len(), label_chars);
        heatmap::write_png(path, &layout, &labels, &panels, query)?;
        let (w, h) = layout.size();
        eprintln!("[wrote {path}: {} panels, {w}x{h} pixels]", panels.len());
    }
    Ok(())
}
