//! `ember attention MODEL TEXT [--token WORD] [--layer L,..] [--head H,..] [--top 5]
//! [--png FILE]`: what a query token attends to, from the engine's own attention weights.
//!
//! The text is read in one step with the chosen layers and heads captured. Printed: for the
//! query token (`--token WORD`: the first token whose text is WORD, or the last of the
//! tokens spelling it; default the last token), the positions it attends to most. With
//! `--layer`, each chosen head of those layers and their mean per layer; with `--head` alone,
//! those heads of every layer; with neither, each layer's mean over its heads. With more than
//! one layer, also the mean over all of them. `--png` draws the same rows and means as
//! heatmaps of every query over every key.

use ember::{AttentionSelection, Session, SessionOptions};

use crate::heatmap::{self, Layout, Panel};
use crate::{load, Args};

/// Largest capture buffer the command allocates.
const MAX_CAPTURE_BYTES: usize = 2 << 30;
/// The title of the mean over every chosen layer and head.
const ALL_TITLE: &str = "mean of all";

/// One printed line and picture panel: a head, or a mean of several.
struct Entry {
    title: String,
    /// `[rows, n]`: the weights of queries `first_row..first_row + rows` over every key (0
    /// where the query does not look). Every query with `--png`, else only the one asked about.
    weights: Vec<f32>,
    /// The sliding window of the entry's keys: a key is hidden from a query when it is hidden
    /// in every layer the entry covers (so a mean over layers with and without one has none).
    window: Option<usize>,
}

/// Whether query `q` sees key `k` through a sliding window of `window` positions.
fn visible(q: usize, k: usize, window: Option<usize>) -> bool {
    k <= q && window.map_or(true, |w| q < k + w)
}

/// Indices from `--name 1,2,5`, each once, in the order given (default: every one of `0..n`).
fn indices(args: &Args, name: &str, n: usize, what: &str) -> Result<(Vec<usize>, bool), String> {
    let Some(list) = args.value(name)? else {
        return Ok(((0..n).collect(), false));
    };
    let mut seen = vec![false; n];
    let mut chosen = Vec::new();
    for v in list.split(',') {
        match v.trim().parse::<usize>() {
            Ok(i) if i < n => {
                if !std::mem::replace(&mut seen[i], true) {
                    chosen.push(i);
                }
            }
            Ok(i) => return Err(format!("--{name} {i}: the model has {n} {what}s (0..{n})")),
            Err(_) => return Err(format!("--{name} takes indices such as 0,3, not {v:?}")),
        }
    }
    Ok((chosen, true))
}

