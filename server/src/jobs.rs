//! Scheduled ingestion: sources (an inbox folder, or an HTTP catalog) run on an interval or a
//! cron schedule, or on demand. Every item's state (content hash, attempts, last error,
//! outcome) lives in RocksDB, so a crash mid-run leads to a complete next run: ingest itself is
//! atomic and idempotent by content hash, so re-running an item never duplicates a model.
//!
//! Policies:
//! - **Same content again**: skipped (already `done`, or `quarantined` until its bytes change).
//! - **Same model name, new content**: a new version replaces the stored model atomically
//!   (`NAME_CONFLICT_REPLACE`); the job records the new hash.
//! - **Bad input** (unreadable checkpoint, bad labels, bytes already stored under another
//!   name): `quarantined` with the server's message; retried only when the bytes change.
//! - **Transient failure** (I/O, download, storage): `retry` with exponential backoff
//!   (base × 2^(attempts−1), capped at one hour); after `max_attempts` it is quarantined.
//! - **Inbox readiness**: a checkpoint is picked up once its sidecar (`FILE.json` or
//!   `FILE.toml`) exists, so publishers write the checkpoint first and the sidecar last. Items
//!   are processed oldest first (file modification time), so the newest version of a name wins.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{Engine, EngineError, IngestOutcome, IngestRequest, MetaInput, NameConflict};
use crate::readers::Format;

/// A source as configured in the server's TOML (`[[source]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique name.
    pub name: String,
    /// An inbox folder (checkpoints with sidecar manifests, or a `catalog.json|toml`).
    #[serde(default)]
    pub inbox: Option<PathBuf>,
    /// An HTTP(S) catalog URL listing checkpoints with meta, download URL and sha256.
    #[serde(default)]
    pub catalog_url: Option<String>,
    /// Interval, e.g. "30s", "5m", "1h".
    #[serde(default)]
    pub every: Option<String>,
    /// Cron expression (5 fields, UTC), e.g. "0 */6 * * *".
    #[serde(default)]
    pub cron: Option<String>,
    /// Largest download accepted, bytes (default 16 GiB).
    #[serde(default = "default_max_download")]
    pub max_download_bytes: u64,
    /// Attempts before a transiently failing item is quarantined (default 5).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff base, e.g. "10s" (default).
    #[serde(default)]
    pub retry_base: Option<String>,
}

fn default_max_download() -> u64 {
    16 << 30
}

fn default_max_attempts() -> u32 {
    5
}

/// Parses "250ms", "30s", "5m", "2h", "1d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 30s, 5m or 1h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use ms, s, m, h or d)")),
    };
    if ms == 0 {
        return Err(format!("`{s}`: a schedule interval must be positive"));
    }
    Ok(Duration::from_millis(ms))
}

/// The schedule of a source.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Fixed interval.
    Every(Duration),
    /// Cron expression.
    Cron(Box<croner::Cron>),
    /// On demand only.
    Manual,
}

impl Schedule {
    /// Next run after `now_ms` (Unix ms), if scheduled.
    pub fn next_after(&self, now_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(d) => Some(now_ms + d.as_millis() as i64),
            Schedule::Cron(c) => {
                let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)?;
                c.find_next_occurrence(&now, false).ok().map(|t| t.timestamp_millis())
            }
            Schedule::Manual => None,
        }
    }

    fn describe(&self, cfg: &SourceConfig) -> String {
        match self {
            Schedule::Every(_) => format!("every {}", cfg.every.clone().unwrap_or_default()),
            Schedule::Cron(_) => format!("cron {}", cfg.cron.clone().unwrap_or_default()),
            Schedule::Manual => "on demand".into(),
        }
    }
}

