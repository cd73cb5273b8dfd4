//! The picture `ember attention --png` writes: one heatmap panel per chosen layer/head, query
//! tokens down the side, key tokens along the top, darker for more attention.
//!
//! Depends on nothing of Ember's, so tests/cli_attention.rs includes this file to find the
//! cells of the picture it decodes.

use font8x8::UnicodeFonts;

/// Pixels per glyph side (font8x8's glyphs are 8×8).
const GLYPH: usize = 8;
/// Pixels per cell side.
pub const CELL: usize = 12;
/// Characters of a token label (longer labels are cut, ending in `~`).
pub const LABEL_CHARS: usize = 12;
/// Pixels of a panel's title row.
const TITLE_PX: usize = GLYPH + 6;
/// Pixels between panels and around the picture.
const GAP: usize = 16;
/// The colour of cells a query does not see (later positions, outside a sliding window).
pub const MASKED: [u8; 3] = [232, 232, 232];
const BACKGROUND: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [0, 0, 0];
/// The label colour of the query token the command was asked about.
const HIGHLIGHT: [u8; 3] = [200, 0, 0];
/// The colour of weight 1 (weight 0 is white).
const FULL: [u8; 3] = [8, 48, 107];
/// Largest picture drawn, in pixels (about 300 MB as RGB).
pub const MAX_PIXELS: usize = 100_000_000;

/// One panel: a title and a `[n, n]` matrix of weights (row = query, column = key), with a
/// negative value for a cell the query does not see.
pub struct Panel {
    pub title: String,
    pub weights: Vec<f32>,
}

/// Where everything goes in a picture of `n_panels` panels over `n_tokens` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub n_tokens: usize,
    pub n_panels: usize,
    /// Panels per row of the picture.
    pub columns: usize,
    /// Pixels of the label margins (left of and above each panel's grid).
    label_px: usize,
    /// Pixels of the widest title.
    title_px: usize,
}

impl Layout {
    /// The layout for labels of at most `label_chars` characters and titles of at most
    /// `title_chars`.
    pub fn new(n_tokens: usize, n_panels: usize, label_chars: usize, title_chars: usize) -> Layout {
        // A roughly square grid of panels.
        let columns = (1..=n_panels.max(1))
            .find(|c| c * c >= n_panels)
            .unwrap_or(1);
        Layout {
            n_tokens,
            n_panels,
            columns,
            label_px: label_chars.clamp(1, LABEL_CHARS) * GLYPH + 4,
            title_px: title_chars * GLYPH,
        }
    }

    /// A panel's width (at least its title's) and height.
    fn panel_size(&self) -> (usize, usize) {
        let grid = self.n_tokens * CELL;
        (
            (self.label_px + grid).max(self.title_px),
            TITLE_PX + self.label_px + grid,
        )
    }

    /// An error when the picture would have more than [`MAX_PIXELS`] pixels.
    pub fn check_size(&self) -> Result<(), String> {
        let (width, height) = self.size();
        match width.checked_mul(height) {
            Some(pixels) if pixels <= MAX_PIXELS => Ok(()),
            _ => Err(format!(
                "the picture would be {width}x{height} pixels (at most {MAX_PIXELS}): choose \
                 fewer layers or heads (--layer, --head) or a shorter text"
            )),
        }
    }

    /// The picture's width and height in pixels.
    pub fn size(&self) -> (usize, usize) {
        let (pw, ph) = self.panel_size();
        let rows = self.n_panels.div_ceil(self.columns);
        (
            GAP + self.columns * (pw + GAP),
            GAP + rows.max(1) * (ph + GAP),
        )
    }

    /// The top-left pixel of the grid of panel `panel`.
    fn grid_origin(&self, panel: usize) -> (usize, usize) {
        let (pw, ph) = self.panel_size();
        let (col, row) = (panel % self.columns, panel / self.columns);
        (
            GAP + col * (pw + GAP) + self.label_px,
            GAP + row * (ph + GAP) + TITLE_PX + self.label_px,
        )
    }

    /// The top-left pixel of panel `panel`'s title: the panel's left edge (panels are at
    /// least as wide as their titles).
    pub fn title_origin(&self, panel: usize) -> (usize, usize) {
        let (x, y) = self.grid_origin(panel);
        (x - self.label_px, y - self.label_px - TITLE_PX + 2)
    }

    /// The centre pixel of the cell of query `query` and key `key` in panel `panel` (what
    /// tests/cli_attention.rs reads; the command itself has no use for it).
    #[allow(dead_code)]
    pub fn cell_centre(&self, panel: usize, query: usize, key: usize) -> (usize, usize) {
        let (x, y) = self.grid_origin(panel);
        (x + key * CELL + CELL / 2, y + query * CELL + CELL / 2)
    }
}

