//! Version 1: the initial layout. Column families are created when the database is opened;
//! this step writes zeroed id counters.

use rocksdb::{DB, WriteBatch};

pub fn apply(db: &DB, batch: &mut WriteBatch) -> Result<(), String> {
    let cf = db.cf_handle("meta").ok_or("column family `meta` missing")?;
    let ids = serde_json::json!({"model": 0, "layer": 0, "filter": 0});
    batch.put_cf(&cf, b"next_ids", ids.to_string().as_bytes());
    Ok(())
}
