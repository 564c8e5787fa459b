//! `filterdb backup --out DIR`: an online RocksDB checkpoint written by the server on its host
//! (needs the admin role when authentication is on). DIR becomes a data directory:
//! `filterdb-server --data-dir DIR` serves the backup.

use std::path::PathBuf;

use clap::Args;
use filterdb_client::proto::CheckpointRequest;
use filterdb_client::proto::admin_client::AdminClient;

use super::Ctx;

/// Arguments of `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Folder to create on the server's host; must not exist (relative paths are taken from here).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `backup`.
pub async fn run(ctx: &Ctx, a: BackupArgs) -> anyhow::Result<()> {
    let out = std::path::absolute(&a.out)?;
    let c = ctx.connect().await?;
    let mut admin = AdminClient::new(c.transport());
    let r = admin
        .checkpoint(CheckpointRequest {
            path: out.display().to_string(),
        })
        .await
        .map_err(filterdb_client::ClientError::from)?
        .into_inner();
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"path": r.path, "files": r.files, "bytes": r.bytes, "seconds": r.seconds})
        );
    } else {
        println!(
            "checkpoint written to {} ({} files, {} bytes, {:.2} s)",
            r.path, r.files, r.bytes, r.seconds
        );
    }
    Ok(())
}
