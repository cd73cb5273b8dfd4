//! `ember attention`: what it prints and the heatmap it writes, read back with a PNG decoder
//! and compared with the weights the library captures for the same text.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use ember::{AttentionSelection, Model, Session, SessionOptions};

/// A decoded 8-bit RGB picture.
struct Picture {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Picture {
    /// The colour at `(x, y)`.
    fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// The PNG at `path`, which it removes.
fn decode(path: &std::path::Path) -> Picture {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    std::fs::remove_file(path).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    Picture {
        width: info.width as usize,
        height: info.height as usize,
        pixels,
    }
}

/// A path for a picture, unique to the test process and `name`.
fn picture_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ember-attn-{}-{name}.png", std::process::id()))
}

#[path = "../src/bin/ember/heatmap.rs"]
#[allow(dead_code)]
mod heatmap;

const FIXTURE: &str = "tests/fixtures/llama";
const TEXT: &str = "hello world, this is a test";

fn ember(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("attention")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The labels of `text`'s tokens in `fixture`, and every head of `layer`'s weights `[n, n]`
/// from the library.
fn library_weights(fixture: &str, text: &str, layer: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let model = Arc::new(Model::load(fixture).unwrap());
    let tokenizer = model.tokenizer().unwrap();
    let tokens = tokenizer.encode(text, true, false).unwrap();
    let n = tokens.len();
    let options = SessionOptions {
        n_ctx: n,
        ..SessionOptions::default()
    };
    let mut session = Session::new(model.clone(), &options).unwrap();
    let selection = AttentionSelection {
        layers: vec![layer],
        heads: vec![],
        max_queries: n,
    };
    session.capture_attention(Some(&selection)).unwrap();
    session.step(&tokens).unwrap();
    let heads = (0..model.config().n_heads)
        .map(|h| {
            let mut w = vec![0f32; n * n];
            session.attention(layer, h).unwrap().copy_to(&mut w);
            w
        })
        .collect();
    let labels = tokens
        .iter()
        .map(|&t| heatmap::label(&tokenizer.decode(&[t]).unwrap()))
        .collect();
    (labels, heads)
}

#[test]
fn prints_the_positions_the_query_attends_to_most() {
    let (labels, heads) = library_weights(FIXTURE, TEXT, 1);
    let n = labels.len();
    let (ok, stdout, stderr) = ember(&[FIXTURE, TEXT, "--layer", "1", "--top", "3"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with(&format!("{n} tokens: ")), "{stdout}");
    // One line per head, then the layer's mean; no "mean of all" for one layer.
    assert_eq!(lines.len(), 2 + heads.len() + 1, "{stdout}");
    assert!(lines.last().unwrap().starts_with("layer 1 mean"));
    for (h, weights) in heads.iter().enumerate() {
        let line = lines[2 + h];
        assert!(line.starts_with(&format!("layer 1 head {h} ")), "{line}");
        // The last token's row, its three largest weights in order.
        let row = &weights[(n - 1) * n..];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let printed: Vec<String> = line
            .split("  ")
            .skip(1)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(printed.len(), 3, "{line}");
        for (entry, &k) in printed.iter().zip(&order) {
            assert!(
                entry.contains(&format!("({k}) {:.3}", row[k])),
                "{line}: {k}"
            );
        }
    }
}

#[test]
fn the_heatmap_shows_the_weights_the_library_captures() {
    let (labels, heads) = library_weights(FIXTURE, TEXT, 1);
    let n = labels.len();
    let path = picture_path("weights");
    let (ok, _, stderr) = ember(&[
        FIXTURE,
        TEXT,
        "--layer",
        "1",
        "--png",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let picture = decode(&path);

    // Every head and the layer's mean.
    let label_chars = labels.iter().map(|l| l.chars().count()).max().unwrap();
    let title_chars = format!("layer 1 head {}", heads.len() - 1).len();
    let layout = heatmap::Layout::new(n, heads.len() + 1, label_chars, title_chars);
    assert_eq!((picture.width, picture.height), layout.size());
    for (p, weights) in heads.iter().enumerate() {
        let mut seen = Vec::new();
        for q in 0..n {
            for k in 0..n {
                let (x, y) = layout.cell_centre(p, q, k);
                let rgb = picture.pixel(x, y);
                if k > q {
                    assert_eq!(rgb, heatmap::MASKED, "panel {p} ({q}, {k})");
                } else {
                    assert_eq!(
                        rgb,
                        heatmap::colour(weights[q * n + k]),
                        "panel {p} ({q}, {k})"
                    );
                    seen.push((weights[q * n + k], rgb));
                }
            }
        }
        // Darker for more: with cells sorted by weight, no channel ever gets lighter, and
        // weights apart by more than a colour step are apart in colour.
        seen.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in seen.windows(2) {
            let ((w0, c0), (w1, c1)) = (pair[0], pair[1]);
            assert!(
                (0..3).all(|c| c1[c] <= c0[c]),
                "{w0} {c0:?} then {w1} {c1:?}"
            );
            if w1.sqrt() - w0.sqrt() > 2.0 / 255.0 {
                assert!(c1[0] < c0[0], "{w0} {c0:?} then {w1} {c1:?}");
            }
        }
        assert!(
            seen.last().unwrap().0 > 0.2 && seen[0].0 < 0.05,
            "a spread of weights"
        );
    }
}

#[test]
fn bad_choices_are_clear_errors() {
    let (ok, _, stderr) = ember(&[FIXTURE, TEXT, "--layer", "7"]);
    assert!(
        !ok && stderr.contains("--layer 7: the model has 2 layers"),
        "{stderr}"
    );
    let (ok, _, stderr) = ember(&[FIXTURE, TEXT, "--token", "zebra"]);
    assert!(
        !ok && stderr.contains("no token of the text is \"zebra\""),
        "{stderr}"
    );
    let (ok, _, stderr) = ember(&[FIXTURE, TEXT, "--head", "x"]);
    assert!(!ok && stderr.contains("--head takes indices"), "{stderr}");
}

#[test]
fn a_word_of_several_tokens_is_queried_at_its_last() {
    // The fixture's tokenizer spells " world" as " w" "or" "ld" (positions 3 to 5).
    let (ok, stdout, stderr) = ember(&[FIXTURE, TEXT, "--token", "world"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.lines().nth(1).unwrap().starts_with("query ld(5):"),
        "{stdout}"
    );
    let (ok, stdout, _) = ember(&[FIXTURE, TEXT, "--token", "this"]);
    assert!(
        ok && stdout.lines().nth(1).unwrap().starts_with("query s(10):"),
        "{stdout}"
    );
}

#[test]
fn repeated_indices_are_shown_once() {
    // --layer 1,1 --head 0,0 is one panel's line, not four (and no mean of one head).
    let (ok, stdout, stderr) = ember(&[FIXTURE, TEXT, "--layer", "1,1", "--head", "0,0"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[2].starts_with("layer 1 head 0 "), "{stdout}");
}

#[test]
fn the_default_shows_layer_means_and_head_alone_every_layer() {
    let (ok, stdout, stderr) = ember(&[FIXTURE, TEXT]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2 + 2 + 1, "{stdout}");
    assert!(
        lines[1].starts_with("query t(18): the 5 positions"),
        "{stdout}"
    );
    assert!(lines[2].starts_with("layer 0 mean "), "{stdout}");
    assert!(lines[3].starts_with("layer 1 mean "), "{stdout}");
    assert!(lines[4].starts_with("mean of all "), "{stdout}");
    for line in &lines[2..] {
        assert_eq!(line.matches(") 0.").count(), 5, "{line}");
    }
    let (ok, stdout, stderr) = ember(&[FIXTURE, TEXT, "--head", "2"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2 + 2 + 1, "{stdout}");
    assert!(lines[2].starts_with("layer 0 head 2 "), "{stdout}");
    assert!(lines[3].starts_with("layer 1 head 2 "), "{stdout}");
    assert!(lines[4].starts_with("mean of all "), "{stdout}");
}

#[test]
fn short_texts_and_missing_values() {
    // One token ("h"): one position whatever --top asks, in the singular.
    let (ok, stdout, stderr) = ember(&[FIXTURE, "h", "--top", "5"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "1 token: h(0)", "{stdout}");
    assert!(
        lines[1].starts_with("query h(0): the 1 position it"),
        "{stdout}"
    );
    assert!(lines[2].ends_with("h(0) 1.000"), "{stdout}");
    // Two tokens ("he" "ll"), the query the first: one position it sees.
    let (ok, stdout, stderr) = ember(&[FIXTURE, "hell", "--token", " he ", "--layer", "0"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2 tokens: he(0) ll(1)", "{stdout}");
    assert!(
        lines[1].starts_with("query he(0): the 1 position it"),
        "{stdout}"
    );
    assert!(
        lines[2..].iter().all(|l| l.ends_with("he(0) 1.000")),
        "{stdout}"
    );
    // A value-taking option without its value is an error, not ignored.
    for args in [&["--png"][..], &["--png", "--layer", "1"], &["--token"]] {
        let (ok, _, stderr) = ember(&[&[FIXTURE, TEXT][..], args].concat());
        assert!(
            !ok && stderr.contains("needs a value"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn panels_are_as_wide_as_their_titles() {
    // One token: a grid of one cell beside titles of 14 characters.
    let path = picture_path("titles");
    let (ok, _, stderr) = ember(&[
        FIXTURE,
        "h",
        "--layer",
        "1",
        "--png",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let picture = decode(&path);
    let layout = heatmap::Layout::new(1, 5, 1, "layer 1 head 0".len());
    assert_eq!((picture.width, picture.height), layout.size());
    assert!(picture.width > heatmap::Layout::new(1, 5, 1, 0).size().0);
    // Each title's last glyph (the head's digit, "mean"'s 'n') is drawn whole, not clipped:
    // dark pixels in its 8 columns.
    for (panel, chars) in [14, 14, 14, 14, "layer 1 mean".len()]
        .into_iter()
        .enumerate()
    {
        let (left, top) = layout.title_origin(panel);
        let dark = (left + (chars - 1) * 8..left + chars * 8)
            .flat_map(|x| (top..top + 8).map(move |y| (x, y)))
            .filter(|&(x, y)| picture.pixel(x, y)[0] == 0)
            .count();
        assert!(
            dark > 4,
            "panel {panel}: {dark} dark pixels in the title's last glyph"
        );
    }
}

/// Checks a sliding-window model's lines and picture: `layers` 0 and 1, head 0, a text
/// longer than the window of 8. `masked[p]`: whether panel p (layer 0, layer 1, their mean)
/// hides keys 8 or more behind the query.
fn check_sliding_window(fixture: &str, masked: [bool; 3]) {
    const WINDOW: usize = 8;
    let text = "hello world, this is a test of a sliding window over many tokens";
    let (labels, layer0) = library_weights(fixture, text, 0);
    let (_, layer1) = library_weights(fixture, text, 1);
    let n = labels.len();
    assert!(n > 2 * WINDOW, "{n} tokens");
    let path = picture_path(fixture.rsplit('/').next().unwrap());
    let (ok, stdout, stderr) = ember(&[
        fixture,
        text,
        "--layer",
        "0,1",
        "--head",
        "0",
        "--top",
        "20",
        "--png",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let picture = decode(&path);
    let mut mean = vec![0f32; n * n];
    for (m, (a, b)) in mean.iter_mut().zip(layer0[0].iter().zip(&layer1[0])) {
        *m = a / 2.0 + b / 2.0;
    }
    let weights = [&layer0[0], &layer1[0], &mean];
    // The printed lines list only keys the query sees: the last WINDOW where masked.
    let lines: Vec<&str> = stdout.lines().skip(2).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, &hidden) in lines.iter().zip(&masked) {
        let keys = line.matches(") 0.").count() + line.matches(") 1.").count();
        assert_eq!(keys, if hidden { WINDOW } else { 20 }, "{line}");
    }
    let title_chars = "layer 1 head 0".len();
    let label_chars = labels.iter().map(|l| l.chars().count()).max().unwrap();
    let layout = heatmap::Layout::new(n, 3, label_chars, title_chars);
    for (p, (w, &hidden)) in weights.iter().zip(&masked).enumerate() {
        for q in 0..n {
            for k in 0..=q {
                let (x, y) = layout.cell_centre(p, q, k);
                let rgb = picture.pixel(x, y);
                if hidden && q >= k + WINDOW {
                    assert_eq!(rgb, heatmap::MASKED, "{fixture} panel {p} ({q}, {k})");
                    assert_eq!(w[q * n + k], 0.0);
                } else {
                    assert_eq!(
                        rgb,
                        heatmap::colour(w[q * n + k]),
                        "{fixture} panel {p} ({q}, {k})"
                    );
                }
            }
        }
    }
}

#[test]
fn sliding_windows_are_masked_where_every_layer_masks() {
    // Gemma 2: layer 0 slides, layer 1 sees everything, so their mean sees everything.
    check_sliding_window("tests/fixtures/arch/gemma2", [true, false, false]);
    // Mistral: every layer slides by 8, and so does the mean over them.
    check_sliding_window("tests/fixtures/arch/mistral", [true, true, true]);
}