/// The query token for `--token WORD`: the first token whose text is WORD (spaces around
/// it aside), or else the last token of the first run of tokens that spells it.
fn find_word(pieces: &[String], word: &str) -> Option<usize> {
    let word = word.trim();
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
fn mean(title: String, entries: &[Entry], window: Option<usize>) -> Entry {
    let mut weights = vec![0f32; entries[0].weights.len()];
    for e in entries {
        for (m, w) in weights.iter_mut().zip(&e.weights) {
            *m += w / entries.len() as f32;
        }
    }
    Entry {
        title,
        weights,
        window,
    }
}

/// Runs the command.
pub fn attention(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["q8_0"]);
    let text = args
        .positional
        .get(1)
        .ok_or_else(|| format!("missing TEXT\n{}", crate::usage()))?;
    let png = args.value("png")?;
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
    let query = match args.value("token")? {
        None => n - 1,
        Some(word) => find_word(&pieces, word).ok_or_else(|| {
            let shown: Vec<String> = pieces.iter().map(|p| format!("{p:?}")).collect();
            format!(
                "no token of the text is {:?}; its tokens: {}",
                word.trim(),
                shown.join(" ")
            )
        })?,
    };
    let c = model.config();
    let (layers, layers_given) = indices(&args, "layer", c.n_layers, "layer")?;
    let (heads, heads_given) = indices(&args, "head", c.n_heads, "head")?;
    let top = args.number("top", 5)?.max(1);

    // What is shown, decided once for the lines, the panels and the picture's size.
    let show_heads = layers_given || heads_given;
    let show_layer_means = !show_heads || heads.len() > 1;
    let show_all = layers.len() > 1;
    let n_entries = layers.len() * (usize::from(show_heads) * heads.len())
        + layers.len() * usize::from(show_layer_means)
        + usize::from(show_all);
    let labels: Vec<String> = pieces.iter().map(|p| heatmap::label(p)).collect();
    let head_title = |layer: usize, head: usize| format!("layer {layer} head {head}");
    let layer_title = |layer: usize| format!("layer {layer} mean");
    let layout = match png {
        None => None,
        Some(_) => {
            // Titles grow with their indices: the largest ones give the widest.
            let (last_layer, last_head) = (layers.iter().max(), heads.iter().max());
            let title_chars = [
                last_layer
                    .zip(last_head)
                    .filter(|_| show_heads)
                    .map_or(0, |(&l, &h)| head_title(l, h).len()),
                last_layer.map_or(0, |&l| layer_title(l).len()),
                ALL_TITLE.len(),
            ];
            let label_chars = labels.iter().map(|l| l.chars().count()).max();
            let layout = Layout::new(
                n,
                n_entries,
                label_chars.unwrap_or(1),
                title_chars.into_iter().max().unwrap_or(1),
            );
            layout.check_size()?;
            Some(layout)
        }
    };

    // Without a picture only the query's row is needed: capture from it on.
    let first_row = if png.is_some() { 0 } else { query };
    let rows = n - first_row;
    let selection = AttentionSelection {
        layers: layers.clone(),
        heads: heads.clone(),
        max_queries: rows,
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

    // Per head of each chosen layer, then the means the options ask for.
    let kept = if png.is_some() { rows } else { 1 };
    let all_window = layers
        .iter()
        .map(|&l| c.layers[l].sliding_window)
        .collect::<Option<Vec<usize>>>()
        .and_then(|w| w.into_iter().max());
    let mut all = vec![0f32; kept * n];
    let mut entries = Vec::with_capacity(n_entries);
    for &layer in &layers {
        let window = c.layers[layer].sliding_window;
        let mut per_head = Vec::with_capacity(heads.len());
        for &head in &heads {
            let captured = session.attention(layer, head).map_err(|e| e.to_string())?;
            let mut weights = vec![0f32; kept * n];
            for (r, dst) in weights.chunks_exact_mut(n).enumerate() {
                dst.copy_from_slice(captured.row(r));
            }
            per_head.push(Entry {
                title: head_title(layer, head),
                weights,
                window,
            });
        }
        let layer_mean = mean(layer_title(layer), &per_head, window);
        for (a, w) in all.iter_mut().zip(&layer_mean.weights) {
            *a += w / layers.len() as f32;
        }
        if show_heads {
            entries.extend(per_head);
        }
        if show_layer_means {
            entries.push(layer_mean);
        }
    }
    if show_all {
        // Every layer has as many chosen heads, so this is the mean over all of them.
        entries.push(Entry {
            title: ALL_TITLE.into(),
            weights: all,
            window: all_window,
        });
    }
    debug_assert_eq!(entries.len(), n_entries);

    let label = |i: usize| match pieces[i].trim() {
        "" => format!("{:?}({i})", pieces[i]),
        word => format!("{word}({i})"),
    };
    let plural = |k: usize| if k == 1 { "" } else { "s" };
    out!(
        "{n} token{}: {}",
        plural(n),
        (0..n).map(label).collect::<Vec<_>>().join(" ")
    );
    let shown = top.min(query + 1);
    out!(
        "query {}: the {shown} position{} it attends to most (its weights sum to 1 over the \
         positions it sees, of 0..={query})",
        label(query),
        plural(shown)
    );
    for e in &entries {
        let row = &e.weights[(query - first_row) * n..][..n];
        let mut order: Vec<usize> = (0..=query)
            .filter(|&k| visible(query, k, e.window))
            .collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let best: Vec<String> = order
            .iter()
            .take(top)
            .map(|&k| format!("{} {:.3}", label(k), row[k]))
            .collect();
        out!("{:<20} {}", e.title, best.join("  "));
    }

    if let (Some(path), Some(layout)) = (png, layout) {
        let panels: Vec<Panel> = entries
            .into_iter()
            .map(|e| {
                let mut weights = e.weights;
                // Keys a query does not see are drawn apart from weights of 0.
                for q in 0..n {
                    for k in 0..n {
                        if !visible(q, k, e.window) {
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
        heatmap::write_png(path, &layout, &labels, &panels, query)?;
        let (w, h) = layout.size();
        eprintln!("[wrote {path}: {} panels, {w}x{h} pixels]", panels.len());
    }
    Ok(())
}
