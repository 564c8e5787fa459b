//! The Analytics commands: basis, pin-basis, compare-bases, distributions, drift, quality,
//! degenerate, depth-profile, density; with `--plot` they also draw figures (see
//! `filterdb_client::plot`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use filterdb_client::json::{
    SUMMARY_NAMES, basis_response_to_json, compare_bases_to_json, degeneration_ranking_to_json,
    density_2d_to_json, depth_profile_to_json, distributions_to_json, drift_matrix_to_json,
    layer_quality_to_json, pinned_basis_to_json,
};
use filterdb_client::plot::{self, Plot};
use filterdb_client::proto::expr::field_name;
use filterdb_client::proto::{
    BasisRequest, CompareBasesRequest, DegenerationRankingRequest, Density2DRequest,
    DepthProfileRequest, DistributionsRequest, DriftMatrixRequest, DriftWeights, Field,
    FilterBasis, GetPinnedBasisRequest, GroupSpec, LayerQualityRequest,
    PinBasisProgress, PinBasisRequest, PinnedBasis, QualityMetric, QualityOptions, Selection,
    model_ref as mref,
};
use filterdb_client::quality::QualityLayer;
use filterdb_client::{ClientError, model_ref, selection};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::render::table;
use super::{Ctx, parse_field};

/// The range `Density2D` histograms cover on both axes.
pub const DENSITY_EXTENT: (f64, f64) = (-3.3, 3.3);
/// Lowest density the log colour scale shows.
pub const DENSITY_VMIN: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Arguments

/// Arguments of `basis`.
#[derive(Debug, Args)]
pub struct BasisArgs {
    /// Only filters of layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Also one basis per value of this field, e.g. task, architecture, depth_decile.
    #[arg(long = "group-by", value_name = "FIELD", value_parser = parse_field)]
    pub group_by: Option<Field>,
    /// Use raw filters instead of L∞-scaled ones.
    #[arg(long)]
    pub raw: bool,
    /// Draw the 9 eigenfilters (one row per group when grouped) into OUT.png or OUT.svg.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    pub plot: Option<PathBuf>,
}

/// Arguments of `pin-basis`.
#[derive(Debug, Args)]
pub struct PinBasisArgs {
    /// Fit the basis on filters of layers matching this expression (default: all filters).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Histogram bins per component.
    #[arg(long, value_name = "N", default_value_t = 70, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub bins: u32,
}

/// Arguments of `compare-bases`.
#[derive(Debug, Args)]
pub struct CompareBasesArgs {
    /// The first selection ("" selects all filters).
    #[arg(long = "a", value_name = "EXPR")]
    pub a: String,
    /// The second selection ("" selects all filters).
    #[arg(long = "b", value_name = "EXPR")]
    pub b: String,
    /// Use raw instead of L∞-scaled filters.
    #[arg(long)]
    pub raw: bool,
}

/// Arguments of `distributions`.
#[derive(Debug, Args)]
pub struct DistributionsArgs {
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// One distribution per value of this field.
    #[arg(long = "group-by", value_name = "FIELD", value_parser = parse_field)]
    pub group_by: Option<Field>,
    /// Draw ridge plots (9 panels, one ridge per group) into OUT.png or OUT.svg.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub histogram: HistogramFlags,
}

/// Histogram binning other than the pinned one (computed on demand by a scan of the selection).
#[derive(Debug, Clone, Default, Args)]
pub struct HistogramFlags {
    /// Bins per component instead of the pinned count, e.g. 341 as the v0.1.0 notebook.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub bins: Option<u32>,
    /// Coefficient range instead of the pinned one, e.g. --range=-3.3,3.3.
    #[arg(long, value_name = "MIN,MAX", value_parser = parse_range, allow_hyphen_values = true)]
    pub range: Option<(f64, f64)>,
}

impl HistogramFlags {
    fn bins(&self) -> u32 {
        self.bins.unwrap_or(0)
    }
    fn range_min(&self) -> Option<f64> {
        self.range.map(|r| r.0)
    }
    fn range_max(&self) -> Option<f64> {
        self.range.map(|r| r.1)
    }
}

/// Parses `MIN,MAX` (or `MIN:MAX`) with MIN < MAX.
fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("`{s}` is not MIN,MAX"))?;
    let num = |t: &str| {
        t.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("`{t}` is not a number"))
    };
    let (lo, hi) = (num(a)?, num(b)?);
    if lo >= hi {
        return Err(format!(
            "the range {lo},{hi} is empty (MIN must be below MAX)"
        ));
    }
    Ok((lo, hi))
}

/// Component weights of the drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// The explained-variance ratios of the pinned basis (CVPR 2022).
    Evr,
    /// 1/9 each (MedNeurIPS'22).
    Uniform,
}

/// Arguments of `drift`.
#[derive(Debug, Args)]
pub struct DriftArgs {
    /// The groups to compare: each value of this field, e.g. task, dataset, depth_decile.
    #[arg(long = "group-by", value_name = "FIELD", value_parser = parse_field)]
    pub group_by: Field,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// How the 9 per-component divergences are weighted.
    #[arg(long, value_enum, default_value_t = WeightsArg::Evr)]
    pub weights: WeightsArg,
    /// Order rows and columns by ascending column mean, as the paper displays them.
    #[arg(long)]
    pub sort: bool,
    /// Draw the matrix as a heatmap into OUT.png or OUT.svg.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub histogram: HistogramFlags,
}

/// Options of the quality metrics, shared by quality, degenerate and depth-profile.
#[derive(Debug, Clone, Args)]
pub struct QualityFlags {
    /// Sparsity threshold ε relative to the layer's max |w| (precomputed: 0.001, 0.005, 0.01,
    /// 0.02, 0.05, 0.1).
    #[arg(long, value_name = "EPS", default_value_t = 0.01)]
    pub eps: f64,
    /// Non-strict sparsity (‖f‖∞ ≤ t, robustness paper) instead of strict (all |f_j| < t).
    #[arg(long)]
    pub non_strict: bool,
    /// Entropy of L∞-scaled filters (robustness paper) instead of raw ones.
    #[arg(long)]
    pub scaled: bool,
}

