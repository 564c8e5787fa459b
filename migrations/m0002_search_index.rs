//! Version 2: the approximate search index. Its column family `search_index` is created when
//! the database is opened; existing models have no segment yet, so the step writes nothing and
//! the server's background builder trains a quantizer and encodes every model (until then the
//! approximate mode answers with the exact scan).

use rocksdb::{DB, WriteBatch};

pub fn apply(db: &DB, _batch: &mut WriteBatch) -> Result<(), String> {
    db.cf_handle("search_index").ok_or("column family `search_index` missing")?;
    Ok(())
}
