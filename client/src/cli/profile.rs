//! `filterdb profile FILE`: per-layer quality of an unseen checkpoint and its drift to every
//! group of the database, in one call (ProfileCheckpoint).

use std::path::PathBuf;

use clap::Args;
use filterdb_client::proto as pb;
use tokio::io::AsyncReadExt;

use super::Ctx;
use super::render::table;

/// `filterdb profile`.
#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Checkpoint file (ONNX, PyTorch, safetensors).
    pub file: PathBuf,
    /// Compare with the groups of this field (default: task).
    #[arg(long, default_value = "task")]
    pub group_by: String,
    /// Restrict the reference groups.
    #[arg(long = "where")]
    pub where_: Option<String>,
    /// Also store the checkpoint under this model name (needs --dataset, --task, --architecture).
    #[arg(long)]
    pub store_as: Option<String>,
    /// Training dataset (with --store-as).
    #[arg(long)]
    pub dataset: Vec<String>,
    /// Task (with --store-as).
    #[arg(long)]
    pub task: Option<String>,
    /// Architecture (with --store-as).
    #[arg(long)]
    pub architecture: Option<String>,
}

/// Runs `filterdb profile`.
pub async fn run(ctx: &Ctx, a: ProfileArgs) -> anyhow::Result<()> {
    let field = filterdb_client::proto::expr::field_by_name(&a.group_by)
        .ok_or_else(|| anyhow::anyhow!("unknown field `{}` for --group-by", a.group_by))?;
    let mut f = tokio::fs::File::open(&a.file).await.map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let file_name = a.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let header = pb::ProfileCheckpointHeader {
        meta: a.store_as.as_ref().map(|name| pb::ModelMeta {
            name: name.clone(),
            training_datasets: a.dataset.clone(),
            task: a.task.clone().unwrap_or_default(),
            architecture: a.architecture.clone().unwrap_or_default(),
            ..Default::default()
        }),
        file_name: file_name.clone(),
        group: Some(pb::GroupSpec { field: field as i32, selections: vec![] }),
        reference: filterdb_client::selection(a.where_.as_deref())?,
        store: a.store_as.is_some(),
        ..Default::default()
    };
    let mut msgs = vec![pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Header(header)) }];
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        msgs.push(pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Chunk(buf)) });
    }
    let mut c = ctx.connect().await?;
    let r = c
        .analytics()
        .profile_checkpoint(tokio_stream::iter(msgs))
        .await
        .map_err(|e| anyhow::anyhow!(filterdb_client::ClientError::Status(e)))?
        .into_inner();
    if ctx.json {
        let layers: Vec<serde_json::Value> = r
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({"layer_index": l.layer_index, "tensor_name": l.tensor_name, "conv_depth": l.conv_depth,
                    "n": l.n, "sparsity": l.sparsity, "entropy": l.entropy, "entropy_norm": l.entropy_norm,
                    "entropy_clean": l.entropy_clean, "orthogonality": l.orthogonality, "degenerate": l.degenerate,
                    "random_like": l.random_like})
            })
            .collect();
        let drift: Vec<serde_json::Value> =
            r.drift.iter().map(|g| serde_json::json!({"key": g.key, "d": g.d, "per_component": g.per_component, "n_filters": g.n_filters})).collect();
        println!(
            "{}",
            serde_json::json!({"basis_version": r.basis_version, "degenerate_share": r.degenerate_share,
                "layers": layers, "drift": drift, "stored_model_id": r.stored.as_ref().and_then(|s| s.model.as_ref()).map(|m| m.model_id)})
        );
        return Ok(());
    }
    println!("{file_name}: {} layers of 3x3 filters (basis version {})", r.layers.len(), r.basis_version);
    let mut t = table(&["index", "tensor", "depth", "n", "S", "H", "H/TH", "O", "flags"], &[0, 2, 3, 4, 5, 6, 7]);
    for l in &r.layers {
        let mut flags = Vec::new();
        if l.degenerate {
            flags.push("DEGENERATE");
        }
        if l.random_like {
            flags.push("random-like");
        }
        t.add_row(vec![
            l.layer_index.to_string(),
            l.tensor_name.clone(),
            l.conv_depth.to_string(),
            l.n.to_string(),
            format!("{:.3}", l.sparsity),
            format!("{:.3}", l.entropy),
            format!("{:.3}", l.entropy_norm),
            format!("{:.3}", l.orthogonality),
            flags.join(", "),
        ]);
    }
    println!("{t}");
    println!("{:.0}% of layers degenerate", 100.0 * r.degenerate_share);
    let mut t = table(&[&a.group_by, "D (most similar first)", "filters"], &[1, 2]);
    for g in &r.drift {
        t.add_row(vec![g.key.clone(), format!("{:.4}", g.d), g.n_filters.to_string()]);
    }
    println!("{t}");
    if let Some(first) = r.drift.first() {
        println!("most like: {} = {} (D = {:.4})", a.group_by, first.key, first.d);
    }
    if let Some(s) = r.stored.as_ref().and_then(|s| s.model.as_ref()) {
        println!("stored as model {} `{}`", s.model_id, s.name);
    }
    Ok(())
}
