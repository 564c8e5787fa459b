//! Plots of Analytics results, drawn with plotters into PNG or SVG files.
//!
//! Every plot kind is a struct of plain data (no proto types) implementing [`Plot`]; [`render`]
//! draws it into a file whose extension picks the backend (`.png` bitmap, `.svg` vector).
//! [`render_rgb`] and [`render_svg`] draw into memory instead. Text uses DejaVu Sans, embedded
//! in the binary (see `client/assets/DejaVuSans-LICENSE.txt`), so plots look the same on every
//! machine.
//!
//! The kinds:
//! - [`Eigenfilters`]: PCA eigenfilters as 3x3 tiles on a diverging colour scale, one row per
//!   group.
//! - [`Ridges`]: per-component coefficient densities, one ridge per group, 9 panels.
//! - [`Heatmap`]: a square matrix (drift D between groups) with keys on both axes and values in
//!   the cells.
//! - [`Boxplots`]: a metric per bin across models (depth profiles).
//! - [`DensityImage`]: a 2-D histogram on a logarithmic colour scale.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontDesc, FontFamily, FontStyle, FontTransform, register_font};

/// DejaVu Sans (Bitstream Vera license, redistributable; see the license file next to it).
static FONT_TTF: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The result of drawing on a backend.
pub type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The output file name has no supported extension.
    #[error("cannot plot to `{}`: the file name must end in .png or .svg", .0.display())]
    Format(PathBuf),
    /// The data cannot be drawn (empty, or inconsistent lengths).
    #[error("nothing to plot: {0}")]
    Data(String),
    /// The backend failed (typically writing the file).
    #[error("cannot draw `{}`: {message}", .path.display())]
    Draw {
        /// The output.
        path: PathBuf,
        /// The backend's error.
        message: String,
    },
    /// The embedded font did not load (a build problem).
    #[error("the embedded plot font could not be loaded")]
    Font,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Bitmap, through plotters' BitMapBackend.
    Png,
    /// Vector, through plotters' SVGBackend.
    Svg,
}

/// The format a path asks for by its extension (case-insensitive).
pub fn image_format(path: &Path) -> Result<ImageFormat, PlotError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("svg") => Ok(ImageFormat::Svg),
        _ => Err(PlotError::Format(path.to_path_buf())),
    }
}

/// A drawable figure of fixed pixel size.
pub trait Plot {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Rejects data that cannot be drawn; called before any drawing.
    fn check(&self) -> Result<(), PlotError>;
    /// Draws the figure on a white area of [`Plot::size`].
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Registers the embedded font as plotters' "sans-serif" family (once per process).
pub fn ensure_font() -> Result<(), PlotError> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        register_font(FontFamily::SansSerif.as_str(), FontStyle::Normal, FONT_TTF).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn draw_on<P: Plot + ?Sized, DB: DrawingBackend>(
    plot: &P,
    root: &DrawingArea<DB, Shift>,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    plot.draw(root)?;
    root.present()
}

/// Draws a plot into `path`, PNG or SVG by the extension.
pub fn render<P: Plot + ?Sized>(plot: &P, path: &Path) -> Result<(), PlotError> {
    let format = image_format(path)?;
    plot.check()?;
    ensure_font()?;
    let size = plot.size();
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_on(plot, &root).map_err(|e| draw_err(path, e))
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_on(plot, &root).map_err(|e| draw_err(path, e))
        }
    }
}

/// Draws a plot into memory: RGB bytes (3 per pixel, row-major), width, height.
pub fn render_rgb<P: Plot + ?Sized>(plot: &P) -> Result<(Vec<u8>, u32, u32), PlotError> {
    plot.check()?;
    ensure_font()?;
    let (w, h) = plot.size();
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_on(plot, &root).map_err(|e| draw_err(Path::new("<memory>"), e))?;
    }
    Ok((buf, w, h))
}

/// Draws a plot as an SVG document.
pub fn render_svg<P: Plot + ?Sized>(plot: &P) -> Result<String, PlotError> {
    plot.check()?;
    ensure_font()?;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, plot.size()).into_drawing_area();
        draw_on(plot, &root).map_err(|e| draw_err(Path::new("<memory>"), e))?;
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Colours, text, numbers

const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (72, 40, 120),
    (62, 73, 137),
    (49, 104, 142),
    (38, 130, 142),
    (31, 158, 137),
    (53, 183, 121),
    (110, 206, 88),
    (253, 231, 37),
];

const MAGMA: [(u8, u8, u8); 9] = [
    (0, 0, 4),
    (28, 16, 68),
    (79, 18, 123),
    (129, 37, 129),
    (181, 54, 122),
    (229, 80, 100),
    (251, 135, 97),
    (254, 194, 135),
    (252, 253, 191),
];

/// ColorBrewer RdBu reversed: blue (negative) through near-white to red (positive).
const RDBU: [(u8, u8, u8); 11] = [
    (5, 48, 97),
    (33, 102, 172),
    (67, 147, 195),
    (146, 197, 222),
    (209, 229, 240),
    (247, 247, 247),
    (253, 219, 199),
    (244, 165, 130),
    (214, 96, 77),
    (178, 24, 43),
    (103, 0, 31),
];

/// matplotlib's tab10, for groups.
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

const INK: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(100, 100, 100);
const FRAME: RGBColor = RGBColor(120, 120, 120);
const MISSING: RGBColor = RGBColor(200, 200, 200);

fn interpolate(stops: &[(u8, u8, u8)], t: f64) -> RGBColor {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (stops.len() - 1) as f64;
    let i = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Viridis, `t` in [0, 1] (clamped).
pub fn viridis(t: f64) -> RGBColor {
    interpolate(&VIRIDIS, t)
}

/// Magma, `t` in [0, 1] (clamped).
pub fn magma(t: f64) -> RGBColor {
    interpolate(&MAGMA, t)
}

/// Diverging blue–white–red, `t` in [0, 1] (0.5 is the neutral middle).
pub fn diverging(t: f64) -> RGBColor {
    interpolate(&RDBU, t)
}

/// The colour of group `i` (tab10, cycling).
pub fn group_color(i: usize) -> RGBColor {
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b)
}

/// Black or white, whichever reads better on `bg`.
fn ink_on(bg: RGBColor) -> RGBColor {
    let l = 0.299 * bg.0 as f64 + 0.587 * bg.1 as f64 + 0.114 * bg.2 as f64;
    if l > 140.0 { INK } else { WHITE }
}

/// The font at `size` pixels, rounded to an even number: plotters' ab_glyph renderer puts each
/// glyph at `trunc(size / 2 + top)`, which rounds glyphs above and below that line in opposite
/// directions when size / 2 is fractional (a `.` then floats a pixel above the baseline).
fn font(size: f64) -> FontDesc<'static> {
    let size = ((size / 2.0).round() * 2.0).max(2.0);
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
}

fn style(size: f64, color: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle {
        font: font(size),
        color: color.to_backend_color(),
        pos: Pos::new(h, v),
    }
}