/// The colour of a weight in `[0, 1]`: white to dark blue on a square-root scale, so that
/// small weights stay visible beside an attention sink's large one. Each channel falls
/// strictly as the weight grows.
pub fn colour(weight: f32) -> [u8; 3] {
    let t = weight.clamp(0.0, 1.0).sqrt();
    std::array::from_fn(|c| {
        let (from, to) = (BACKGROUND[c] as f32, FULL[c] as f32);
        (from + (to - from) * t).round() as u8
    })
}

/// What a label shows of a token's text: spaces and line breaks made visible, characters
/// without a glyph as `?`, cut to [`LABEL_CHARS`].
pub fn label(text: &str) -> String {
    let visible: String = text
        .chars()
        .map(|c| match c {
            ' ' => '_',
            '\n' => '/',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    let mut chars: Vec<char> = visible.chars().collect();
    if chars.len() > LABEL_CHARS {
        chars.truncate(LABEL_CHARS - 1);
        chars.push('~');
    }
    chars.into_iter().collect()
}

/// An RGB canvas.
struct Canvas {
    width: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// Colours one pixel; pixels outside the canvas (a title longer than its panel) are
    /// clipped instead of wrapping onto the next row or past the end.
    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x >= self.width {
            return;
        }
        let i = (y * self.width + x) * 3;
        if let Some(pixel) = self.pixels.get_mut(i..i + 3) {
            pixel.copy_from_slice(&rgb);
        }
    }

    fn glyph(c: char) -> [u8; 8] {
        font8x8::BASIC_FONTS
            .get(c)
            .or_else(|| font8x8::LATIN_FONTS.get(c))
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or_default()
    }

    /// Text left to right from its top-left corner.
    fn text(&mut self, x: usize, y: usize, text: &str, rgb: [u8; 3]) {
        for (k, c) in text.chars().enumerate() {
            for (gy, bits) in Self::glyph(c).iter().enumerate() {
                for gx in 0..GLYPH {
                    if bits >> gx & 1 == 1 {
                        self.set(x + k * GLYPH + gx, y + gy, rgb);
                    }
                }
            }
        }
    }

    /// Text reading upwards, its first character's bottom-left corner at `(x, bottom)`.
    fn text_up(&mut self, x: usize, bottom: usize, text: &str, rgb: [u8; 3]) {
        for (k, c) in text.chars().enumerate() {
            for (gy, bits) in Self::glyph(c).iter().enumerate() {
                for gx in 0..GLYPH {
                    if bits >> gx & 1 == 1 {
                        self.set(x + gy, bottom - k * GLYPH - gx - 1, rgb);
                    }
                }
            }
        }
    }
}

/// Draws the panels over tokens labelled `labels` as RGB pixels, the labels of token
/// `highlight` in red. Every panel's weights are `[labels.len(), labels.len()]`.
pub fn render(layout: &Layout, labels: &[String], panels: &[Panel], highlight: usize) -> Vec<u8> {
    let (width, height) = layout.size();
    let mut canvas = Canvas {
        width,
        pixels: BACKGROUND.repeat(width * height),
    };
    let n = labels.len();
    for (p, panel) in panels.iter().enumerate() {
        let (gx, gy) = layout.grid_origin(p);
        let (tx, ty) = layout.title_origin(p);
        canvas.text(tx, ty, &panel.title, TEXT);
        for (i, text) in labels.iter().enumerate() {
            let rgb = if i == highlight { HIGHLIGHT } else { TEXT };
            let offset = (CELL - GLYPH) / 2;
            let chars = text.chars().count();
            // Row labels end at the grid; column labels read upwards from just above it.
            canvas.text(gx - 2 - chars * GLYPH, gy + i * CELL + offset, text, rgb);
            canvas.text_up(gx + i * CELL + offset, gy - 2, text, rgb);
        }
        for q in 0..n {
            for k in 0..n {
                let w = panel.weights[q * n + k];
                let rgb = if w < 0.0 { MASKED } else { colour(w) };
                // One pixel of white between cells.
                for y in 0..CELL - 1 {
                    for x in 0..CELL - 1 {
                        canvas.set(gx + k * CELL + x, gy + q * CELL + y, rgb);
                    }
                }
            }
        }
    }
    canvas.pixels
}

/// Writes the picture to `path` as an 8-bit RGB PNG.
pub fn write_png(
    path: &str,
    layout: &Layout,
    labels: &[String],
    panels: &[Panel],
    highlight: usize,
) -> Result<(), String> {
    layout.check_size()?;
    let (width, height) = layout.size();
    let pixels = render(layout, labels, panels, highlight);
    let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| format!("{path}: {e}"))?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| format!("{path}: {e}"))?;
    writer.finish().map_err(|e| format!("{path}: {e}"))
}
