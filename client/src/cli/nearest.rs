//! `filterdb nearest`: the k stored filters nearest to a kernel or to a stored filter.

use std::io::Write;

use clap::{Args, ValueEnum};
use filterdb_client::proto::search_client::SearchClient;
use filterdb_client::proto::{
    FilterConditions, NearestRequest, NearestResponse, SearchMode, SearchSpace, nearest_request,
};
use filterdb_client::{ClientError, MAX_MESSAGE_BYTES, selection};
use serde_json::{Value, json};

use super::Ctx;
use super::render::{kernel_grid, table};

/// The space distances are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpaceArg {
    /// Squared L2 of the stored values.
    Raw,
    /// Squared L2 of L∞-scaled filters (f / max|f|).
    Scaled,
    /// Squared L2 of unit-norm filters (= 2 − 2 cos).
    Cosine,
    /// Squared L2 of coefficients in the pinned reference basis.
    Basis,
}

impl SpaceArg {
    fn to_proto(self) -> SearchSpace {
        match self {
            SpaceArg::Raw => SearchSpace::Raw,
            SpaceArg::Scaled => SearchSpace::Scaled,
            SpaceArg::Cosine => SearchSpace::Cosine,
            SpaceArg::Basis => SearchSpace::Basis,
        }
    }
}

/// Nine kernel values, row-major.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kernel(pub [f32; 9]);

/// Parses "a,b,c,d,e,f,g,h,i".
fn parse_kernel(s: &str) -> Result<Kernel, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 9 {
        return Err(format!(
            "a 3x3 kernel needs 9 comma-separated values (row-major), got {}",
            parts.len()
        ));
    }
    let mut k = [0f32; 9];
    for (v, p) in k.iter_mut().zip(&parts) {
        *v = p
            .parse::<f32>()
            .map_err(|_| format!("`{p}` is not a number"))?;
        if !v.is_finite() {
            return Err(format!("`{p}` is not a finite number"));
        }
    }
    Ok(Kernel(k))
}

/// Arguments of `nearest`.
#[derive(Debug, Args)]
pub struct NearestArgs {
    /// Query kernel: 9 comma-separated values, row-major, e.g. "0,1,0,1,-4,1,0,1,0".
    #[arg(
        long,
        value_name = "a,b,c,d,e,f,g,h,i",
        value_parser = parse_kernel,
        allow_hyphen_values = true,
        required_unless_present = "filter_id",
        conflicts_with = "filter_id"
    )]
    pub kernel: Option<Kernel>,
    /// Query with a stored filter's kernel.
    #[arg(long = "filter-id", value_name = "N")]
    pub filter_id: Option<u64>,
    /// Neighbours to return (the server caps it, by default at 1000).
    #[arg(short = 'k', long = "k", value_name = "K", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub k: u32,
    /// Space distances are measured in.
    #[arg(long, value_enum, default_value = "raw")]
    pub space: SpaceArg,
    /// With --space basis: use only the first M components (1-9).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub components: Option<u32>,
    /// Count f and -f as the same shape.
    #[arg(long)]
    pub sign_invariant: bool,
    /// Only filters of layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Skip sparse filters (max |f| < 1% of the layer's max |w|).
    #[arg(long)]
    pub exclude_sparse: bool,
    /// Skip all-zero filters.
    #[arg(long)]
    pub exclude_zero: bool,
    /// With --filter-id: leave the query filter out of the answer.
    #[arg(long)]
    pub exclude_self: bool,
    /// Require the exact mode (recall 1.0). This is the default.
    #[arg(long, conflicts_with = "approx")]
    pub exact: bool,
    /// Exact mode: read every selected filter, without the search index's bounds (the same
    /// answer; for verification and timing).
    #[arg(long, conflicts_with = "approx")]
    pub scan: bool,
    /// Use the approximate index (raw space): exact distances, recall below 1.0.
    #[arg(long)]
    pub approx: bool,
    /// With --approx: cells probed for a search over everything (the recall knob; server
    /// default 16, scaled up for narrow selections).
    #[arg(long, value_name = "N", requires = "approx")]
    pub nprobe: Option<u32>,
    /// With --approx: probe exactly --nprobe cells, without scaling them up for a narrow
    /// selection (you tune the recall of each selection yourself).
    #[arg(long, requires = "approx")]
    pub nprobe_unscaled: bool,
    /// With --approx: re-rank k x R candidates exactly (server default 4).
    #[arg(long, value_name = "R", requires = "approx")]
    pub rerank: Option<u32>,
}

/// A Search stub on the CLI's connection (token and TLS included).
async fn connect(ctx: &Ctx) -> Result<SearchClient<filterdb_client::Transport>, ClientError> {
    Ok(SearchClient::new(ctx.connect().await?.transport())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn decode(b: &[u8]) -> [f32; 9] {
    let mut k = [0f32; 9];
    for (v, c) in k.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    k
}

fn space_name(v: i32) -> &'static str {
    match SearchSpace::try_from(v) {
        Ok(SearchSpace::Raw) => "raw",
        Ok(SearchSpace::Scaled) => "scaled",
        Ok(SearchSpace::Cosine) => "cosine",
        Ok(SearchSpace::Basis) => "basis",
        _ => "unspecified",
    }
}

fn mode_name(v: i32) -> &'static str {
    match SearchMode::try_from(v) {
        Ok(SearchMode::Exact) => "exact",
        Ok(SearchMode::Approximate) => "approximate",
        _ => "unspecified",
    }
}