/// Width in pixels of `s` at `size` (an estimate when the font is unavailable).
pub fn text_width(s: &str, size: f64) -> i32 {
    let _ = ensure_font();
    font(size)
        .box_size(s)
        .map(|(w, _)| w as i32)
        .unwrap_or_else(|_| (s.chars().count() as f64 * size * 0.6) as i32)
}

/// `s` shortened with an ellipsis to at most `max_w` pixels.
fn fit(s: &str, size: f64, max_w: i32) -> String {
    if text_width(s, size) <= max_w {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    for n in (1..chars.len()).rev() {
        let t: String = chars[..n].iter().collect::<String>() + "…";
        if text_width(&t, size) <= max_w {
            return t;
        }
    }
    "…".to_string()
}

/// True for the SVG backend, whose viewer lays text out itself.
fn is_svg<DB: DrawingBackend>() -> bool {
    std::any::type_name::<DB>().contains("SVGBackend")
}

/// How far right of the pen the ink of `c` at `size` must be moved to sit where the font wants.
///
/// plotters' ab_glyph renderer places each glyph's pixel box at the pen position, dropping the
/// whole-pixel part of the left side bearing, so glyphs with wide bearings (`.`, `1`, `(`, `=`)
/// drift left and leave gaps ("40. 0%"). Bitmap text is therefore drawn glyph by glyph, each
/// shifted by this amount. DejaVu's bearings are nearly symmetric, so the middle of the ink's
/// extent belongs at half the advance; the shift is that minus the middle of the ink as
/// plotters draws it, measured once per glyph and size by rendering it.
fn bearing(c: char, size: f64) -> i32 {
    static CACHE: Mutex<Option<HashMap<(char, u32), i32>>> = Mutex::new(None);
    let key = (c, (size * 10.0).round() as u32);
    if let Some(v) = CACHE
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).copied()))
    {
        return v;
    }
    // The advance with sub-pixel precision: widths are whole pixels, so measure 16 copies.
    let advance = text_width(&c.to_string().repeat(16), size) as f64 / 16.0;
    let pad = size.ceil() as i32;
    let (w, h) = ((advance.ceil() as i32 + 2 * pad) as u32, (3 * pad) as u32);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let area = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let drawn = area.draw(&Text::new(
            c.to_string(),
            (pad, pad),
            style(size, BLACK, HPos::Left, VPos::Top),
        ));
        if drawn.is_err() {
            return 0;
        }
    }
    // Ink extent with sub-pixel edges: an edge column's coverage says how much of it is inked.
    let coverage: Vec<f64> = (0..w as usize)
        .map(|x| {
            (0..h as usize)
                .map(|y| 255 - buf[(y * w as usize + x) * 3])
                .max()
                .unwrap_or(0) as f64
                / 255.0
        })
        .collect();
    let first = coverage.iter().position(|c| *c > 0.02);
    let last = coverage.iter().rposition(|c| *c > 0.02);
    let v = match (first, last) {
        (Some(a), Some(b)) => {
            let left = a as f64 + (1.0 - coverage[a]) - pad as f64;
            let right = b as f64 + coverage[b] - pad as f64;
            let shift = advance / 2.0 - (left + right) / 2.0;
            shift.round().clamp(-2.0, size / 2.0) as i32
        }
        _ => 0,
    };
    if let Ok(mut m) = CACHE.lock() {
        m.get_or_insert_with(HashMap::new).insert(key, v);
    }
    v
}

/// Draws `s` anchored at `pos` (`h` along the text, `v` across it), horizontal or rotated to
/// read bottom to top. ab_glyph's layout box is shorter than the glyphs and puts the baseline
/// half a size below the box top, so the cross-text position is nudged to look centred.
#[allow(clippy::too_many_arguments)]
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    (x, y): (i32, i32),
    size: f64,
    color: RGBColor,
    h: HPos,
    v: VPos,
    vertical: bool,
) -> DrawResult<DB> {
    let nudge = match v {
        // SVG viewers place text by its real metrics.
        _ if is_svg::<DB>() => 0,
        VPos::Top => (0.22 * size) as i32,
        VPos::Center => (0.12 * size) as i32,
        VPos::Bottom => 0,
    };
    let (x, y) = if vertical {
        (x + nudge, y)
    } else {
        (x, y + nudge)
    };
    let rotate = |st: TextStyle<'static>| {
        if vertical {
            st.transform(FontTransform::Rotate270)
        } else {
            st
        }
    };
    if is_svg::<DB>() {
        return area.draw(&Text::new(
            s.to_string(),
            (x, y),
            rotate(style(size, color, h, v)),
        ));
    }
    let total = text_width(s, size);
    let lead = match h {
        HPos::Left => 0,
        HPos::Center => total / 2,
        HPos::Right => total,
    };
    let glyph = rotate(style(size, color, HPos::Left, v));
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            continue;
        }
        // Pen positions from prefix widths keep kerning and avoid rounding drift.
        let along = text_width(&s[..i], size) - lead + bearing(c, size);
        let pos = if vertical {
            (x, y - along)
        } else {
            (x + along, y)
        };
        area.draw(&Text::new(c.to_string(), pos, glyph.clone()))?;
    }
    Ok(())
}

/// Horizontal text anchored at `pos`.
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    pos: (i32, i32),
    size: f64,
    color: RGBColor,
    h: HPos,
    v: VPos,
) -> DrawResult<DB> {
    draw_text(area, s, pos, size, color, h, v, false)
}

/// Text rotated to read bottom to top, centred across at `pos.0`; `h` anchors along the text
/// (`Right`: the text ends at `pos`, running down from it).
fn vertical_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    pos: (i32, i32),
    size: f64,
    color: RGBColor,
    h: HPos,
) -> DrawResult<DB> {
    draw_text(area, s, pos, size, color, h, VPos::Center, true)
}

/// `v` with `sig` significant digits, switching to exponent form for very large or small values.
pub fn fmt_sig(v: f64, sig: usize) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let sig = sig.max(1);
    let mag = v.abs().log10().floor() as i32;
    if !(-3..5).contains(&mag) {
        return format!("{:.*e}", sig - 1, v);
    }
    let decimals = (sig as i32 - 1 - mag).max(0) as usize;
    format!("{v:.decimals$}")
}

/// Round tick values covering [lo, hi], about `target` of them.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let step = mag
        * if f < 1.5 {
            1.0
        } else if f < 3.0 {
            2.0
        } else if f < 7.0 {
            5.0
        } else {
            10.0
        };
    let mut out = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 {
        let v = k * step;
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        k += 1.0;
    }
    out
}

/// Decimals that show ticks of spacing `step` without noise.
fn tick_decimals(ticks: &[f64]) -> usize {
    if ticks.len() < 2 {
        return 2;
    }
    let step = (ticks[1] - ticks[0]).abs();
    if step <= 0.0 {
        return 2;
    }
    (-(step.log10().floor()) as i32).clamp(0, 6) as usize
}