impl SourceConfig {
    /// Checks the configuration and returns the schedule; errors name the source and field.
    pub fn validate(&self) -> Result<Schedule, String> {
        let ctx = format!("source `{}`", self.name);
        if self.name.trim().is_empty() || self.name.contains('\0') {
            return Err("a source needs a name".into());
        }
        match (&self.inbox, &self.catalog_url) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err(format!("{ctx}: set exactly one of `inbox` and `catalog_url`")),
        }
        if let Some(u) = &self.catalog_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(format!("{ctx}: catalog_url must be http:// or https://, got `{u}`"));
        }
        if let Some(b) = &self.retry_base {
            parse_duration(b).map_err(|e| format!("{ctx}: retry_base {e}"))?;
        }
        match (&self.every, &self.cron) {
            (Some(_), Some(_)) => Err(format!("{ctx}: set `every` or `cron`, not both")),
            (Some(e), None) => parse_duration(e).map(Schedule::Every).map_err(|e| format!("{ctx}: every {e}")),
            (None, Some(c)) => {
                let cron: croner::Cron = c.parse().map_err(|e| format!("{ctx}: cron `{c}`: {e}"))?;
                Ok(Schedule::Cron(Box::new(cron)))
            }
            (None, None) => Ok(Schedule::Manual),
        }
    }
}

/// Item outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stored (or already stored).
    Done,
    /// Transient failure; will retry.
    Retry,
    /// Bad input or gave up; not retried until the content changes.
    Quarantined,
}

/// One item's state, stored in the `jobs` column family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Source name.
    pub source: String,
    /// Item key (inbox-relative path, or catalog name).
    pub item: String,
    /// Content hash last seen.
    pub sha256: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Attempts for this content.
    pub attempts: u32,
    /// Last error.
    pub last_error: String,
    /// Stored model id when done.
    pub model_id: Option<u64>,
    /// Stored model name when done.
    pub model: String,
    /// Last update (Unix ms).
    pub updated_unix_ms: i64,
    /// When a retry is due (Unix ms).
    pub next_retry_unix_ms: i64,
}

/// Per-run counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Created or replaced.
    pub ingested: u64,
    /// Already stored.
    pub unchanged: u64,
    /// Already handled, or backoff not elapsed.
    pub skipped: u64,
    /// Transient failures.
    pub retry: u64,
    /// Quarantined now.
    pub quarantined: u64,
}

/// Status of a source (in memory; the item states are durable).
#[derive(Debug, Clone, Default)]
pub struct SourceRuntime {
    /// Last run start.
    pub last_run_unix_ms: i64,
    /// Next scheduled run.
    pub next_run_unix_ms: i64,
    /// Error of the last run as a whole.
    pub last_error: String,
}

/// The scheduler and its sources.
pub struct Jobs {
    engine: Arc<Engine>,
    sources: Vec<(SourceConfig, Schedule)>,
    runtime: Mutex<HashMap<String, SourceRuntime>>,
    running: HashMap<String, Arc<Mutex<()>>>,
}

/// A checkpoint found in a source, with its labels.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemManifest {
    /// File (inbox catalogs: relative to the inbox).
    #[serde(default)]
    pub file: Option<String>,
    /// Download URL (HTTP catalogs; relative URLs resolve against the catalog URL).
    #[serde(default)]
    pub url: Option<String>,
    /// Expected SHA-256 (required for downloads).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Model name.
    pub name: String,
    /// Training datasets.
    #[serde(default, alias = "training_datasets", alias = "dataset")]
    pub datasets: StringOrList,
    /// Pretraining datasets.
    #[serde(default)]
    pub pretraining_datasets: StringOrList,
    /// Task.
    #[serde(default)]
    pub task: String,
    /// Architecture.
    #[serde(default)]
    pub architecture: String,
    /// Visual category.
    #[serde(default)]
    pub visual_category: String,
    /// Source URI.
    #[serde(default)]
    pub source_uri: String,
    /// License.
    #[serde(default)]
    pub license: String,
    /// Tags.
    #[serde(default)]
    pub tags: StringOrList,
    /// Format (onnx, pytorch, safetensors); detected when absent.
    #[serde(default)]
    pub format: Option<String>,
}

/// A list given as an array or a comma-separated string.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// Not given.
    #[default]
    None,
    /// "a, b".
    One(String),
    /// ["a", "b"].
    Many(Vec<String>),
}