/// Builds the request from the arguments.
pub fn request(a: &NearestArgs) -> Result<NearestRequest, ClientError> {
    let query = match (a.kernel, a.filter_id) {
        (Some(k), _) => {
            nearest_request::Query::Kernel(k.0.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        (None, Some(id)) => nearest_request::Query::FilterId(id),
        (None, None) => {
            return Err(ClientError::Protocol("give --kernel or --filter-id".into()));
        }
    };
    Ok(NearestRequest {
        query: Some(query),
        k: a.k,
        space: a.space.to_proto() as i32,
        components: a.components.unwrap_or(0),
        sign_invariant: a.sign_invariant,
        selection: selection(a.where_.as_deref())?,
        conditions: Some(FilterConditions {
            exclude_zero: a.exclude_zero,
            exclude_sparse: a.exclude_sparse,
            sparse_eps: 0.0,
            sparse_non_strict: false,
        }),
        exclude_query_filter: a.exclude_self,
        mode: if a.approx {
            SearchMode::Approximate
        } else {
            SearchMode::Exact
        } as i32,
        nprobe: a.nprobe.unwrap_or(0),
        nprobe_unscaled: a.nprobe_unscaled,
        rerank: a.rerank.unwrap_or(0),
        exact_scan: a.scan,
    })
}

/// The response as one JSON document.
pub fn response_to_json(r: &NearestResponse) -> Value {
    json!({
        "mode": mode_name(r.mode),
        "mode_reason": r.mode_reason,
        "nprobe": r.nprobe,
        "candidates_reranked": r.candidates_reranked,
        "index_version": r.index_version,
        "space": space_name(r.space),
        "k": r.k,
        "components": r.components,
        "sign_invariant": r.sign_invariant,
        "basis_version": r.basis_version,
        "query_kernel": decode(&r.query_kernel).to_vec(),
        "layers_scanned": r.layers_scanned,
        "filters_scanned": r.filters_scanned,
        "elapsed_us": r.elapsed_us,
        "neighbors": r.neighbors.iter().map(|n| json!({
            "filter_id": n.filter_id,
            "distance": n.distance,
            "kernel": decode(&n.kernel).to_vec(),
            "sign_flipped": n.sign_flipped,
            "model_id": n.model_id,
            "model": n.model_name,
            "layer_id": n.layer_id,
            "layer_index": n.layer_index,
            "tensor_name": n.tensor_name,
            "conv_depth": n.conv_depth,
            "conv_depth_norm": n.conv_depth_norm,
            "out_channel": n.out_channel,
            "in_channel": n.in_channel,
        })).collect::<Vec<_>>(),
    })
}

/// Runs `nearest`.
pub async fn nearest(ctx: &Ctx, a: NearestArgs) -> anyhow::Result<()> {
    let req = request(&a)?;
    let mut c = connect(ctx).await?;
    let r = c
        .nearest(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(ClientError::from)?;
    let text = if ctx.json {
        let mut s = serde_json::to_string_pretty(&response_to_json(&r))?;
        s.push('\n');
        s
    } else {
        render(&r, &a)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn render(r: &NearestResponse, a: &NearestArgs) -> String {
    let mut out = String::new();
    let what = match a.filter_id {
        Some(id) if a.kernel.is_none() => format!("filter {id}"),
        _ => "the kernel".to_string(),
    };
    let space = match (space_name(r.space), r.components) {
        ("basis", m) => format!("basis (v{}, {m} components)", r.basis_version),
        (s, _) => s.to_string(),
    };
    out.push_str(&format!(
        "{} nearest to {what} in {space} space{} ({} mode; {} filters in {} layers, {:.1} ms)\n",
        r.neighbors.len(),
        if r.sign_invariant {
            ", sign invariant"
        } else {
            ""
        },
        mode_name(r.mode),
        r.filters_scanned,
        r.layers_scanned,
        r.elapsed_us as f64 / 1000.0
    ));
    if !r.mode_reason.is_empty() {
        out.push_str(&format!("mode: {}\n", r.mode_reason));
    }
    out.push_str(&kernel_grid(&decode(&r.query_kernel)));
    if r.neighbors.is_empty() {
        out.push_str("no filter matches the selection\n");
        return out;
    }
    let mut t = table(
        &[
            "#", "filter", "distance", "model", "layer", "tensor", "o,i", "depth", "kernel",
        ],
        &[0, 1, 2, 4, 7],
    );
    for (i, n) in r.neighbors.iter().enumerate() {
        let grid = kernel_grid(&decode(&n.kernel));
        let grid = grid
            .lines()
            .map(|l| l.trim_start_matches("  "))
            .collect::<Vec<_>>()
            .join("\n");
        t.add_row(vec![
            (i + 1).to_string(),
            format!(
                "{}{}",
                n.filter_id,
                if n.sign_flipped { " (−)" } else { "" }
            ),
            format!("{:.6}", n.distance),
            n.model_name.clone(),
            n.layer_index.to_string(),
            n.tensor_name.clone(),
            format!("{},{}", n.out_channel, n.in_channel),
            n.conv_depth.to_string(),
            grid,
        ]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    if r.sign_invariant {
        out.push_str("(−): the filter matches the negated query\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_parse() {
        assert_eq!(
            parse_kernel("0,1,0, 1,-4,1, 0,1,0").unwrap().0,
            [0.0, 1.0, 0.0, 1.0, -4.0, 1.0, 0.0, 1.0, 0.0]
        );
        assert!(
            parse_kernel("1,2,3")
                .unwrap_err()
                .contains("9 comma-separated")
        );
        assert!(
            parse_kernel("1,2,3,4,5,6,7,8,x")
                .unwrap_err()
                .contains("`x`")
        );
        assert!(
            parse_kernel("1,2,3,4,5,6,7,8,NaN")
                .unwrap_err()
                .contains("finite")
        );
    }
}