/// A vertical colour bar in `[x, x + w) × [y0, y1)`: `t` runs from 0 at the bottom to 1 at the
/// top; ticks are `(t, label)`; the caption reads bottom to top on the right.
#[allow(clippy::too_many_arguments)]
fn colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: i32,
    y0: i32,
    y1: i32,
    w: i32,
    cmap: &dyn Fn(f64) -> RGBColor,
    ticks: &[(f64, String)],
    caption: &str,
) -> DrawResult<DB> {
    let h = (y1 - y0).max(2);
    for py in y0..y1 {
        let t = 1.0 - (py - y0) as f64 / (h - 1) as f64;
        area.draw(&Rectangle::new(
            [(x, py), (x + w, py + 1)],
            cmap(t).filled(),
        ))?;
    }
    area.draw(&Rectangle::new([(x, y0), (x + w, y1)], FRAME))?;
    let mut max_w = 0;
    for (t, label) in ticks {
        let py = y0 + ((1.0 - t) * (h - 1) as f64).round() as i32;
        area.draw(&PathElement::new(vec![(x + w, py), (x + w + 4, py)], FRAME))?;
        text(
            area,
            label,
            (x + w + 7, py),
            13.0,
            INK,
            HPos::Left,
            VPos::Center,
        )?;
        max_w = max_w.max(text_width(label, 13.0));
    }
    if !caption.is_empty() {
        vertical_text(
            area,
            caption,
            (x + w + 16 + max_w, (y0 + y1) / 2),
            14.0,
            INK,
            HPos::Center,
        )?;
    }
    Ok(())
}

/// The width a [`colorbar`] with these tick labels and a caption needs right of its bar.
fn colorbar_extra(ticks: &[(f64, String)]) -> i32 {
    let max_w = ticks
        .iter()
        .map(|(_, l)| text_width(l, 13.0))
        .max()
        .unwrap_or(0);
    16 + max_w + 24
}

fn title<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, s: &str, width: i32) -> DrawResult<DB> {
    let s = fit(s, 20.0, width - 20);
    text(
        area,
        &s,
        (width / 2, 14),
        20.0,
        INK,
        HPos::Center,
        VPos::Top,
    )
}

/// Linear-interpolated quantile of sorted values (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let f = pos - i as f64;
    if i + 1 < sorted.len() {
        sorted[i] + (sorted[i + 1] - sorted[i]) * f
    } else {
        sorted[i]
    }
}

// ---------------------------------------------------------------------------------------------
// Eigenfilters

/// One row of eigenfilter tiles: a basis.
#[derive(Debug, Clone, PartialEq)]
pub struct EigenfilterRow {
    /// Row label (group key, or "all").
    pub label: String,
    /// Filters the basis was computed from.
    pub n: u64,
    /// 81 values: component k is `[9k, 9k + 9)`, a 3x3 kernel row-major.
    pub components: Vec<f64>,
    /// 9 explained-variance ratios (fractions).
    pub evr: Vec<f64>,
}

/// The 9 eigenfilters of one or more bases as 3x3 tiles, each titled with its EVR.
#[derive(Debug, Clone, PartialEq)]
pub struct Eigenfilters {
    /// Figure title.
    pub title: String,
    /// One row per basis.
    pub rows: Vec<EigenfilterRow>,
}

const EF_CELL: i32 = 30;
const EF_TILE: i32 = 3 * EF_CELL;
const EF_GAP: i32 = 22;
const EF_TILE_TITLE: i32 = 24;
const EF_ROW_GAP: i32 = 20;
const EF_TOP: i32 = 58;

impl Eigenfilters {
    fn label_width(&self) -> i32 {
        let w = self
            .rows
            .iter()
            .map(|r| text_width(&r.label, 15.0).max(text_width(&format!("n = {}", r.n), 13.0)))
            .max()
            .unwrap_or(0);
        (w.min(240) + 28).max(90)
    }

    fn vmax(&self) -> f64 {
        let m = self
            .rows
            .iter()
            .flat_map(|r| r.components.iter())
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, v| a.max(v.abs()));
        if m > 0.0 { m } else { 1.0 }
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        let v = self.vmax();
        // One row leaves a bar one tile high: three labels fit, five would crowd.
        let steps: &[f64] = if self.rows.len() > 1 {
            &[-1.0, -0.5, 0.0, 0.5, 1.0]
        } else {
            &[-1.0, 0.0, 1.0]
        };
        steps
            .iter()
            .map(|f| (0.5 + f / 2.0, format!("{:.2}", f * v)))
            .collect()
    }
}

impl Plot for Eigenfilters {
    fn size(&self) -> (u32, u32) {
        let w =
            self.label_width() + 9 * (EF_TILE + EF_GAP) + 18 + 16 + colorbar_extra(&self.ticks());
        let rows = self.rows.len().max(1) as i32;
        let h = EF_TOP + rows * (EF_TILE_TITLE + EF_TILE + EF_ROW_GAP) + 10;
        (w as u32, h as u32)
    }

    fn check(&self) -> Result<(), PlotError> {
        if self.rows.is_empty() {
            return Err(PlotError::Data("no basis".into()));
        }
        for r in &self.rows {
            if r.components.len() != 81 {
                return Err(PlotError::Data(format!(
                    "basis `{}` has {} component values, expected 81",
                    r.label,
                    r.components.len()
                )));
            }
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (w, _) = self.size();
        title(root, &self.title, w as i32)?;
        let left = self.label_width();
        let vmax = self.vmax();
        for (ri, row) in self.rows.iter().enumerate() {
            let top = EF_TOP + ri as i32 * (EF_TILE_TITLE + EF_TILE + EF_ROW_GAP);
            let tile_y = top + EF_TILE_TITLE;
            let mid = tile_y + EF_TILE / 2;
            let label = fit(&row.label, 15.0, left - 20);
            text(
                root,
                &label,
                (left - 18, mid - 10),
                15.0,
                INK,
                HPos::Right,
                VPos::Center,
            )?;
            text(
                root,
                &format!("n = {}", row.n),
                (left - 18, mid + 10),
                13.0,
                MUTED,
                HPos::Right,
                VPos::Center,
            )?;
            for k in 0..9 {
                let x = left + k as i32 * (EF_TILE + EF_GAP);
                let evr = row
                    .evr
                    .get(k)
                    .map(|e| format!("{:.1}%", e * 100.0))
                    .unwrap_or_else(|| "?".into());
                text(
                    root,
                    &format!("c{k}  {evr}"),
                    (x + EF_TILE / 2, top + EF_TILE_TITLE / 2 - 2),
                    13.0,
                    INK,
                    HPos::Center,
                    VPos::Center,
                )?;
                for cell in 0..9 {
                    let (r, c) = (cell as i32 / 3, cell as i32 % 3);
                    let v = row.components[9 * k + cell];
                    let color = if v.is_finite() {
                        diverging(0.5 + 0.5 * v / vmax)
                    } else {
                        MISSING
                    };
                    let (x0, y0) = (x + c * EF_CELL, tile_y + r * EF_CELL);
                    root.draw(&Rectangle::new(
                        [(x0, y0), (x0 + EF_CELL, y0 + EF_CELL)],
                        color.filled(),
                    ))?;
                }
                root.draw(&Rectangle::new(
                    [(x, tile_y), (x + EF_TILE, tile_y + EF_TILE)],
                    FRAME,
                ))?;
            }
        }
        let rows = self.rows.len() as i32;
        let bar_x = left + 9 * (EF_TILE + EF_GAP) + 16 - EF_GAP;
        let y0 = EF_TOP + EF_TILE_TITLE;
        let y1 = EF_TOP + rows * (EF_TILE_TITLE + EF_TILE + EF_ROW_GAP) - EF_ROW_GAP;
        colorbar(root, bar_x, y0, y1, 18, &diverging, &self.ticks(), "weight")
    }
}

// ---------------------------------------------------------------------------------------------
// Ridges

/// One group's coefficient histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct RidgeGroup {
    /// Group key.
    pub key: String,
    /// Filters in the group (the density divides by it).
    pub n_filters: u64,
    /// 9 components × bins counts.
    pub counts: Vec<Vec<u64>>,
}