impl StringOrList {
    fn list(&self) -> Vec<String> {
        match self {
            StringOrList::None => Vec::new(),
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// An HTTP catalog document.
#[derive(Debug, Deserialize)]
struct CatalogDoc {
    #[serde(alias = "models")]
    checkpoints: Vec<ItemManifest>,
}

enum Failure {
    /// Bad input: quarantine.
    Bad(String),
    /// Transient: retry with backoff.
    Transient(String),
}

impl Jobs {
    /// Validates the sources; errors name the source at fault.
    pub fn new(engine: Arc<Engine>, sources: Vec<SourceConfig>) -> Result<Arc<Jobs>, String> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut running = HashMap::new();
        for s in sources {
            if !seen.insert(s.name.clone()) {
                return Err(format!("two sources are named `{}`", s.name));
            }
            let schedule = s.validate()?;
            running.insert(s.name.clone(), Arc::new(Mutex::new(())));
            out.push((s, schedule));
        }
        Ok(Arc::new(Jobs { engine, sources: out, runtime: Mutex::new(HashMap::new()), running }))
    }

    /// Starts one scheduler task per scheduled source on the current tokio runtime.
    pub fn start(self: &Arc<Self>) {
        for (cfg, schedule) in &self.sources {
            if matches!(schedule, Schedule::Manual) {
                continue;
            }
            let jobs = self.clone();
            let name = cfg.name.clone();
            let schedule = schedule.clone();
            tokio::spawn(async move {
                loop {
                    let now = crate::engine::now_ms();
                    let Some(next) = schedule.next_after(now) else { break };
                    jobs.runtime_mut(&name, |r| r.next_run_unix_ms = next);
                    tokio::time::sleep(Duration::from_millis((next - now).max(0) as u64)).await;
                    let j = jobs.clone();
                    let n = name.clone();
                    let r = tokio::task::spawn_blocking(move || j.run(&n)).await;
                    if let Ok(Err(e)) = r {
                        tracing::warn!(source = %name, error = %e, "scheduled run failed");
                    }
                }
            });
        }
    }

    fn runtime_mut(&self, name: &str, f: impl FnOnce(&mut SourceRuntime)) {
        let mut rt = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        f(rt.entry(name.to_string()).or_default());
    }

    /// The configured sources with their runtime status.
    pub fn sources(&self) -> Vec<(SourceConfig, String, SourceRuntime)> {
        let rt = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        self.sources
            .iter()
            .map(|(c, s)| (c.clone(), s.describe(c), rt.get(&c.name).cloned().unwrap_or_default()))
            .collect()
    }

    /// Job records of one source or all.
    pub fn list(&self, source: Option<&str>) -> Result<Vec<JobRecord>, EngineError> {
        let raw = self.engine.store().list_jobs(source)?;
        Ok(raw.iter().filter_map(|v| serde_json::from_slice(v).ok()).collect())
    }

    /// Runs a source now (blocking); concurrent runs of one source are serialised.
    pub fn run(&self, source: &str) -> Result<RunSummary, EngineError> {
        let (cfg, _) = self
            .sources
            .iter()
            .find(|(c, _)| c.name == source)
            .ok_or_else(|| EngineError::NotFound(format!("no source named `{source}` is configured")))?;
        let lock = self.running.get(source).cloned().unwrap_or_default();
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = crate::engine::now_ms();
        let span = tracing::info_span!("job_run", source = %source);
        let _enter = span.enter();
        let result = if let Some(dir) = &cfg.inbox {
            self.run_inbox(cfg, dir)
        } else if let Some(url) = &cfg.catalog_url {
            self.run_catalog(cfg, url)
        } else {
            Ok(RunSummary::default())
        };
        self.runtime_mut(source, |r| {
            r.last_run_unix_ms = started;
            r.last_error = match &result {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            };
        });
        if let Ok(s) = &result {
            tracing::info!(ingested = s.ingested, unchanged = s.unchanged, skipped = s.skipped, retry = s.retry, quarantined = s.quarantined, "run finished");
        }
        result
    }

    /// Inbox: checkpoints with a sidecar, plus entries of `catalog.json|toml`.
    fn run_inbox(&self, cfg: &SourceConfig, dir: &Path) -> Result<RunSummary, EngineError> {
        let mut items: Vec<(String, PathBuf, Result<ItemManifest, String>)> = Vec::new();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| EngineError::FailedPrecondition(format!("inbox {}: {e}", dir.display())))?;
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for path in &names {
            let fname = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if fname.starts_with('.') || !path.is_file() {
                continue;
            }
            if fname == "catalog.json" || fname == "catalog.toml" {
                let doc = read_manifest_file::<CatalogDoc>(path);
                match doc {
                    Ok(doc) => {
                        for m in doc.checkpoints {
                            let Some(file) = m.file.clone() else {
                                items.push((format!("{fname}#{}", m.name), path.clone(), Err("catalog entry has no `file`".into())));
                                continue;
                            };
                            items.push((file.clone(), dir.join(&file), Ok(m)));
                        }
                    }
                    Err(e) => items.push((fname.clone(), path.clone(), Err(e))),
                }
                continue;
            }
            if fname.ends_with(".json") || fname.ends_with(".toml") {
                continue; // sidecars are read with their checkpoint
            }
            let sidecar = ["json", "toml"].iter().map(|ext| dir.join(format!("{fname}.{ext}"))).find(|p| p.exists());
            let Some(sidecar) = sidecar else { continue }; // not ready yet
            items.push((fname.clone(), path.clone(), read_manifest_file::<ItemManifest>(&sidecar)));
        }
        // Oldest first, so that when two files carry the same model name the newest one ends
        // up stored (it replaces the older version).
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        items.sort_by(|a, b| mtime(&a.1).cmp(&mtime(&b.1)).then_with(|| a.0.cmp(&b.0)));
        let mut summary = RunSummary::default();
        for (item, path, manifest) in items {
            let staged = match stage_file(&path, self.engine.staging_dir()) {
                Ok(s) => s,
                Err(e) => {
                    self.record_failure(cfg, &item, "", Failure::Transient(e), &mut summary)?;
                    continue;
                }
            };
            self.process(cfg, &item, staged, manifest, &mut summary)?;
        }
        Ok(summary)
    }

    /// HTTP catalog: download each listed checkpoint (streamed, size-limited, sha256-checked).
    fn run_catalog(&self, cfg: &SourceConfig, url: &str) -> Result<RunSummary, EngineError> {
        let body = http_get_string(url, 64 << 20)
            .map_err(|e| EngineError::FailedPrecondition(format!("catalog {url}: {e}")))?;
        let doc: CatalogDoc = serde_json::from_str(&body)
            .map_err(|e| EngineError::InvalidArgument(format!("catalog {url} is not a valid catalog document: {e}")))?;
        let mut summary = RunSummary::default();
        for m in doc.checkpoints {
            let item = m.name.clone();
            let Some(expected) = m.sha256.clone().map(|s| s.to_lowercase()) else {
                self.record_failure(cfg, &item, "", Failure::Bad("catalog entry has no sha256".into()), &mut summary)?;
                continue;
            };
            if self.already_handled(cfg, &item, &expected)? {
                summary.skipped += 1;
                continue;
            }
            let Some(u) = m.url.clone() else {
                self.record_failure(cfg, &item, &expected, Failure::Bad("catalog entry has no url".into()), &mut summary)?;
                continue;
            };
            let full = resolve_url(url, &u);
            let staged = match download(&full, self.engine.staging_dir(), cfg.max_download_bytes) {
                Ok(s) => s,
                Err(e) => {
                    self.record_failure(cfg, &item, &expected, Failure::Transient(format!("download {full}: {e}")), &mut summary)?;
                    continue;
                }
            };
            if staged.1 != expected {
                let msg = format!("download {full}: sha256 is {} but the catalog says {expected}", staged.1);
                self.record_failure(cfg, &item, &expected, Failure::Transient(msg), &mut summary)?;
                continue;
            }
            self.process(cfg, &item, staged, Ok(m), &mut summary)?;
        }
        Ok(summary)
    }

    fn load(&self, cfg: &SourceConfig, item: &str) -> Result<Option<JobRecord>, EngineError> {
        Ok(self.engine.store().get_job(&cfg.name, item)?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn save(&self, r: &JobRecord) -> Result<(), EngineError> {
        let v = serde_json::to_vec(r).unwrap_or_default();
        self.engine.store().put_job(&r.source, &r.item, &v)?;
        Ok(())
    }

    /// Done or quarantined with these bytes, or still backing off.
    fn already_handled(&self, cfg: &SourceConfig, item: &str, sha: &str) -> Result<bool, EngineError> {
        Ok(match self.load(cfg, item)? {
            Some(r) if r.sha256 == sha => match r.outcome {
                Outcome::Done | Outcome::Quarantined => true,
                Outcome::Retry => r.next_retry_unix_ms > crate::engine::now_ms(),
            },
            _ => false,
        })
    }

    fn process(
        &self,
        cfg: &SourceConfig,
        item: &str,
        staged: (tempfile::NamedTempFile, String, u64),
        manifest: Result<ItemManifest, String>,
        summary: &mut RunSummary,
    ) -> Result<(), EngineError> {
        let (file, sha, size) = staged;
        if self.already_handled(cfg, item, &sha)? {
            summary.skipped += 1;
            return Ok(());
        }
        let m = match manifest {
            Ok(m) => m,
            Err(e) => return self.record_failure(cfg, item, &sha, Failure::Bad(e), summary),
        };
        let format = match m.format.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("auto") => None,
            Some("onnx") => Some(Format::Onnx),
            Some("pytorch") | Some("pt") | Some("pth") => Some(Format::Pytorch),
            Some("safetensors") => Some(Format::Safetensors),
            Some(other) => {
                return self.record_failure(cfg, item, &sha, Failure::Bad(format!("unknown format `{other}`")), summary);
            }
        };
        let req = IngestRequest {
            meta: MetaInput {
                name: m.name.clone(),
                training_datasets: m.datasets.list(),
                pretraining_datasets: m.pretraining_datasets.list(),
                task: m.task.clone(),
                architecture: m.architecture.clone(),
                visual_category: m.visual_category.clone(),
                source_uri: m.source_uri.clone(),
                license: m.license.clone(),
                tags: m.tags.list(),
            },
            file_name: item.to_string(),
            format,
            sha256: sha.clone(),
            size_bytes: size,
            on_conflict: NameConflict::Replace,
        };
        match self.engine.ingest(file.path(), &req, &|_, _, _| {}) {
            Ok((outcome, model)) => {
                match outcome {
                    IngestOutcome::Unchanged => summary.unchanged += 1,
                    _ => summary.ingested += 1,
                }
                metrics::counter!("filterdb_jobs_items_total", "source" => cfg.name.clone(), "outcome" => "done").increment(1);
                tracing::info!(item, model = %model.name, ?outcome, "job item done");
                self.save(&JobRecord {
                    source: cfg.name.clone(),
                    item: item.to_string(),
                    sha256: sha,
                    outcome: Outcome::Done,
                    attempts: self.load(cfg, item)?.filter(|r| r.outcome == Outcome::Retry).map(|r| r.attempts).unwrap_or(0) + 1,
                    last_error: String::new(),
                    model_id: Some(model.model_id),
                    model: model.name.clone(),
                    updated_unix_ms: crate::engine::now_ms(),
                    next_retry_unix_ms: 0,
                })
            }
            Err(EngineError::InvalidArgument(e) | EngineError::AlreadyExists(e) | EngineError::NotFound(e)) => {
                self.record_failure(cfg, item, &sha, Failure::Bad(e), summary)
            }
            Err(e) => self.record_failure(cfg, item, &sha, Failure::Transient(e.to_string()), summary),
        }
    }

    fn record_failure(&self, cfg: &SourceConfig, item: &str, sha: &str, f: Failure, summary: &mut RunSummary) -> Result<(), EngineError> {
        let prev = self.load(cfg, item)?.filter(|r| r.sha256 == sha && r.outcome == Outcome::Retry);
        let attempts = prev.map(|r| r.attempts).unwrap_or(0) + 1;
        let now = crate::engine::now_ms();
        let base = cfg.retry_base.as_deref().and_then(|b| parse_duration(b).ok()).unwrap_or(Duration::from_secs(10));
        let (outcome, error) = match f {
            Failure::Bad(e) => (Outcome::Quarantined, e),
            Failure::Transient(e) if attempts >= cfg.max_attempts => {
                (Outcome::Quarantined, format!("gave up after {attempts} attempts: {e}"))
            }
            Failure::Transient(e) => (Outcome::Retry, e),
        };
        let backoff = (base.as_millis() as i64).saturating_mul(1i64 << (attempts - 1).min(20)).min(3_600_000);
        match outcome {
            Outcome::Retry => summary.retry += 1,
            _ => summary.quarantined += 1,
        }
        let label = if outcome == Outcome::Retry { "retry" } else { "quarantined" };
        metrics::counter!("filterdb_jobs_items_total", "source" => cfg.name.clone(), "outcome" => label).increment(1);
        tracing::warn!(item, outcome = label, attempts, error = %error, "job item failed");
        self.save(&JobRecord {
            source: cfg.name.clone(),
            item: item.to_string(),
            sha256: sha.to_string(),
            outcome,
            attempts,
            last_error: error,
            model_id: None,
            model: String::new(),
            updated_unix_ms: now,
            next_retry_unix_ms: if outcome == Outcome::Retry { now + backoff } else { 0 },
        })
    }
}

fn read_manifest_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.display();
    if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| format!("{name}: {e}"))
    } else {
        serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))
    }
}