impl QualityFlags {
    fn options(&self) -> anyhow::Result<QualityOptions> {
        if !(self.eps > 0.0 && self.eps < 1.0) {
            bail!(
                "--eps must be between 0 and 1 (exclusive), got {}",
                self.eps
            );
        }
        Ok(QualityOptions {
            eps: self.eps,
            non_strict: self.non_strict,
            scaled: self.scaled,
            thresholds: None,
        })
    }

    fn describe(&self) -> String {
        format!(
            "ε = {}, {} sparsity, entropy of {} filters",
            self.eps,
            if self.non_strict {
                "non-strict"
            } else {
                "strict"
            },
            if self.scaled { "L∞-scaled" } else { "raw" }
        )
    }
}

/// Arguments of `quality`.
#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Model id or name (its layers); combine with --where to restrict further.
    #[arg(value_name = "MODEL", required_unless_present = "where_")]
    pub model: Option<String>,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    #[command(flatten)]
    pub quality: QualityFlags,
    /// At most N layers.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

/// Arguments of `degenerate`.
#[derive(Debug, Args)]
pub struct DegenerateArgs {
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Rank by the number of degenerate layers instead of their share.
    #[arg(long)]
    pub by_count: bool,
    /// At most N models.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub quality: QualityFlags,
}

/// The metric of a depth profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    /// Share of sparse filters S.
    Sparsity,
    /// Variance entropy H (log10).
    Entropy,
    /// H / TH(n), the entropy relative to its maximum.
    EntropyNorm,
    /// Orthogonality O.
    Orthogonality,
}

impl MetricArg {
    fn to_proto(self) -> QualityMetric {
        match self {
            MetricArg::Sparsity => QualityMetric::Sparsity,
            MetricArg::Entropy => QualityMetric::Entropy,
            MetricArg::EntropyNorm => QualityMetric::EntropyNorm,
            MetricArg::Orthogonality => QualityMetric::Orthogonality,
        }
    }

    fn label(self) -> &'static str {
        match self {
            MetricArg::Sparsity => "sparsity S",
            MetricArg::Entropy => "variance entropy H",
            MetricArg::EntropyNorm => "normalised entropy H / TH",
            MetricArg::Orthogonality => "orthogonality O",
        }
    }
}

/// How layers are binned by depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BinningArg {
    /// conv_depth_norm deciles "[0.0, 0.1]" … "(0.9, 1.0]" (CNN Filter DB notebook).
    #[value(name = "depth_decile", alias = "depth-decile")]
    DepthDecile,
    /// "first" (conv_depth 0), then right-closed deciles (robustness paper).
    #[value(name = "depth_decile_first", alias = "depth-decile-first")]
    DepthDecileFirst,
}

impl BinningArg {
    fn field(self) -> Field {
        match self {
            BinningArg::DepthDecile => Field::DepthDecile,
            BinningArg::DepthDecileFirst => Field::DepthDecileFirst,
        }
    }
}

/// Arguments of `depth-profile`.
#[derive(Debug, Args)]
pub struct DepthProfileArgs {
    /// The metric per model and depth bin.
    #[arg(long, value_enum, default_value_t = MetricArg::Sparsity)]
    pub metric: MetricArg,
    /// Depth bins.
    #[arg(long, value_enum, default_value_t = BinningArg::DepthDecile)]
    pub binning: BinningArg,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Draw one boxplot per bin across models into OUT.png or OUT.svg.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub quality: QualityFlags,
}

/// Arguments of `density`.
#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Component on the horizontal axis (0-based).
    #[arg(long = "i", value_name = "I", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..9))]
    pub i: u32,
    /// Component on the vertical axis (0-based).
    #[arg(long = "j", value_name = "J", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..9))]
    pub j: u32,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Draw the 512x512 density (log colour scale) into OUT.png or OUT.svg; required unless
    /// --json prints the values.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    pub plot: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Writes to stdout, returning broken pipes as errors instead of panicking like `print!`.
fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn emit_json(v: &Value) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(emit(&s)?)
}

/// A unary answer with gRPC errors as [`ClientError`] (rendered `CODE: message`).
fn answer<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, ClientError> {
    r.map(tonic::Response::into_inner)
        .map_err(ClientError::from)
}

fn group_spec(field: Option<Field>) -> Option<GroupSpec> {
    field.map(|f| GroupSpec {
        field: f as i32,
        selections: vec![],
    })
}

/// Fails before any server call when the plot file name has no supported extension.
fn check_plot_path(p: Option<&Path>) -> anyhow::Result<()> {
    if let Some(p) = p {
        plot::image_format(p)?;
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            bail!(
                "cannot plot to `{}`: the folder `{}` does not exist",
                p.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Renders and returns the line reporting it.
fn write_plot<P: Plot>(p: &P, path: &Path) -> anyhow::Result<String> {
    plot::render(p, path)?;
    let (w, h) = p.size();
    Ok(format!("wrote {} ({w}×{h})\n", path.display()))
}

/// What a selection covers, for titles and headers.
fn what(where_: Option<&str>) -> String {
    match where_.map(str::trim) {
        None | Some("") => "all filters".to_string(),
        Some(w) => w.to_string(),
    }
}

/// A number with fixed decimals, `–` when undefined.
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "–".into()
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.2}", v * 100.0)
    } else {
        "–".into()
    }
}