/// Coefficient densities per component (9 panels), one ridge per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Ridges {
    /// Figure title.
    pub title: String,
    /// The histograms' range (equal-width bins over it).
    pub range: (f64, f64),
    /// Panel titles, one per component (defaults to `c0` … `c8`).
    pub panel_titles: Vec<String>,
    /// Label of the x axes.
    pub x_label: String,
    /// The groups, top ridge first.
    pub groups: Vec<RidgeGroup>,
}

const RIDGE_W: i32 = 1500;
const RIDGE_TOP: i32 = 52;

impl Ridges {
    fn key_width(&self) -> i32 {
        let w = self
            .groups
            .iter()
            .map(|g| text_width(&g.key, 13.0))
            .max()
            .unwrap_or(0);
        w.min(220) + 16
    }

    fn panel_height(&self) -> i32 {
        (110 + 34 * self.groups.len() as i32).max(230)
    }

    /// density[g][k][b] = counts / (n · bin width).
    fn densities(&self) -> Vec<Vec<Vec<f64>>> {
        self.groups
            .iter()
            .map(|g| {
                g.counts
                    .iter()
                    .map(|c| {
                        let bw = (self.range.1 - self.range.0) / c.len().max(1) as f64;
                        c.iter()
                            .map(|&x| {
                                if g.n_filters == 0 {
                                    0.0
                                } else {
                                    x as f64 / (g.n_filters as f64 * bw)
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }
}

impl Plot for Ridges {
    fn size(&self) -> (u32, u32) {
        (
            RIDGE_W as u32,
            (RIDGE_TOP + 3 * self.panel_height() + 8) as u32,
        )
    }

    fn check(&self) -> Result<(), PlotError> {
        if self.groups.is_empty() {
            return Err(PlotError::Data("no groups".into()));
        }
        let (lo, hi) = self.range;
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(PlotError::Data(format!("invalid range [{lo}, {hi}]")));
        }
        let bins = self.groups[0].counts.first().map(|c| c.len()).unwrap_or(0);
        for g in &self.groups {
            if g.counts.len() != 9 || g.counts.iter().any(|c| c.len() != bins || bins == 0) {
                return Err(PlotError::Data(format!(
                    "group `{}` needs 9 histograms of {bins} bins",
                    g.key
                )));
            }
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        title(root, &self.title, RIDGE_W)?;
        let body = root.margin(RIDGE_TOP, 8, 8, 16);
        let kw = self.key_width();
        let ph = self.panel_height();
        let pw = (RIDGE_W - 24 - kw) / 3;
        let panels = body.split_by_breakpoints([kw + pw, kw + 2 * pw], [ph, 2 * ph]);
        let dens = self.densities();
        let ng = self.groups.len();
        let (lo, hi) = self.range;
        let bins = self.groups[0].counts[0].len();
        let bw = (hi - lo) / bins as f64;
        let top_y = (ng - 1) as f64 + 1.9;
        let xticks = nice_ticks(lo, hi, 6);
        let xdec = tick_decimals(&xticks);
        let grid = RGBColor(228, 228, 228);
        for (k, panel) in panels.iter().enumerate() {
            let (row, col) = (k / 3, k % 3);
            let caption = self
                .panel_titles
                .get(k)
                .cloned()
                .unwrap_or_else(|| format!("c{k}"));
            let (pw_px, _) = panel.dim_in_pixel();
            let left = if col == 0 { kw } else { 6 };
            let caption = fit(&caption, 15.0, pw_px as i32 - left - 20);
            text(
                panel,
                &caption,
                (left + (pw_px as i32 - left - 14) / 2, 14),
                15.0,
                INK,
                HPos::Center,
                VPos::Center,
            )?;
            let mut chart = ChartBuilder::on(panel)
                .margin(6)
                .margin_top(30)
                .margin_right(14)
                .x_label_area_size(if row == 2 { 52 } else { 30 })
                .y_label_area_size(left)
                .build_cartesian_2d(lo..hi, 0.0..top_y)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .disable_y_axis()
                .x_labels(0)
                .y_labels(0)
                .axis_style(FRAME)
                .draw()?;
            chart.draw_series(
                xticks
                    .iter()
                    .map(|&t| PathElement::new(vec![(t, 0.0), (t, top_y)], grid)),
            )?;
            for &t in &xticks {
                let (px, py) = chart.backend_coord(&(t, 0.0));
                root.draw(&PathElement::new(vec![(px, py), (px, py + 4)], FRAME))?;
                text(
                    root,
                    &format!("{t:.xdec$}"),
                    (px, py + 7),
                    12.0,
                    INK,
                    HPos::Center,
                    VPos::Top,
                )?;
            }
            if row == 2 {
                let (x0, py) = chart.backend_coord(&(lo, 0.0));
                let (x1, _) = chart.backend_coord(&(hi, 0.0));
                text(
                    root,
                    &self.x_label,
                    ((x0 + x1) / 2, py + 36),
                    14.0,
                    INK,
                    HPos::Center,
                    VPos::Center,
                )?;
            }
            let hmax = dens
                .iter()
                .flat_map(|g| g[k].iter())
                .fold(0.0f64, |a, &v| a.max(v));
            let scale = if hmax > 0.0 { 1.6 / hmax } else { 0.0 };
            for (g, gd) in dens.iter().enumerate() {
                let base = (ng - 1 - g) as f64;
                let pts: Vec<(f64, f64)> = gd[k]
                    .iter()
                    .enumerate()
                    .map(|(b, &d)| (lo + (b as f64 + 0.5) * bw, base + d * scale))
                    .collect();
                let mut poly = vec![(lo, base)];
                poly.extend(pts.iter().copied());
                poly.push((hi, base));
                let color = group_color(g);
                // Opaque white first, so a ridge hides the ones behind it.
                chart.draw_series(std::iter::once(Polygon::new(poly.clone(), WHITE.filled())))?;
                chart.draw_series(std::iter::once(Polygon::new(
                    poly,
                    color.mix(0.35).filled(),
                )))?;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(lo, base), (hi, base)],
                    RGBColor(190, 190, 190),
                )))?;
                chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
                if col == 0 {
                    let (px, py) = chart.backend_coord(&(lo, base));
                    let key = fit(&self.groups[g].key, 13.0, kw - 12);
                    text(
                        root,
                        &key,
                        (px - 8, py),
                        13.0,
                        INK,
                        HPos::Right,
                        VPos::Center,
                    )?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Heatmap

/// A square matrix of values with the same keys on both axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// Figure title.
    pub title: String,
    /// Row and column keys, in matrix order.
    pub keys: Vec<String>,
    /// keys² values, row-major.
    pub values: Vec<f64>,
    /// Caption of the colour bar.
    pub value_label: String,
    /// Name of what the keys are (both axes), e.g. the grouping field.
    pub axis_label: String,
}

const HM_KEY_FONT: f64 = 14.0;

struct HeatLayout {
    cell: i32,
    left: i32,
    top: i32,
    rotate: bool,
    bottom: i32,
    bar_x: i32,
    width: i32,
    height: i32,
}

impl Heatmap {
    fn vmax(&self) -> f64 {
        let m = self
            .values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, &v| a.max(v));
        if m > 0.0 { m } else { 1.0 }
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        let vmax = self.vmax();
        let ticks = nice_ticks(0.0, vmax, 5);
        let dec = tick_decimals(&ticks);
        ticks
            .into_iter()
            .map(|t| (t / vmax, format!("{t:.dec$}")))
            .collect()
    }

    fn layout(&self) -> HeatLayout {
        let g = self.keys.len().max(1) as i32;
        let cell = (640 / g).clamp(30, 110);
        let kw = self
            .keys
            .iter()
            .map(|k| text_width(k, HM_KEY_FONT))
            .max()
            .unwrap_or(0)
            .min(260);
        let rotate = kw > cell - 8;
        let axis = if self.axis_label.is_empty() { 0 } else { 28 };
        let left = 20 + axis + kw + 12;
        let top = 64;
        let bottom = if rotate { kw + 20 } else { 30 } + axis + 10;
        let bar_x = left + g * cell + 28;
        let title_w = text_width(&self.title, 20.0) + 40;
        let width = (bar_x + 20 + colorbar_extra(&self.ticks()) + 10).max(title_w);
        let height = top + g * cell + bottom;
        HeatLayout {
            cell,
            left,
            top,
            rotate,
            bottom,
            bar_x,
            width,
            height,
        }
    }
}

impl Plot for Heatmap {
    fn size(&self) -> (u32, u32) {
        let l = self.layout();
        (l.width as u32, l.height as u32)
    }

    fn check(&self) -> Result<(), PlotError> {
        let g = self.keys.len();
        if g == 0 {
            return Err(PlotError::Data("no groups".into()));
        }
        if self.values.len() != g * g {
            return Err(PlotError::Data(format!(
                "{} values for {g} keys, expected {}",
                self.values.len(),
                g * g
            )));
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let l = self.layout();
        title(root, &self.title, l.width)?;
        let g = self.keys.len();
        let vmax = self.vmax();
        let dec = (2 - vmax.log10().floor() as i32).clamp(0, 6) as usize;
        let kmax = l.left - 32 - if self.axis_label.is_empty() { 0 } else { 28 };
        for r in 0..g {
            for c in 0..g {
                let v = self.values[r * g + c];
                let (x0, y0) = (l.left + c as i32 * l.cell, l.top + r as i32 * l.cell);
                let color = if v.is_finite() {
                    viridis(v / vmax)
                } else {
                    MISSING
                };
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + l.cell, y0 + l.cell)],
                    color.filled(),
                ))?;
                // The value, as large as fits; 3 significant digits of the largest value.
                let s = if v == 0.0 {
                    "0".to_string()
                } else if v.is_finite() {
                    format!("{v:.dec$}")
                } else {
                    "n/a".to_string()
                };
                let mut size = (l.cell as f64 / 4.2).clamp(9.0, 16.0);
                while size > 8.0 && text_width(&s, size) > l.cell - 6 {
                    size -= 1.0;
                }
                if text_width(&s, size) <= l.cell - 4 {
                    text(
                        root,
                        &s,
                        (x0 + l.cell / 2, y0 + l.cell / 2),
                        size,
                        ink_on(color),
                        HPos::Center,
                        VPos::Center,
                    )?;
                }
            }
        }
        let side = g as i32 * l.cell;
        root.draw(&Rectangle::new(
            [(l.left, l.top), (l.left + side, l.top + side)],
            FRAME,
        ))?;
        for (i, key) in self.keys.iter().enumerate() {
            let key = fit(key, HM_KEY_FONT, kmax.max(40));
            let mid = i as i32 * l.cell + l.cell / 2;
            text(
                root,
                &key,
                (l.left - 8, l.top + mid),
                HM_KEY_FONT,
                INK,
                HPos::Right,
                VPos::Center,
            )?;
            if l.rotate {
                vertical_text(
                    root,
                    &key,
                    (l.left + mid, l.top + side + 8),
                    HM_KEY_FONT,
                    INK,
                    HPos::Right,
                )?;
            } else {
                text(
                    root,
                    &key,
                    (l.left + mid, l.top + side + 8),
                    HM_KEY_FONT,
                    INK,
                    HPos::Center,
                    VPos::Top,
                )?;
            }
        }
        if !self.axis_label.is_empty() {
            text(
                root,
                &self.axis_label,
                (l.left + side / 2, l.top + side + l.bottom - 22),
                15.0,
                INK,
                HPos::Center,
                VPos::Center,
            )?;
            vertical_text(
                root,
                &self.axis_label,
                (24, l.top + side / 2),
                15.0,
                INK,
                HPos::Center,
            )?;
        }
        colorbar(
            root,
            l.bar_x,
            l.top,
            l.top + side,
            20,
            &viridis,
            &self.ticks(),
            &self.value_label,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Boxplots

/// A metric per bin: one box (quartiles, median, min–max whiskers, the points) per bin.
#[derive(Debug, Clone, PartialEq)]
pub struct Boxplots {
    /// Figure title.
    pub title: String,
    /// Label under the bins.
    pub x_label: String,
    /// Label of the metric axis.
    pub y_label: String,
    /// Bin names, left to right.
    pub bins: Vec<String>,
    /// Values per bin (NaN values are skipped).
    pub values: Vec<Vec<f64>>,
}

const BOX_H: i32 = 600;
const BOX_FONT: f64 = 13.0;

/// min, q1, median, q3, max of the finite values, or `None` when there are none.
pub fn five_numbers(values: &[f64]) -> Option<[f64; 5]> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some([
        v[0],
        quantile(&v, 0.25),
        quantile(&v, 0.5),
        quantile(&v, 0.75),
        v[v.len() - 1],
    ])
}

impl Boxplots {
    fn width(&self) -> i32 {
        (120 + 84 * self.bins.len() as i32).clamp(720, 1600)
    }

    fn y_range(&self) -> (f64, f64) {
        let finite = self.values.iter().flatten().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let (mut a, b) = if hi - lo < 1e-12 {
            let span = if lo != 0.0 { lo.abs() * 0.5 } else { 1.0 };
            (lo - span, hi + span)
        } else {
            let pad = (hi - lo) * 0.08;
            (lo - pad, hi + pad * 1.8)
        };
        // Non-negative metrics (sparsity, entropy) keep their axis at zero.
        if lo >= 0.0 && a < 0.0 {
            a = -0.03 * b;
        }
        (a, b)
    }
}

impl Plot for Boxplots {
    fn size(&self) -> (u32, u32) {
        (self.width() as u32, BOX_H as u32)
    }

    fn check(&self) -> Result<(), PlotError> {
        if self.bins.is_empty() {
            return Err(PlotError::Data("no bins".into()));
        }
        if self.values.len() != self.bins.len() {
            return Err(PlotError::Data(format!(
                "{} value lists for {} bins",
                self.values.len(),
                self.bins.len()
            )));
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let w = self.width();
        title(root, &self.title, w)?;
        let nb = self.bins.len();
        let kw = self
            .bins
            .iter()
            .map(|b| text_width(b, BOX_FONT))
            .max()
            .unwrap_or(0)
            .min(200);
        let slot = (w - 130) / nb as i32;
        let rotate = kw > slot - 6;
        let x_area = if rotate { kw + 20 } else { 28 } + 34;
        let (ylo, yhi) = self.y_range();
        let body = root.margin(52, 10, 14, 24);
        let mut chart = ChartBuilder::on(&body)
            .x_label_area_size(x_area)
            .y_label_area_size(74)
            .build_cartesian_2d(-0.5..(nb as f64 - 0.5), ylo..yhi)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(0)
            .y_labels(0)
            .axis_style(FRAME)
            .draw()?;
        let yticks = nice_ticks(ylo, yhi, 8);
        let ydec = tick_decimals(&yticks);
        let xr = (-0.5, nb as f64 - 0.5);
        chart.draw_series(
            yticks
                .iter()
                .map(|&t| PathElement::new(vec![(xr.0, t), (xr.1, t)], RGBColor(230, 230, 230))),
        )?;
        for &t in &yticks {
            let (px, py) = chart.backend_coord(&(xr.0, t));
            root.draw(&PathElement::new(vec![(px - 4, py), (px, py)], FRAME))?;
            text(
                root,
                &format!("{t:.ydec$}"),
                (px - 7, py),
                BOX_FONT,
                INK,
                HPos::Right,
                VPos::Center,
            )?;
        }
        {
            let (px, py0) = chart.backend_coord(&(xr.0, ylo));
            let (_, py1) = chart.backend_coord(&(xr.0, yhi));
            vertical_text(
                root,
                &self.y_label,
                (px - 62, (py0 + py1) / 2),
                15.0,
                INK,
                HPos::Center,
            )?;
        }
        let box_fill = RGBColor(158, 202, 225);
        let box_line = RGBColor(33, 102, 172);
        let median = RGBColor(230, 85, 13);
        for (i, vals) in self.values.iter().enumerate() {
            let x = i as f64;
            if let Some([mn, q1, md, q3, mx]) = five_numbers(vals) {
                let line = box_line.stroke_width(1);
                chart.draw_series([
                    PathElement::new(vec![(x, mn), (x, q1)], line),
                    PathElement::new(vec![(x, q3), (x, mx)], line),
                    PathElement::new(vec![(x - 0.12, mn), (x + 0.12, mn)], line),
                    PathElement::new(vec![(x - 0.12, mx), (x + 0.12, mx)], line),
                ])?;
                chart.draw_series([
                    Rectangle::new([(x - 0.3, q1), (x + 0.3, q3)], box_fill.filled()),
                    Rectangle::new([(x - 0.3, q1), (x + 0.3, q3)], box_line.stroke_width(1)),
                ])?;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(x - 0.3, md), (x + 0.3, md)],
                    median.stroke_width(3),
                )))?;
                let pts = vals.iter().filter(|v| v.is_finite()).enumerate();
                chart.draw_series(pts.map(|(j, &v)| {
                    // Deterministic jitter so coincident points stay visible.
                    let jit = ((j as f64 * 0.618_034).fract() - 0.5) * 0.36;
                    Circle::new((x + jit, v), 3, INK.mix(0.55).filled())
                }))?;
                let n = vals.iter().filter(|v| v.is_finite()).count();
                let (px, py) = chart.backend_coord(&(x, mx));
                text(
                    root,
                    &format!("n={n}"),
                    (px, py - 6),
                    11.0,
                    MUTED,
                    HPos::Center,
                    VPos::Bottom,
                )?;
            }
            let (px, py) = chart.backend_coord(&(x, ylo));
            let label = fit(&self.bins[i], BOX_FONT, 200);
            if rotate {
                vertical_text(root, &label, (px, py + 8), BOX_FONT, INK, HPos::Right)?;
            } else {
                text(
                    root,
                    &label,
                    (px, py + 8),
                    BOX_FONT,
                    INK,
                    HPos::Center,
                    VPos::Top,
                )?;
            }
        }
        if !self.x_label.is_empty() {
            let (px0, py) = chart.backend_coord(&(-0.5, ylo));
            let (px1, _) = chart.backend_coord(&(nb as f64 - 0.5, ylo));
            text(
                root,
                &self.x_label,
                ((px0 + px1) / 2, py + x_area - 14),
                15.0,
                INK,
                HPos::Center,
                VPos::Center,
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// 2-D density

/// A square 2-D histogram drawn one pixel per bin on a logarithmic colour scale.
#[derive(Debug, Clone, PartialEq)]
pub struct DensityImage {
    /// Figure title.
    pub title: String,
    /// Bins per side.
    pub side: usize,
    /// side² values, row-major; row = x bin (left to right), column = y bin (bottom to top).
    pub density: Vec<f32>,
    /// Value range of both axes.
    pub extent: (f64, f64),
    /// Horizontal axis label.
    pub x_label: String,
    /// Vertical axis label.
    pub y_label: String,
    /// Lowest value shown; smaller values (and zeros) get the colour of `vmin`.
    pub vmin: f64,
    /// Largest value of the scale (values are usually normalised to max 1).
    pub vmax: f64,
}

const DI_LEFT: i32 = 84;
const DI_TOP: i32 = 60;
const DI_BOTTOM: i32 = 66;

impl DensityImage {
    fn log_range(&self) -> (f64, f64) {
        let lo = self.vmin.max(f64::MIN_POSITIVE).log10();
        let hi = self.vmax.max(self.vmin * 10.0).log10();
        (lo, hi)
    }

    fn t(&self, v: f64) -> f64 {
        let (lo, hi) = self.log_range();
        if v.is_nan() || v <= 0.0 {
            return 0.0;
        }
        ((v.log10() - lo) / (hi - lo)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        let (lo, hi) = self.log_range();
        let mut out = Vec::new();
        let mut e = lo.ceil() as i32;
        while e as f64 <= hi + 1e-9 {
            out.push(((e as f64 - lo) / (hi - lo), pow10_label(e)));
            e += 1;
        }
        out
    }
}

/// `10⁻⁵` style labels.
fn pow10_label(e: i32) -> String {
    const SUP: [char; 10] = ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'];
    let mut s = String::from("10");
    if e < 0 {
        s.push('⁻');
    }
    for d in e.unsigned_abs().to_string().chars() {
        s.push(SUP[d.to_digit(10).unwrap_or(0) as usize]);
    }
    s
}

impl Plot for DensityImage {
    fn size(&self) -> (u32, u32) {
        let side = self.side as i32;
        let w = DI_LEFT + side + 30 + 20 + colorbar_extra(&self.ticks()) + 10;
        let w = w.max(text_width(&self.title, 20.0) + 40);
        (w as u32, (DI_TOP + side + DI_BOTTOM) as u32)
    }

    fn check(&self) -> Result<(), PlotError> {
        if self.side == 0 || self.density.len() != self.side * self.side {
            return Err(PlotError::Data(format!(
                "{} density values for a {s}×{s} image",
                self.density.len(),
                s = self.side
            )));
        }
        if self.vmin.is_nan() || self.vmin <= 0.0 {
            return Err(PlotError::Data("vmin must be positive".into()));
        }
        let (lo, hi) = self.extent;
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(PlotError::Data(format!("invalid extent [{lo}, {hi}]")));
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (w, _) = self.size();
        title(root, &self.title, w as i32)?;
        let side = self.side as i32;
        let (x0, y0) = (DI_LEFT, DI_TOP);
        let background = magma(0.0);
        root.draw(&Rectangle::new(
            [(x0, y0), (x0 + side, y0 + side)],
            background.filled(),
        ))?;
        // Runs of equal colour along each column, so SVG output stays small.
        let level = |v: f32| -> u8 { (self.t(v as f64) * 255.0).round() as u8 };
        for xi in 0..self.side {
            let column = &self.density[xi * self.side..(xi + 1) * self.side];
            let mut start = 0usize;
            while start < self.side {
                let lv = level(column[start]);
                let mut end = start + 1;
                while end < self.side && level(column[end]) == lv {
                    end += 1;
                }
                if lv > 0 {
                    let color = magma(lv as f64 / 255.0);
                    // Column index j grows upwards.
                    let top = y0 + side - end as i32;
                    let bottom = y0 + side - start as i32;
                    let x = x0 + xi as i32;
                    root.draw(&Rectangle::new([(x, top), (x + 1, bottom)], color.filled()))?;
                }
                start = end;
            }
        }
        root.draw(&Rectangle::new([(x0, y0), (x0 + side, y0 + side)], FRAME))?;
        // Axes.
        let (lo, hi) = self.extent;
        let ticks = nice_ticks(lo, hi, 6);
        let dec = tick_decimals(&ticks);
        let to_px = |v: f64| ((v - lo) / (hi - lo) * side as f64).round() as i32;
        for t in &ticks {
            let label = format!("{t:.dec$}");
            let px = x0 + to_px(*t);
            root.draw(&PathElement::new(
                vec![(px, y0 + side), (px, y0 + side + 5)],
                FRAME,
            ))?;
            text(
                root,
                &label,
                (px, y0 + side + 8),
                13.0,
                INK,
                HPos::Center,
                VPos::Top,
            )?;
            let py = y0 + side - to_px(*t);
            root.draw(&PathElement::new(vec![(x0 - 5, py), (x0, py)], FRAME))?;
            text(
                root,
                &label,
                (x0 - 8, py),
                13.0,
                INK,
                HPos::Right,
                VPos::Center,
            )?;
        }
        text(
            root,
            &self.x_label,
            (x0 + side / 2, y0 + side + 44),
            15.0,
            INK,
            HPos::Center,
            VPos::Center,
        )?;
        vertical_text(
            root,
            &self.y_label,
            (22, y0 + side / 2),
            15.0,
            INK,
            HPos::Center,
        )?;
        colorbar(
            root,
            x0 + side + 30,
            y0,
            y0 + side,
            20,
            &magma,
            &self.ticks(),
            "density / max (log scale)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("filterdb-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 33, "PNG too short");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    fn distinct_colors(rgb: &[u8]) -> usize {
        let mut set = std::collections::HashSet::new();
        for p in rgb.chunks_exact(3) {
            set.insert((p[0], p[1], p[2]));
            if set.len() > 1000 {
                break;
            }
        }
        set.len()
    }

    fn pixel(rgb: &[u8], w: u32, x: i32, y: i32) -> (u8, u8, u8) {
        let i = (y as usize * w as usize + x as usize) * 3;
        (rgb[i], rgb[i + 1], rgb[i + 2])
    }

    /// Renders to a temporary PNG and to memory; checks the file and returns the pixels.
    fn check_png<P: Plot>(plot: &P, name: &str) -> (Vec<u8>, u32, u32) {
        let path = temp_path(name);
        render(plot, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), plot.size(), "{name}: PNG dimensions");
        // FILTERDB_PLOT_KEEP=DIR keeps the test renders for a look.
        if let Some(dir) = std::env::var_os("FILTERDB_PLOT_KEEP") {
            std::fs::copy(&path, Path::new(&dir).join(name)).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
        let (rgb, w, h) = render_rgb(plot).unwrap();
        assert_eq!((w, h), plot.size());
        let n = distinct_colors(&rgb);
        assert!(n > 20, "{name}: only {n} colours, the plot looks empty");
        let svg = render_svg(plot).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.contains("<svg"),
            "{name}: no SVG"
        );
        (rgb, w, h)
    }

    fn basis_row(label: &str) -> EigenfilterRow {
        let mut components = vec![0.0; 81];
        for k in 0..9 {
            components[9 * k + k] = 1.0;
            components[9 * k + (k + 4) % 9] = -0.5;
        }
        EigenfilterRow {
            label: label.into(),
            n: 1234,
            components,
            evr: vec![0.4, 0.2, 0.1, 0.08, 0.07, 0.06, 0.04, 0.03, 0.02],
        }
    }

    #[test]
    fn font_loads_and_measures() {
        ensure_font().unwrap();
        let a = text_width("a", 20.0);
        let long = text_width("a much longer label", 20.0);
        assert!(a > 3 && long > 10 * a, "{a} {long}");
        assert!(text_width("x", 40.0) > text_width("x", 10.0));
        assert!(fit("abcdefghijklmnopqrstuvwxyz", 14.0, 60).ends_with('…'));
        assert_eq!(fit("ab", 14.0, 200), "ab");
    }

    #[test]
    fn eigenfilters_png() {
        let plot = Eigenfilters {
            title: "Eigenfilters".into(),
            rows: vec![basis_row("Classification"), basis_row("GAN-Generator")],
        };
        let (rgb, w, _) = check_png(&plot, "eigen.png");
        // The centre of tile c0's top-left cell holds +1: the darkest red.
        let left = plot.label_width();
        let (x, y) = (left + EF_CELL / 2, EF_TOP + EF_TILE_TITLE + EF_CELL / 2);
        let (r, _, b) = pixel(&rgb, w, x, y);
        assert!(r > 90 && b < 60, "({r}, {b})");
        // Its bottom-right cell holds 0: near-white.
        let (r, g, b) = pixel(&rgb, w, x + 2 * EF_CELL, y + 2 * EF_CELL);
        assert!(r > 230 && g > 230 && b > 230, "({r}, {g}, {b})");
    }

    #[test]
    fn ridges_png() {
        let groups = (0..3)
            .map(|g| RidgeGroup {
                key: format!("group {g}"),
                n_filters: 1000,
                counts: (0..9)
                    .map(|k| {
                        (0..70)
                            .map(|b| {
                                let x = (b as f64 - 35.0 - g as f64 * 5.0) / (3.0 + k as f64);
                                (1000.0 * (-x * x / 2.0).exp()) as u64
                            })
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        let plot = Ridges {
            title: "Coefficient distributions".into(),
            range: (-1.5, 1.5),
            panel_titles: (0..9).map(|k| format!("c{k}")).collect(),
            x_label: "coefficient".into(),
            groups,
        };
        check_png(&plot, "ridges.png");
    }

    #[test]
    fn heatmap_png() {
        let keys: Vec<String> = ["Classification", "GAN-Generator", "Segmentation"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let values = vec![0.0, 0.5, 1.0, 0.5, 0.0, 0.25, 1.0, 0.25, 0.0];
        let plot = Heatmap {
            title: "Drift".into(),
            keys,
            values,
            value_label: "D".into(),
            axis_label: "task".into(),
        };
        let (rgb, w, _) = check_png(&plot, "heat.png");
        // Cell (0, 2) holds the maximum: yellow near its corner (away from the value text).
        let l = plot.layout();
        let (x, y) = (l.left + 2 * l.cell + 3, l.top + 3);
        let (r, g, b) = pixel(&rgb, w, x, y);
        assert!(r > 200 && g > 200 && b < 100, "({r}, {g}, {b})");
        // Cell (0, 0) holds 0: dark purple.
        let (r, g, b) = pixel(&rgb, w, l.left + 3, l.top + 3);
        assert_eq!((r, g, b), (68, 1, 84));

        // Many long keys: rotated column labels, small cells, values that no longer fit.
        let g = 14;
        let plot = Heatmap {
            title: "Drift between many groups".into(),
            keys: (0..g)
                .map(|i| format!("a rather long group key {i}"))
                .collect(),
            values: (0..g * g)
                .map(|i| ((i / g) as f64 - (i % g) as f64).abs() * 0.123)
                .collect(),
            value_label: "D".into(),
            axis_label: "group".into(),
        };
        assert!(plot.layout().rotate);
        check_png(&plot, "heat-many.png");
    }

    #[test]
    fn boxplots_png() {
        let bins: Vec<String> = (0..10)
            .map(|i| format!("({:.1}, {:.1}]", i as f64 / 10.0, (i + 1) as f64 / 10.0))
            .collect();
        let values = (0..10)
            .map(|i| {
                if i == 3 {
                    vec![]
                } else {
                    (0..7).map(|j| (i * j) as f64 / 70.0).collect()
                }
            })
            .collect();
        let plot = Boxplots {
            title: "Sparsity by depth".into(),
            x_label: "depth decile".into(),
            y_label: "sparsity".into(),
            bins,
            values,
        };
        check_png(&plot, "box.png");
    }

    #[test]
    fn density_png_and_small_svg() {
        let side = 128;
        let mut density = vec![0f32; side * side];
        for i in 0..side {
            for j in 0..side {
                let (x, y) = (i as f32 - 64.0, j as f32 - 40.0);
                density[i * side + j] = (-(x * x + y * y) / 200.0).exp();
            }
        }
        let plot = DensityImage {
            title: "Density".into(),
            side,
            density,
            extent: (-3.3, 3.3),
            x_label: "c0".into(),
            y_label: "c1".into(),
            vmin: 1e-5,
            vmax: 1.0,
        };
        let (rgb, w, _) = check_png(&plot, "density.png");
        // The peak (i = 64, j = 40) is the brightest colour; the corner is the background.
        let peak = pixel(&rgb, w, DI_LEFT + 64, DI_TOP + side as i32 - 1 - 40);
        assert_eq!(peak, (252, 253, 191));
        let corner = pixel(&rgb, w, DI_LEFT + 1, DI_TOP + 1);
        assert_eq!(corner, (0, 0, 4));
        let svg = render_svg(&plot).unwrap();
        assert!(svg.len() < 3_000_000, "SVG of {} bytes", svg.len());
    }

    #[test]
    fn bad_inputs() {
        let plot = Heatmap {
            title: "x".into(),
            keys: vec!["a".into()],
            values: vec![],
            value_label: String::new(),
            axis_label: String::new(),
        };
        assert!(matches!(render_rgb(&plot), Err(PlotError::Data(_))));
        let plot = Heatmap {
            values: vec![1.0],
            ..plot
        };
        let e = render(&plot, &temp_path("out.jpg")).unwrap_err();
        assert!(matches!(e, PlotError::Format(_)), "{e}");
        assert!(e.to_string().contains(".png or .svg"), "{e}");
        assert_eq!(
            image_format(Path::new("a/B.PNG")).unwrap(),
            ImageFormat::Png
        );
        assert_eq!(image_format(Path::new("b.svg")).unwrap(), ImageFormat::Svg);
        assert!(image_format(Path::new("noext")).is_err());
        let e = render(&plot, Path::new("/nonexistent-dir-filterdb/x.png")).unwrap_err();
        assert!(matches!(e, PlotError::Draw { .. }), "{e}");
        assert!(
            Eigenfilters {
                title: String::new(),
                rows: vec![]
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn boxplot_ranges() {
        let plot = |values: Vec<Vec<f64>>| Boxplots {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            bins: vec!["a".into(); values.len()],
            values,
        };
        let (lo, hi) = plot(vec![vec![0.0, 0.0], vec![0.0]]).y_range();
        assert!(lo < 0.0 && lo > -0.1 && hi == 1.0, "{lo} {hi}");
        let (lo, hi) = plot(vec![vec![-1.0, 1.0]]).y_range();
        assert!(lo < -1.0 && hi > 1.0);
        let (lo, hi) = plot(vec![vec![f64::NAN]]).y_range();
        assert_eq!((lo, hi), (0.0, 1.0));
    }

    #[test]
    fn helpers() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(f64::NAN), RGBColor(68, 1, 84));
        assert_eq!(diverging(0.5), RGBColor(247, 247, 247));
        assert_eq!(magma(2.0), RGBColor(252, 253, 191));
        assert_eq!(fmt_sig(0.123456, 3), "0.123");
        assert_eq!(fmt_sig(12.3456, 3), "12.3");
        assert_eq!(fmt_sig(0.0, 3), "0");
        assert_eq!(fmt_sig(1.5e-6, 2), "1.5e-6");
        assert_eq!(fmt_sig(f64::NAN, 3), "n/a");
        assert_eq!(
            nice_ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(
            nice_ticks(-3.3, 3.3, 6),
            vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(pow10_label(-5), "10⁻⁵");
        assert_eq!(pow10_label(0), "10⁰");
        assert_eq!(
            five_numbers(&[3.0, 1.0, f64::NAN, 2.0, 4.0]),
            Some([1.0, 1.75, 2.5, 3.25, 4.0])
        );
        assert_eq!(five_numbers(&[f64::NAN]), None);
        assert_eq!(quantile(&[1.0], 0.5), 1.0);
    }
}