/// Copies a file into staging while hashing it (the inbox file may change afterwards).
fn stage_file(path: &Path, staging: &Path) -> Result<(tempfile::NamedTempFile, String, u64), String> {
    let mut src = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    copy_hashed(&mut src, staging, u64::MAX).map_err(|e| format!("{}: {e}", path.display()))
}

fn copy_hashed(src: &mut dyn Read, staging: &Path, limit: u64) -> Result<(tempfile::NamedTempFile, String, u64), String> {
    let mut out = tempfile::NamedTempFile::new_in(staging).map_err(|e| format!("cannot stage: {e}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(format!("larger than the limit of {limit} bytes"));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| format!("staging write: {e}"))?;
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok((out, hex::encode(hasher.finalize()), total))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3600))).build().into()
}

fn http_get_string(url: &str, limit: u64) -> Result<String, String> {
    let resp = agent().get(url).call().map_err(|e| e.to_string())?;
    resp.into_body().with_config().limit(limit).read_to_string().map_err(|e| e.to_string())
}

fn download(url: &str, staging: &Path, limit: u64) -> Result<(tempfile::NamedTempFile, String, u64), String> {
    let resp = agent().get(url).call().map_err(|e| e.to_string())?;
    let mut reader = resp.into_body().into_with_config().limit(limit.saturating_add(1)).reader();
    copy_hashed(&mut reader, staging, limit)
}

