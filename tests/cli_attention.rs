//! `ember attention`: what it prints and the heatmap it writes, read back with a PNG decoder
//! and compared with the weights the library captures for the same text.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use ember::{AttentionSelection, Model, Session, SessionOptions};

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

/// The fixture's tokens of TEXT, their labels, and every head of `layer`'s weights
/// `[n, n]` from the library.
fn library_weights(layer: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let model = Arc::new(Model::load(FIXTURE).unwrap());
    let tokenizer = model.tokenizer().unwrap();
    let tokens = tokenizer.encode(TEXT, true, false).unwrap();
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
    let (labels, heads) = library_weights(1);
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
    let (labels, heads) = library_weights(1);
    let n = labels.len();
    let path: PathBuf = std::env::temp_dir().join(format!("ember-attn-{}.png", std::process::id()));
    let (ok, _, stderr) = ember(&[
        FIXTURE,
        TEXT,
        "--layer",
        "1",
        "--png",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);

    // Every head and the layer's mean.
    let label_chars = labels.iter().map(|l| l.chars().count()).max().unwrap();
    let layout = heatmap::Layout::new(n, heads.len() + 1, label_chars);
    let (width, height) = layout.size();
    assert_eq!((info.width as usize, info.height as usize), (width, height));
    let pixel = |x: usize, y: usize| -> [u8; 3] {
        let i = (y * width + x) * 3;
        [pixels[i], pixels[i + 1], pixels[i + 2]]
    };
    for (p, weights) in heads.iter().enumerate() {
        let mut seen = Vec::new();
        for q in 0..n {
            for k in 0..n {
                let (x, y) = layout.cell_centre(p, q, k);
                let rgb = pixel(x, y);
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