/// A 3x3 kernel in three lines of signed values.
fn kernel_lines(k: &[f64]) -> String {
    k.chunks(3)
        .map(|row| {
            row.iter()
                .map(|v| format!("{v:+.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pinned(p: &PinnedBasis) -> String {
    let n = p.basis.as_ref().map(|b| b.n).unwrap_or(0);
    format!(
        "reference basis version {} (fitted on {} of {n} filters, range [{:.4}, {:.4}], {} bins)",
        p.version,
        if p.selection_expr.is_empty() {
            "all".to_string()
        } else {
            format!("`{}`", p.selection_expr)
        },
        p.range_min,
        p.range_max,
        p.bins
    )
}

// ---------------------------------------------------------------------------------------------
// basis

fn basis_text(b: &FilterBasis, head: &str) -> String {
    let mut out = format!("{head}: n = {} filters\nmean filter:\n", b.n);
    for line in kernel_lines(&b.mean).lines() {
        let _ = writeln!(out, "  {line}");
    }
    let mut t = table(
        &[
            "component",
            "eigenvalue",
            "EVR %",
            "cumulative %",
            "eigenfilter",
        ],
        &[1, 2, 3],
    );
    for k in 0..b.evr.len().min(9) {
        let comp = b.components.get(9 * k..9 * k + 9).unwrap_or(&[]);
        t.add_row(vec![
            format!("c{k}"),
            plot::fmt_sig(b.eigenvalues.get(k).copied().unwrap_or(f64::NAN), 4),
            pct(b.evr[k]),
            pct(b.cumulative_evr.get(k).copied().unwrap_or(f64::NAN)),
            kernel_lines(comp),
        ]);
    }
    let _ = writeln!(out, "{t}");
    out
}

/// `filterdb basis`.
pub async fn basis(ctx: &Ctx, a: BasisArgs) -> anyhow::Result<()> {
    check_plot_path(a.plot.as_deref())?;
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .basis(BasisRequest {
                selection: sel,
                group: group_spec(a.group_by),
                raw: a.raw,
            })
            .await,
    )?;
    let mut r = r;
    let keys: Vec<&str> = r.groups.iter().map(|g| g.key.as_str()).collect();
    if let Some(order) = group_order(a.group_by, &keys) {
        r.groups = order.iter().map(|&i| r.groups[i].clone()).collect();
    }
    let Some(overall) = r.basis.as_ref() else {
        bail!(
            "the selection ({}) holds fewer than 2 filters: no basis",
            what(a.where_.as_deref())
        );
    };
    let kind = if a.raw { "raw" } else { "L∞-scaled" };
    let mut plot_line = String::new();
    if let Some(path) = &a.plot {
        let rows: Vec<plot::EigenfilterRow> = if a.group_by.is_some() {
            r.groups
                .iter()
                .filter_map(|g| g.basis.as_ref().map(|b| (g.key.clone(), b)))
                .map(|(key, b)| eigen_row(group_label(a.group_by, key), b))
                .collect()
        } else {
            vec![eigen_row(what(a.where_.as_deref()), overall)]
        };
        let title = match a.group_by {
            Some(f) => format!(
                "Eigenfilters of {kind} filters by {} ({})",
                field_name(f),
                what(a.where_.as_deref())
            ),
            None => format!(
                "Eigenfilters of {} {kind} filters ({})",
                overall.n,
                what(a.where_.as_deref())
            ),
        };
        plot_line = write_plot(&plot::Eigenfilters { title, rows }, path)?;
    }
    if ctx.json {
        let mut v = basis_response_to_json(&r);
        v["raw"] = json!(a.raw);
        v["group_by"] = json!(a.group_by.map(field_name));
        if let Some(p) = &a.plot {
            v["plot"] = json!(p.display().to_string());
        }
        return emit_json(&v);
    }
    let mut out = basis_text(
        overall,
        &format!(
            "PCA basis of {kind} filters ({})",
            what(a.where_.as_deref())
        ),
    );
    if let Some(f) = a.group_by {
        let mut headers = vec![field_name(f).to_string(), "n".to_string()];
        headers.extend((0..9).map(|k| format!("c{k} %")));
        let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let mut t = table(&header_refs, &(1..11).collect::<Vec<_>>());
        for g in &r.groups {
            let mut row = vec![g.key.clone()];
            match &g.basis {
                Some(b) => {
                    row.push(b.n.to_string());
                    row.extend(b.evr.iter().map(|e| pct(*e)));
                }
                None => row.push("< 2 filters".into()),
            }
            t.add_row(row);
        }
        let _ = writeln!(
            out,
            "\nexplained variance per {} group (EVR % per component)\n{t}",
            field_name(f)
        );
    }
    out.push_str(&plot_line);
    Ok(emit(&out)?)
}

/// A group key as a row label: numbers and intervals get the field name in front ("layer_index
/// = 3", "depth_decile (0.1, 0.2]"); words ("Classification") speak for themselves.
fn group_label(field: Option<Field>, key: String) -> String {
    match (field, key.chars().next()) {
        (Some(f), Some(c)) if c.is_ascii_digit() || c == '-' => {
            format!("{} = {key}", field_name(f))
        }
        (Some(f), Some('(' | '[')) => format!("{} {key}", field_name(f)),
        _ => key,
    }
}

fn eigen_row(label: String, b: &FilterBasis) -> plot::EigenfilterRow {
    plot::EigenfilterRow {
        label,
        n: b.n,
        components: b.components.clone(),
        evr: b.evr.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// pin-basis

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A progress bar following the phases of a pin: spinners for fit and range, a bar over layers
/// for the histograms.
struct PinBar {
    bar: ProgressBar,
    phase: String,
}

impl PinBar {
    fn new() -> PinBar {
        let bar = ProgressBar::new_spinner();
        bar.set_style(bar_style("{spinner} pin-basis: starting {elapsed}"));
        bar.enable_steady_tick(Duration::from_millis(120));
        PinBar {
            bar,
            phase: String::new(),
        }
    }

    fn update(&mut self, p: &PinBasisProgress) {
        if p.phase != self.phase {
            self.phase = p.phase.clone();
            let template = match p.phase.as_str() {
                "fit" => format!(
                    "{{spinner}} version {}: fitting the basis {{elapsed}}",
                    p.version
                ),
                "range" => format!(
                    "{{spinner}} version {}: coefficient range [{{wide_bar:.cyan/blue}}] {{pos}}/{{len}} layers",
                    p.version
                ),
                "histograms" => format!(
                    "{{spinner}} version {}: histograms [{{wide_bar:.cyan/blue}}] {{pos}}/{{len}} layers {{eta}}",
                    p.version
                ),
                _ => format!("{{spinner}} version {}: {} {{elapsed}}", p.version, p.phase),
            };
            self.bar.set_style(bar_style(&template));
            self.bar.set_position(0);
        }
        if p.layers_total > 0 {
            self.bar.set_length(p.layers_total);
            self.bar.set_position(p.layers_done);
        }
    }
}

/// `filterdb pin-basis`.
pub async fn pin_basis(ctx: &Ctx, a: PinBasisArgs) -> anyhow::Result<()> {
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let mut bar = PinBar::new();
    let r = c
        .pin_basis(
            PinBasisRequest {
                selection: sel,
                bins: a.bins,
            },
            |p| bar.update(p),
        )
        .await;
    bar.bar.finish_and_clear();
    let done = r?;
    let p = answer(
        c.analytics()
            .get_pinned_basis(GetPinnedBasisRequest {})
            .await,
    )?;
    if ctx.json {
        return emit_json(&json!({
            "version": done.version,
            "pinned": pinned_basis_to_json(&p),
        }));
    }
    let mut out = format!("pinned {}\n", pinned(&p));
    if p.version != done.version {
        let _ = writeln!(
            out,
            "note: version {} was built, but the server now serves version {} (another pin finished later)",
            done.version, p.version
        );
    }
    if let Some(b) = &p.basis {
        let evr: Vec<String> = b
            .evr
            .iter()
            .take(3)
            .map(|e| format!("{}%", pct(*e)))
            .collect();
        let cum = b.cumulative_evr.get(2).copied().unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "EVR of c0..c2: {} (together {}%)",
            evr.join(", "),
            pct(cum)
        );
    }
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// compare-bases

/// `filterdb compare-bases`.
pub async fn compare_bases(ctx: &Ctx, a: CompareBasesArgs) -> anyhow::Result<()> {
    let sa = selection(Some(&a.a))?;
    let sb = selection(Some(&a.b))?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .compare_bases(CompareBasesRequest {
                a: sa,
                b: sb,
                raw: a.raw,
            })
            .await,
    )?;
    if ctx.json {
        return emit_json(&compare_bases_to_json(&r));
    }
    let (ba, bb) = (
        r.a.clone().unwrap_or_default(),
        r.b.clone().unwrap_or_default(),
    );
    let mut out = format!(
        "a: {} ({} filters)\nb: {} ({} filters)\n\n|cos| between components (rows: a, columns: b)\n",
        what(Some(&a.a)),
        ba.n,
        what(Some(&a.b)),
        bb.n
    );
    let mut headers = vec![String::new()];
    headers.extend((0..9).map(|j| format!("b{j}")));
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = table(&header_refs, &(1..10).collect::<Vec<_>>());
    for i in 0..9 {
        let mut row = vec![format!("a{i}")];
        row.extend((0..9).map(|j| num(r.abs_cos.get(i * 9 + j).copied().unwrap_or(f64::NAN), 3)));
        t.add_row(row);
    }
    let _ = writeln!(out, "{t}\n\ngreedy matching and explained variance");
    let mut t = table(
        &[
            "a",
            "b",
            "|cos|",
            "EVR a %",
            "EVR b %",
            "EVR a − b (points)",
        ],
        &[2, 3, 4, 5],
    );
    for m in &r.matching {
        let ea = ba.evr.get(m.a as usize).copied().unwrap_or(f64::NAN);
        let eb = bb.evr.get(m.b as usize).copied().unwrap_or(f64::NAN);
        t.add_row(vec![
            format!("a{}", m.a),
            format!("b{}", m.b),
            num(m.abs_cos, 3),
            pct(ea),
            pct(eb),
            pct(ea - eb),
        ]);
    }
    let _ = writeln!(out, "{t}");
    let diffs: Vec<String> = r.evr_diff.iter().map(|d| pct(*d)).collect();
    let _ = writeln!(
        out,
        "EVR(a) − EVR(b) per component (points): {}",
        diffs.join(", ")
    );
    let angles: Vec<String> = r
        .principal_angles_deg
        .iter()
        .map(|d| format!("{d:.2}°"))
        .collect();
    let _ = writeln!(
        out,
        "principal angles between span(a0..a2) and span(b0..b2): {}",
        angles.join(", ")
    );
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// distributions

/// `filterdb distributions`.
pub async fn distributions(ctx: &Ctx, a: DistributionsArgs) -> anyhow::Result<()> {
    check_plot_path(a.plot.as_deref())?;
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .distributions(DistributionsRequest {
                selection: sel,
                group: group_spec(a.group_by),
                bins: a.histogram.bins(),
                range_min: a.histogram.range_min(),
                range_max: a.histogram.range_max(),
            })
            .await,
    )?;
    let mut r = r;
    let keys: Vec<&str> = r.groups.iter().map(|g| g.key.as_str()).collect();
    if let Some(order) = group_order(a.group_by, &keys) {
        r.groups = order.iter().map(|&i| r.groups[i].clone()).collect();
    }
    let mut plot_line = String::new();
    if let Some(path) = &a.plot {
        if r.groups.is_empty() {
            bail!(
                "no filters match ({}): nothing to plot",
                what(a.where_.as_deref())
            );
        }
        // Panel titles carry the pinned basis' EVR when it is still the version answered.
        let evr = match answer(
            c.analytics()
                .get_pinned_basis(GetPinnedBasisRequest {})
                .await,
        ) {
            Ok(p) if p.version == r.basis_version => p.basis.map(|b| b.evr).unwrap_or_default(),
            _ => vec![],
        };
        let panel_titles = (0..9)
            .map(|k| match evr.get(k) {
                Some(e) => format!("c{k}  (EVR {:.1}%)", e * 100.0),
                None => format!("c{k}"),
            })
            .collect();
        let groups = r
            .groups
            .iter()
            .map(|g| plot::RidgeGroup {
                key: group_label(a.group_by, g.key.clone()),
                n_filters: g.n_filters,
                counts: g.components.iter().map(|h| h.counts.clone()).collect(),
            })
            .collect();
        let title = match a.group_by {
            Some(f) => format!(
                "Coefficient densities by {} ({}; basis v{})",
                field_name(f),
                what(a.where_.as_deref()),
                r.basis_version
            ),
            None => format!(
                "Coefficient densities ({}; basis v{})",
                what(a.where_.as_deref()),
                r.basis_version
            ),
        };
        plot_line = write_plot(
            &plot::Ridges {
                title,
                range: (r.range_min, r.range_max),
                panel_titles,
                x_label: "coefficient in the pinned basis".into(),
                groups,
            },
            path,
        )?;
    }
    if ctx.json {
        let mut v = distributions_to_json(&r);
        v["group_by"] = json!(a.group_by.map(field_name));
        if let Some(p) = &a.plot {
            v["plot"] = json!(p.display().to_string());
        }
        return emit_json(&v);
    }
    let mut out = format!(
        "coefficient histograms in basis version {}: {} bins over [{:.4}, {:.4}]\n",
        r.basis_version, r.bins, r.range_min, r.range_max
    );
    let group_header = a.group_by.map(field_name).unwrap_or("group");
    let mut t = table(
        &[group_header, "filters", "out of range", "out of range %"],
        &[1, 2, 3],
    );
    let (mut filters, mut oor) = (0u64, 0u64);
    for g in &r.groups {
        let o: u64 = g.components.iter().map(|h| h.out_of_range).sum();
        let values = g.n_filters * g.components.len() as u64;
        filters += g.n_filters;
        oor += o;
        t.add_row(vec![
            g.key.clone(),
            g.n_filters.to_string(),
            o.to_string(),
            if values > 0 {
                format!("{:.3}", 100.0 * o as f64 / values as f64)
            } else {
                "–".into()
            },
        ]);
    }
    let _ = writeln!(out, "{t}");
    let _ = writeln!(
        out,
        "{} groups, {filters} filters; {oor} coefficients outside the pinned range (layers ingested after pinning)",
        r.groups.len()
    );
    out.push_str(&plot_line);
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// drift

/// `filterdb drift`.
pub async fn drift(ctx: &Ctx, a: DriftArgs) -> anyhow::Result<()> {
    check_plot_path(a.plot.as_deref())?;
    let sel = selection(a.where_.as_deref())?;
    let weights = match a.weights {
        WeightsArg::Evr => DriftWeights::Evr,
        WeightsArg::Uniform => DriftWeights::Uniform,
    };
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .drift_matrix(DriftMatrixRequest {
                selection: sel,
                group: group_spec(Some(a.group_by)),
                weights: weights as i32,
                custom_weights: vec![],
                sort_by_mean: a.sort,
                bins: a.histogram.bins(),
                range_min: a.histogram.range_min(),
                range_max: a.histogram.range_max(),
            })
            .await,
    )?;
    let mut r = r;
    let g = r.keys.len();
    if r.d.len() != g * g {
        return Err(ClientError::Protocol(format!(
            "DriftMatrix sent {} values for {g} keys",
            r.d.len()
        ))
        .into());
    }
    if !a.sort {
        let keys: Vec<&str> = r.keys.iter().map(String::as_str).collect();
        if let Some(order) = group_order(Some(a.group_by), &keys) {
            permute_drift(&mut r, &order);
        }
    }
    let field = field_name(a.group_by);
    let weights_name = match a.weights {
        WeightsArg::Evr => "EVR",
        WeightsArg::Uniform => "uniform",
    };
    let mut plot_line = String::new();
    if let Some(path) = &a.plot {
        if g == 0 {
            bail!(
                "no filters match ({}): nothing to plot",
                what(a.where_.as_deref())
            );
        }
        let title = format!(
            "Drift D between {field} groups ({}; basis v{}, {weights_name} weights)",
            what(a.where_.as_deref()),
            r.basis_version
        );
        plot_line = write_plot(
            &plot::Heatmap {
                title,
                keys: r.keys.clone(),
                values: r.d.clone(),
                value_label: "drift D (weighted symmetric KL)".into(),
                axis_label: field.to_string(),
            },
            path,
        )?;
    }
    if ctx.json {
        let mut v = drift_matrix_to_json(&r);
        v["group_by"] = json!(field);
        if let Some(p) = &a.plot {
            v["plot"] = json!(p.display().to_string());
        }
        return emit_json(&v);
    }
    let mut out = format!(
        "drift D between {field} groups (basis version {}, {weights_name} weights{})\n",
        r.basis_version,
        if a.sort {
            ", sorted by column mean"
        } else {
            ""
        }
    );
    let mut headers = vec![field.to_string(), "filters".to_string()];
    headers.extend(r.keys.iter().cloned());
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = table(&header_refs, &(1..g + 2).collect::<Vec<_>>());
    for (i, key) in r.keys.iter().enumerate() {
        let mut row = vec![
            key.clone(),
            r.n_filters
                .get(i)
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ];
        row.extend((0..g).map(|j| plot::fmt_sig(r.d[i * g + j], 4)));
        t.add_row(row);
    }
    let _ = writeln!(out, "{t}");
    if g >= 2 {
        let summary: Vec<String> = SUMMARY_NAMES
            .iter()
            .zip(&r.upper_triangle_summary)
            .map(|(n, v)| format!("{n} {}", plot::fmt_sig(*v, 4)))
            .collect();
        let _ = writeln!(
            out,
            "upper triangle ({} pairs): {}",
            g * (g - 1) / 2,
            summary.join(", ")
        );
    }
    let w: Vec<String> = r.weights.iter().map(|w| format!("{w:.4}")).collect();
    let _ = writeln!(out, "weights: {}", w.join(" "));
    out.push_str(&plot_line);
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// quality

/// The `--where` text selecting one model's layers.
pub fn model_expr(model: &str) -> String {
    match model_ref(model).r#ref {
        Some(mref::Ref::Id(id)) => format!("model_id = {id}"),
        Some(mref::Ref::Name(n)) if n.contains('"') => format!("model = '{n}'"),
        Some(mref::Ref::Name(n)) => format!("model = \"{n}\""),
        None => String::new(),
    }
}

/// MODEL and --where combined into one selection text.
fn quality_expr(model: Option<&str>, where_: Option<&str>) -> Option<String> {
    let w = where_.map(str::trim).filter(|w| !w.is_empty());
    match (model.map(model_expr), w) {
        (Some(m), Some(w)) => Some(format!("({w}) and {m}")),
        (Some(m), None) => Some(m),
        (None, Some(w)) => Some(w.to_string()),
        (None, None) => None,
    }
}

fn flags(r: &QualityLayer<'_>) -> String {
    let mut f = Vec::new();
    if r.degenerate {
        f.push("DEGENERATE");
    }
    if r.random_like {
        f.push("random-like");
    }
    if r.low_diversity {
        f.push("low-diversity");
    }
    if r.sparse_heavy {
        f.push("sparse-heavy");
    }
    f.join(", ")
}

/// `filterdb quality`.
pub async fn quality(ctx: &Ctx, a: QualityArgs) -> anyhow::Result<()> {
    let options = a.quality.options()?;
    let expr = quality_expr(a.model.as_deref(), a.where_.as_deref());
    let sel: Option<Selection> = selection(expr.as_deref())?;
    let mut c = ctx.connect().await?;
    let model = match &a.model {
        Some(m) => Some(c.get_model(model_ref(m)).await?),
        None => None,
    };
    let r = answer(
        c.analytics()
            .layer_quality(LayerQualityRequest {
                selection: sel,
                options: Some(options),
                limit: a.limit.unwrap_or(0),
            })
            .await,
    )?;
    if ctx.json {
        let mut v = layer_quality_to_json(&r)?;
        v["selection"] = json!(expr.unwrap_or_default());
        return emit_json(&v);
    }
    let layers = filterdb_client::quality::layers(&r)?;
    let mut out = match &model {
        Some(m) => format!(
            "layer quality of model {} `{}` ({})\n",
            m.model_id,
            m.name,
            a.quality.describe()
        ),
        None => format!(
            "layer quality ({}; {})\n",
            what(expr.as_deref()),
            a.quality.describe()
        ),
    };
    if layers.is_empty() {
        out.push_str("no layers match\n");
        return Ok(emit(&out)?);
    }
    let several = r.models.len() > 1;
    let mut headers = vec![];
    if several {
        headers.push("model");
    }
    headers.extend([
        "index", "tensor", "depth", "n", "S", "H", "H/TH", "H_clean", "O", "flags",
    ]);
    let off = usize::from(several);
    let numeric: Vec<usize> = [0, 2, 3, 4, 5, 6, 7, 8].iter().map(|i| i + off).collect();
    let mut t = table(&headers, &numeric);
    let mut degenerate = 0;
    for l in &layers {
        degenerate += usize::from(l.degenerate);
        let mut row = vec![];
        if several {
            row.push(l.model.to_string());
        }
        row.extend([
            l.layer_index.to_string(),
            l.tensor_name.to_string(),
            format!("{} ({:.2})", l.conv_depth, l.conv_depth_norm),
            l.n.to_string(),
            num(l.sparsity, 3),
            num(l.entropy, 3),
            num(l.entropy_norm, 3),
            num(l.entropy_clean, 3),
            num(l.orthogonality, 3),
            flags(l),
        ]);
        t.add_row(row);
    }
    let _ = writeln!(out, "{t}");
    let _ = writeln!(
        out,
        "{degenerate} of {} layers degenerate (H ≥ TH − 0.02, or H < 0.5 and S ≥ 0.14)",
        layers.len()
    );
    out.push_str(
        "S: share of sparse filters; H: variance entropy (log10), TH: its maximum for n filters; \
         H_clean: H without sparse filters; O: orthogonality; depth: conv_depth (normalised)\n",
    );
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// degenerate

/// `filterdb degenerate`.
pub async fn degenerate(ctx: &Ctx, a: DegenerateArgs) -> anyhow::Result<()> {
    let options = a.quality.options()?;
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .degeneration_ranking(DegenerationRankingRequest {
                selection: sel,
                options: Some(options),
                by_count: a.by_count,
                limit: a.limit.unwrap_or(0),
            })
            .await,
    )?;
    if ctx.json {
        return emit_json(&degeneration_ranking_to_json(&r));
    }
    let mut out = format!(
        "models ranked by {} of degenerate layers ({}; {})\n",
        if a.by_count { "number" } else { "share" },
        what(a.where_.as_deref()),
        a.quality.describe()
    );
    if r.models.is_empty() {
        out.push_str("no models match\n");
        return Ok(emit(&out)?);
    }
    let mut t = table(
        &[
            "rank",
            "id",
            "model",
            "layers",
            "degenerate",
            "share %",
            "mean S",
            "mean H",
            "degenerate depths",
        ],
        &[0, 1, 3, 4, 5, 6, 7],
    );
    for (i, m) in r.models.iter().enumerate() {
        t.add_row(vec![
            (i + 1).to_string(),
            m.model_id.to_string(),
            m.model.clone(),
            m.layers.to_string(),
            m.degenerate_layers.to_string(),
            pct(m.degenerate_share),
            num(m.mean_sparsity, 3),
            num(m.mean_entropy, 3),
            m.degenerate_depths
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    let _ = writeln!(out, "{t}");
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// depth-profile

/// Models in first-seen order, and each model's value per bin.
type ProfileTable = (Vec<String>, BTreeMap<(String, String), (f64, u64)>);

fn profile_table(cells: &[filterdb_client::proto::DepthProfileCell]) -> ProfileTable {
    let mut models: Vec<String> = Vec::new();
    let mut map = BTreeMap::new();
    for c in cells {
        if !models.contains(&c.model) {
            models.push(c.model.clone());
        }
        map.insert((c.model.clone(), c.bin.clone()), (c.value, c.layers));
    }
    (models, map)
}

/// Sort key of a numeric or interval group key: `first` (the robustness paper's conv_depth 0
/// bin), then by the number the key starts with ("3", "(0.1, 0.2]"), then anything else.
fn numeric_key(k: &str) -> (u8, f64) {
    if k.trim().eq_ignore_ascii_case("first") {
        return (0, 0.0);
    }
    let num: String = k
        .trim_start_matches(['[', '(', ' '])
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
        .collect();
    match num.parse::<f64>() {
        Ok(v) => (1, v),
        Err(_) => (2, 0.0),
    }
}

/// The order of `keys` by [`numeric_key`] (stable for ties).
fn numeric_order(keys: &[&str]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ka, kb) = (numeric_key(keys[a]), numeric_key(keys[b]));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    idx
}

/// Group keys of numeric fields and depth bins come from the server in string order ("10"
/// before "2", "[0.0, 0.1]" after "(0.9, 1.0]"); this is the order to show them in instead, or
/// `None` when the field's keys are words.
fn group_order(field: Option<Field>, keys: &[&str]) -> Option<Vec<usize>> {
    let f = field?;
    let numeric = filterdb_client::proto::expr::is_numeric(f)
        || matches!(f, Field::DepthDecile | Field::DepthDecileFirst);
    numeric.then(|| numeric_order(keys))
}

/// Depth bins in depth order (see [`group_order`]).
fn depth_order(bins: &[String]) -> Vec<String> {
    let keys: Vec<&str> = bins.iter().map(String::as_str).collect();
    numeric_order(&keys)
        .into_iter()
        .map(|i| bins[i].clone())
        .collect()
}

/// Reorders a drift matrix's groups (keys, counts, D and the per-component values).
fn permute_drift(r: &mut filterdb_client::proto::DriftMatrixResponse, order: &[usize]) {
    let g = r.keys.len();
    if order.len() != g || r.d.len() != g * g {
        return;
    }
    let per = r.per_component.len() == g * g * 9;
    r.keys = order.iter().map(|&i| r.keys[i].clone()).collect();
    if r.n_filters.len() == g {
        r.n_filters = order.iter().map(|&i| r.n_filters[i]).collect();
    }
    let (mut d, mut pc) = (Vec::with_capacity(g * g), Vec::new());
    for &i in order {
        for &j in order {
            d.push(r.d[i * g + j]);
            if per {
                pc.extend_from_slice(&r.per_component[(i * g + j) * 9..(i * g + j) * 9 + 9]);
            }
        }
    }
    r.d = d;
    if per {
        r.per_component = pc;
    }
}

/// `filterdb depth-profile`.
pub async fn depth_profile(ctx: &Ctx, a: DepthProfileArgs) -> anyhow::Result<()> {
    check_plot_path(a.plot.as_deref())?;
    let options = a.quality.options()?;
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .depth_profile(DepthProfileRequest {
                selection: sel,
                metric: a.metric.to_proto() as i32,
                options: Some(options),
                binning: a.binning.field() as i32,
            })
            .await,
    )?;
    let (models, map) = profile_table(&r.cells);
    let bins = depth_order(&r.bins);
    let per_bin: Vec<Vec<f64>> = bins
        .iter()
        .map(|b| {
            models
                .iter()
                .filter_map(|m| map.get(&(m.clone(), b.clone())).map(|(v, _)| *v))
                .collect()
        })
        .collect();
    let binning = field_name(a.binning.field());
    let mut plot_line = String::new();
    if let Some(path) = &a.plot {
        if models.is_empty() {
            bail!(
                "no layers match ({}): nothing to plot",
                what(a.where_.as_deref())
            );
        }
        let title = format!(
            "{} by depth across {} model{} ({})",
            a.metric.label(),
            models.len(),
            if models.len() == 1 { "" } else { "s" },
            what(a.where_.as_deref())
        );
        let x_label = match a.binning {
            BinningArg::DepthDecile => "conv_depth_norm decile".to_string(),
            BinningArg::DepthDecileFirst => {
                "depth bin (first = conv_depth 0, then conv_depth_norm deciles)".to_string()
            }
        };
        plot_line = write_plot(
            &plot::Boxplots {
                title,
                x_label,
                y_label: a.metric.label().to_string(),
                bins: bins.clone(),
                values: per_bin.clone(),
            },
            path,
        )?;
    }
    if ctx.json {
        let mut v = depth_profile_to_json(&r);
        v["bins"] = json!(bins);
        v["metric"] = json!(
            a.metric
                .to_possible_value()
                .map(|p| p.get_name().to_string())
        );
        v["binning"] = json!(binning);
        if let Some(p) = &a.plot {
            v["plot"] = json!(p.display().to_string());
        }
        return emit_json(&v);
    }
    let mut out = format!(
        "{} per model and {binning} bin ({}; {})\n",
        a.metric.label(),
        what(a.where_.as_deref()),
        a.quality.describe()
    );
    if models.is_empty() {
        out.push_str("no layers match\n");
        return Ok(emit(&out)?);
    }
    let mut headers = vec!["model".to_string()];
    headers.extend(bins.iter().cloned());
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = table(&header_refs, &(1..=bins.len()).collect::<Vec<_>>());
    for m in &models {
        let mut row = vec![m.clone()];
        row.extend(bins.iter().map(|b| match map.get(&(m.clone(), b.clone())) {
            Some((v, _)) => num(*v, 3),
            None => String::new(),
        }));
        t.add_row(row);
    }
    if models.len() > 1 {
        let mut row = vec!["median".to_string()];
        row.extend(per_bin.iter().map(|vals| match plot::five_numbers(vals) {
            Some(f) => num(f[2], 3),
            None => String::new(),
        }));
        t.add_row(row);
    }
    let _ = writeln!(out, "{t}");
    out.push_str(&plot_line);
    Ok(emit(&out)?)
}

// ---------------------------------------------------------------------------------------------
// density

/// `filterdb density`.
pub async fn density(ctx: &Ctx, a: DensityArgs) -> anyhow::Result<()> {
    if a.i == a.j {
        bail!(
            "--i and --j must name two different components (got {} twice)",
            a.i
        );
    }
    if a.plot.is_none() && !ctx.json {
        bail!("--plot OUT.png (or OUT.svg) is required, unless --json prints the values");
    }
    check_plot_path(a.plot.as_deref())?;
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = answer(
        c.analytics()
            .density2_d(Density2DRequest {
                selection: sel,
                i: a.i,
                j: a.j,
            })
            .await,
    )?;
    let side = (r.density.len() as f64).sqrt().round() as usize;
    if side == 0 || side * side != r.density.len() {
        return Err(ClientError::Protocol(format!(
            "Density2D sent {} values, not a square image",
            r.density.len()
        ))
        .into());
    }
    let nonzero = r.density.iter().filter(|v| **v > 0.0).count();
    let mut plot_line = String::new();
    if let Some(path) = &a.plot {
        if r.n_filters == 0 {
            bail!(
                "no filters match ({}): nothing to plot",
                what(a.where_.as_deref())
            );
        }
        let title = format!(
            "Coefficients c{} vs c{}: {} filters ({}; basis v{})",
            a.i,
            a.j,
            r.n_filters,
            what(a.where_.as_deref()),
            r.basis_version
        );
        plot_line = write_plot(
            &plot::DensityImage {
                title,
                side,
                density: r.density.clone(),
                extent: DENSITY_EXTENT,
                x_label: format!("c{} coefficient", a.i),
                y_label: format!("c{} coefficient", a.j),
                vmin: DENSITY_VMIN,
                vmax: 1.0,
            },
            path,
        )
        .with_context(|| format!("cannot plot the density to {}", path.display()))?;
    }
    if ctx.json {
        let mut v = density_2d_to_json(&r);
        v["i"] = json!(a.i);
        v["j"] = json!(a.j);
        v["extent"] = json!([DENSITY_EXTENT.0, DENSITY_EXTENT.1]);
        if let Some(p) = &a.plot {
            v["plot"] = json!(p.display().to_string());
        }
        // Compact: the image is 512 rows of 512 values.
        let mut s = serde_json::to_string(&v)?;
        s.push('\n');
        return Ok(emit(&s)?);
    }
    let out = format!(
        "density of (c{}, c{}) over [{}, {}]²: {} filters, basis version {}, {nonzero} of {} bins non-empty\n{plot_line}",
        a.i,
        a.j,
        DENSITY_EXTENT.0,
        DENSITY_EXTENT.1,
        r.n_filters,
        r.basis_version,
        side * side
    );
    Ok(emit(&out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_selections() {
        assert_eq!(model_expr("12"), "model_id = 12");
        assert_eq!(model_expr("resnet-50.v2"), "model = \"resnet-50.v2\"");
        assert_eq!(
            quality_expr(Some("a"), Some("conv_depth < 3")).as_deref(),
            Some("(conv_depth < 3) and model = \"a\"")
        );
        assert_eq!(quality_expr(None, Some("  ")), None);
        assert_eq!(quality_expr(None, None), None);
        // Every form parses.
        for m in ["12", "a.b-c+d@e", "x_y"] {
            let e = quality_expr(Some(m), Some("task = Classification")).unwrap();
            assert!(selection(Some(&e)).is_ok(), "{e}");
        }
    }

    #[test]
    fn group_labels() {
        let l = |f: Option<Field>, k: &str| group_label(f, k.to_string());
        assert_eq!(l(Some(Field::LayerIndex), "3"), "layer_index = 3");
        assert_eq!(
            l(Some(Field::DepthDecile), "(0.1, 0.2]"),
            "depth_decile (0.1, 0.2]"
        );
        assert_eq!(l(Some(Field::Task), "Classification"), "Classification");
        assert_eq!(l(None, "7"), "7");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("-3.3,3.3"), Ok((-3.3, 3.3)));
        assert_eq!(parse_range(" -1 : 2 "), Ok((-1.0, 2.0)));
        assert!(parse_range("2,1").is_err());
        assert!(parse_range("1").is_err());
        assert!(parse_range("a,1").is_err());
        assert!(parse_range("nan,1").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(num(f64::NAN, 3), "–");
        assert_eq!(num(0.12345, 3), "0.123");
        assert_eq!(pct(0.41234), "41.23");
        assert_eq!(
            kernel_lines(&[1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25])
                .lines()
                .count(),
            3
        );
        assert_eq!(what(None), "all filters");
        assert_eq!(what(Some(" task = x ")), "task = x");
        let row = QualityLayer {
            degenerate: true,
            sparse_heavy: true,
            ..Default::default()
        };
        assert_eq!(flags(&row), "DEGENERATE, sparse-heavy");
    }

    #[test]
    fn depth_bins_sort_by_depth() {
        let bins: Vec<String> = ["(0.1, 0.2]", "(0.9, 1.0]", "[0.0, 0.1]", "first", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            depth_order(&bins),
            vec!["first", "[0.0, 0.1]", "(0.1, 0.2]", "(0.9, 1.0]", "other"]
        );
    }

    #[test]
    fn numeric_groups_sort_by_value() {
        assert_eq!(
            group_order(Some(Field::ConvDepth), &["0", "10", "2"]),
            Some(vec![0, 2, 1])
        );
        assert_eq!(group_order(Some(Field::Task), &["b", "a"]), None);
        assert_eq!(group_order(None, &["2", "1"]), None);
        let mut r = filterdb_client::proto::DriftMatrixResponse {
            keys: vec!["(0.1, 0.2]".into(), "[0.0, 0.1]".into()],
            n_filters: vec![5, 7],
            d: vec![0.0, 1.0, 2.0, 3.0],
            per_component: (0..36).map(f64::from).collect(),
            ..Default::default()
        };
        let keys: Vec<&str> = r.keys.iter().map(String::as_str).collect();
        let order = group_order(Some(Field::DepthDecile), &keys).unwrap();
        permute_drift(&mut r, &order);
        assert_eq!(r.keys, vec!["[0.0, 0.1]", "(0.1, 0.2]"]);
        assert_eq!(r.n_filters, vec![7, 5]);
        assert_eq!(r.d, vec![3.0, 2.0, 1.0, 0.0]);
        assert_eq!(r.per_component[0], 27.0);
        assert_eq!(r.per_component[9], 18.0);
    }

    #[test]
    fn profile_tables_keep_model_order() {
        use filterdb_client::proto::DepthProfileCell;
        let cell = |m: &str, b: &str, v: f64| DepthProfileCell {
            model: m.into(),
            bin: b.into(),
            value: v,
            layers: 1,
        };
        let (models, map) = profile_table(&[
            cell("z", "[0.0, 0.1]", 0.5),
            cell("a", "[0.0, 0.1]", 0.25),
            cell("z", "(0.9, 1.0]", 1.0),
        ]);
        assert_eq!(models, vec!["z", "a"]);
        assert_eq!(map[&("z".to_string(), "(0.9, 1.0]".to_string())].0, 1.0);
    }
}