/// Resolves a possibly relative download URL against the catalog URL.
fn resolve_url(base: &str, u: &str) -> String {
    if u.starts_with("http://") || u.starts_with("https://") {
        return u.to_string();
    }
    match base.rfind('/') {
        Some(i) if i > "https://".len() => format!("{}/{}", &base[..i], u.trim_start_matches('/')),
        _ => format!("{}/{}", base.trim_end_matches('/'), u.trim_start_matches('/')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_schedules_and_validation() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
        let mut c = SourceConfig {
            name: "a".into(),
            inbox: Some("/tmp".into()),
            catalog_url: None,
            every: None,
            cron: Some("0 */6 * * *".into()),
            max_download_bytes: 1,
            max_attempts: 3,
            retry_base: None,
        };
        let s = c.validate().unwrap();
        // 2026-11-26T01:30:00Z -> next run at 06:00:00Z
        let now = 1_795_656_600_000;
        assert_eq!(s.next_after(now), Some(1_795_672_800_000));
        c.every = Some("1h".into());
        assert!(c.validate().unwrap_err().contains("not both"));
        c.cron = None;
        c.catalog_url = Some("ftp://x".into());
        assert!(c.validate().unwrap_err().contains("exactly one"));
        c.inbox = None;
        assert!(c.validate().unwrap_err().contains("http"));
    }

    #[test]
    fn urls_resolve_against_the_catalog() {
        assert_eq!(resolve_url("http://h:1/c/catalog.json", "m.pt"), "http://h:1/c/m.pt");
        assert_eq!(resolve_url("http://h:1/catalog.json", "/m.pt"), "http://h:1/m.pt");
        assert_eq!(resolve_url("http://h:1/catalog.json", "https://o/m.pt"), "https://o/m.pt");
    }
}
