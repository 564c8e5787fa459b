//! The server's configuration: one TOML file, environment variables and command-line flags,
//! merged in one documented order and validated before anything starts.
//!
//! **Precedence** (later wins): built-in defaults < the TOML file (`--config` /
//! `FILTERDB_CONFIG`) < environment variables < flags (`--listen`, …, and `--set key=value`).
//!
//! Every scalar key has an environment variable: `FILTERDB_` + the key upper-cased with `.`
//! turned into `_` (`listen` → `FILTERDB_LISTEN`, `limits.max_k` → `FILTERDB_LIMITS_MAX_K`,
//! `tls.cert` → `FILTERDB_TLS_CERT`). Tables (`[[source]]`, `[[auth.token]]`) come only from
//! files: the main file, and `auth.tokens_file` (a second TOML file holding `[[token]]` tables,
//! e.g. mounted from a Kubernetes Secret).
//!
//! Validation names the key and where its value came from (file, variable or flag).
//! `filterdb-server --print-config` prints the effective configuration as TOML with token
//! hashes masked, each key's origin listed in a comment.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::jobs::SourceConfig;

/// What a token may do: read < write < admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Catalogue, census, filters, analytics and search queries.
    Read,
    /// Read, plus ingest, label updates, deletes and pinning a basis.
    Write,
    /// Everything: snapshots, jobs, imports, checkpoints.
    Admin,
}

impl Role {
    /// The lower-case name used in configuration and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// One bearer token, stored as the SHA-256 (hex) of the token text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (logged; never the token).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// `sha256sum` of the token text, 64 hex digits.
    pub sha256: String,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept tokens on a non-loopback address without TLS (tokens then travel in clear text).
    pub allow_insecure_tokens: bool,
    /// A TOML file with more `[[token]]` tables (e.g. a mounted secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// `[[auth.token]]` tables. None configured: authentication is off.
    #[serde(rename = "token")]
    pub tokens: Vec<TokenConfig>,
}

/// `[tls]`: rustls with a PEM certificate chain and key; a client CA turns on mTLS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to (mTLS); unset: no client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// `[limits]`: what one request may ask for, and how much the server takes on at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest checkpoint upload, bytes (uploads stream in chunks; gRPC messages stay ≤ 64 MiB).
    pub max_upload_bytes: u64,
    /// Largest ListModels page.
    pub max_page_size: u32,
    /// Largest GetFilters batch (filters per message).
    pub max_filter_batch: u32,
    /// Most filters one GetFilters stream may return (0: no limit); Flight exports are exempt.
    pub max_stream_rows: u64,
    /// Largest k of a nearest-neighbour search.
    pub max_k: usize,
    /// Most groups an analytics answer may hold.
    pub max_groups: usize,
    /// Longest a call may run before DEADLINE_EXCEEDED, seconds (0: only client deadlines).
    pub request_timeout_secs: u64,
    /// Calls served at once; more are shed with RESOURCE_EXHAUSTED (0: no limit).
    pub max_concurrent_requests: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let api = crate::api::Limits::default();
        LimitsConfig {
            max_upload_bytes: api.max_upload_bytes,
            max_page_size: api.max_page_size,
            max_filter_batch: api.max_filter_batch,
            max_stream_rows: api.max_stream_rows,
            max_k: crate::search::DEFAULT_MAX_K,
            max_groups: crate::api::analytics::DEFAULT_MAX_GROUPS,
            request_timeout_secs: 0,
            max_concurrent_requests: 512,
        }
    }
}

/// The whole configuration, as merged and validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: String,
    /// `text` or `json`.
    pub log_format: String,
    /// Prometheus metrics over HTTP (`GET /metrics`) on this address; empty: off.
    pub metrics_listen: String,
    /// Take a snapshot into `<data_dir>/snapshots` every this many seconds (0: never).
    pub snapshot_interval_secs: u64,
    /// Periodic snapshots to keep (0: all).
    pub snapshot_retain: usize,
    /// On SIGTERM/SIGINT, how long in-flight calls may run before the server stops anyway.
    pub shutdown_grace_secs: u64,
    /// Request limits.
    pub limits: LimitsConfig,
    /// TLS.
    pub tls: TlsConfig,
    /// Bearer-token authentication.
    pub auth: AuthConfig,
    /// Scheduled-ingestion sources (`[[source]]`).
    pub source: Vec<SourceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./filterdb-data"),
            listen: "127.0.0.1:50051".into(),
            log_format: "text".into(),
            metrics_listen: String::new(),
            snapshot_interval_secs: 0,
            snapshot_retain: 7,
            shutdown_grace_secs: 30,
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            source: Vec::new(),
        }
    }
}

/// Scalar keys settable from the environment and `--set`.
pub const KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "log_format",
    "metrics_listen",
    "snapshot_interval_secs",
    "snapshot_retain",
    "shutdown_grace_secs",
    "limits.max_upload_bytes",
    "limits.max_page_size",
    "limits.max_filter_batch",
    "limits.max_stream_rows",
    "limits.max_k",
    "limits.max_groups",
    "limits.request_timeout_secs",
    "limits.max_concurrent_requests",
    "tls.cert",
    "tls.key",
    "tls.client_ca",
    "auth.allow_insecure_tokens",
    "auth.tokens_file",
];

/// The environment variable of a key.
pub fn env_var(key: &str) -> String {
    format!("FILTERDB_{}", key.replace('.', "_").to_uppercase())
}

/// The merged configuration with where each key's value came from.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// Key → origin ("default" when absent), e.g. `file /etc/filterdb.toml`, `env FILTERDB_LISTEN`.
    pub origins: BTreeMap<String, String>,
}

/// A configuration error: names the key and where its value came from.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse::<T>()
        .map_err(|_| format!("`{v}` is not a valid number for {key}"))
}

fn opt_path(v: &str) -> Option<PathBuf> {
    if v.trim().is_empty() {
        None
    } else {
        Some(PathBuf::from(v.trim()))
    }
}

impl Config {
    /// Sets one scalar key from text (environment or `--set`).
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        match key {
            "data_dir" => self.data_dir = PathBuf::from(v),
            "listen" => self.listen = v.trim().to_string(),
            "log_format" => self.log_format = v.trim().to_string(),
            "metrics_listen" => self.metrics_listen = v.trim().to_string(),
            "snapshot_interval_secs" => self.snapshot_interval_secs = parse_num(key, v)?,
            "snapshot_retain" => self.snapshot_retain = parse_num(key, v)?,
            "shutdown_grace_secs" => self.shutdown_grace_secs = parse_num(key, v)?,
            "limits.max_upload_bytes" => self.limits.max_upload_bytes = parse_num(key, v)?,
            "limits.max_page_size" => self.limits.max_page_size = parse_num(key, v)?,
            "limits.max_filter_batch" => self.limits.max_filter_batch = parse_num(key, v)?,
            "limits.max_stream_rows" => self.limits.max_stream_rows = parse_num(key, v)?,
            "limits.max_k" => self.limits.max_k = parse_num(key, v)?,
            "limits.max_groups" => self.limits.max_groups = parse_num(key, v)?,
            "limits.request_timeout_secs" => self.limits.request_timeout_secs = parse_num(key, v)?,
            "limits.max_concurrent_requests" => {
                self.limits.max_concurrent_requests = parse_num(key, v)?
            }
            "tls.cert" => self.tls.cert = opt_path(v),
            "tls.key" => self.tls.key = opt_path(v),
            "tls.client_ca" => self.tls.client_ca = opt_path(v),
            "auth.allow_insecure_tokens" => {
                self.auth.allow_insecure_tokens = match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" | "" => false,
                    _ => return Err(format!("`{v}` is not true or false for {key}")),
                }
            }
            "auth.tokens_file" => self.auth.tokens_file = opt_path(v),
            _ => return Err(format!("unknown key `{key}`; keys: {}", KEYS.join(", "))),
        }
        Ok(())
    }

    /// Whether bearer-token authentication is on.
    pub fn auth_enabled(&self) -> bool {
        !self.auth.tokens.is_empty()
    }
}

/// Reads a TOML file into a configuration over the defaults; returns the keys it set.
fn read_file(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let config: Config =
        toml::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for key in KEYS {
        let mut v = Some(&table);
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            v = v.and_then(|t| t.get(*p)).and_then(|x| x.as_table());
        }
        if v.is_some_and(|t| t.contains_key(parts[parts.len() - 1])) {
            keys.push(key.to_string());
        }
    }
    for t in ["auth.token", "source"] {
        let present = match t {
            "source" => table.contains_key("source"),
            _ => table
                .get("auth")
                .and_then(|a| a.as_table())
                .is_some_and(|a| a.contains_key("token")),
        };
        if present {
            keys.push(t.to_string());
        }
    }
    Ok((config, keys))
}

/// Builds the configuration: defaults, then `file`, then `env` (name → value pairs, normally
/// `std::env::vars()`), then `flags` (key → value), then validates it.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let mut loaded = Loaded::default();
    if let Some(path) = file {
        let (config, keys) = read_file(path)?;
        loaded.config = config;
        for k in keys {
            loaded.origins.insert(k, format!("file {}", path.display()));
        }
    }
    let env: BTreeMap<String, String> = env.into_iter().collect();
    for key in KEYS {
        let var = env_var(key);
        if let Some(v) = env.get(&var) {
            loaded
                .config
                .set(key, v)
                .map_err(|e| err(format!("environment variable {var}: {e}")))?;
            loaded.origins.insert(key.to_string(), format!("env {var}"));
        }
    }
    for (key, v) in flags {
        loaded
            .config
            .set(key, v)
            .map_err(|e| err(format!("flag for {key}: {e}")))?;
        loaded.origins.insert(
            key.clone(),
            format!("flag --{}", key.replace(['.', '_'], "-")),
        );
    }
    if let Some(path) = loaded.config.auth.tokens_file.clone() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TokensFile {
            #[serde(default)]
            token: Vec<TokenConfig>,
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            err(format!(
                "auth.tokens_file ({}): cannot read {}: {e}",
                origin(&loaded, "auth.tokens_file"),
                path.display()
            ))
        })?;
        let f: TokensFile =
            toml::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if !f.token.is_empty() {
            loaded.config.auth.tokens.extend(f.token);
            let o = match loaded.origins.get("auth.token") {
                Some(o) => format!("{o} + file {}", path.display()),
                None => format!("file {}", path.display()),
            };
            loaded.origins.insert("auth.token".into(), o);
        }
    }
    validate(&loaded)?;
    Ok(loaded)
}

fn origin(loaded: &Loaded, key: &str) -> String {
    loaded
        .origins
        .get(key)
        .cloned()
        .unwrap_or_else(|| "default".into())
}

/// The listen address resolved; the first one.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("`{addr}` is not a host:port address ({e})"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("`{addr}` resolves to no address"));
    }
    Ok(addrs)
}

fn validate(loaded: &Loaded) -> Result<(), ConfigError> {
    let c = &loaded.config;
    let at = |key: &str| format!("{key} (from {})", origin(loaded, key));
    if c.data_dir.as_os_str().is_empty() {
        return Err(err(format!("{}: must not be empty", at("data_dir"))));
    }
    let listen = resolve(&c.listen).map_err(|e| err(format!("{}: {e}", at("listen"))))?;
    if !matches!(c.log_format.as_str(), "text" | "json") {
        return Err(err(format!(
            "{}: `{}` is not text or json",
            at("log_format"),
            c.log_format
        )));
    }
    if !c.metrics_listen.is_empty() {
        resolve(&c.metrics_listen).map_err(|e| err(format!("{}: {e}", at("metrics_listen"))))?;
    }
    for (key, v) in [
        ("limits.max_page_size", u64::from(c.limits.max_page_size)),
        (
            "limits.max_filter_batch",
            u64::from(c.limits.max_filter_batch),
        ),
        ("limits.max_k", c.limits.max_k as u64),
        ("limits.max_groups", c.limits.max_groups as u64),
        ("limits.max_upload_bytes", c.limits.max_upload_bytes),
    ] {
        if v == 0 {
            return Err(err(format!("{}: must be at least 1", at(key))));
        }
    }
    match (&c.tls.cert, &c.tls.key) {
        (Some(_), None) => {
            return Err(err(format!(
                "{}: tls.cert is set but tls.key is not",
                at("tls.key")
            )));
        }
        (None, Some(_)) => {
            return Err(err(format!(
                "{}: tls.key is set but tls.cert is not",
                at("tls.cert")
            )));
        }
        _ => {}
    }
    if c.tls.client_ca.is_some() && !c.tls.enabled() {
        return Err(err(format!(
            "{}: mTLS needs tls.cert and tls.key too",
            at("tls.client_ca")
        )));
    }
    for key in ["tls.cert", "tls.key", "tls.client_ca"] {
        let p = match key {
            "tls.cert" => &c.tls.cert,
            "tls.key" => &c.tls.key,
            _ => &c.tls.client_ca,
        };
        if let Some(p) = p
            && let Err(e) = std::fs::metadata(p)
        {
            return Err(err(format!(
                "{}: cannot read {}: {e}",
                at(key),
                p.display()
            )));
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, t) in c.auth.tokens.iter().enumerate() {
        let what = format!(
            "auth.token[{i}] `{}` (from {})",
            t.name,
            origin(loaded, "auth.token")
        );
        if t.name.trim().is_empty() {
            return Err(err(format!(
                "auth.token[{i}] (from {}): name is empty",
                origin(loaded, "auth.token")
            )));
        }
        if !names.insert(t.name.clone()) {
            return Err(err(format!("{what}: the name is used twice")));
        }
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!(
                "{what}: sha256 must be 64 hex digits (the output of `printf %s TOKEN | sha256sum`)"
            )));
        }
    }
    if c.auth_enabled()
        && !c.tls.enabled()
        && !c.auth.allow_insecure_tokens
        && listen.iter().any(|a| !a.ip().is_loopback())
    {
        return Err(err(format!(
            "{}: bearer tokens on the non-loopback address {} without TLS would travel in clear text; \
             set tls.cert and tls.key, listen on loopback, or set auth.allow_insecure_tokens = true",
            at("listen"),
            c.listen
        )));
    }
    for (i, s) in c.source.iter().enumerate() {
        s.validate().map_err(|e| {
            err(format!(
                "source[{i}] (from {}): {e}",
                origin(loaded, "source")
            ))
        })?;
    }
    Ok(())
}

impl Loaded {
    /// The effective configuration as TOML, token hashes masked, origins in a leading comment.
    pub fn to_toml(&self) -> String {
        let mut c = self.config.clone();
        for t in &mut c.auth.tokens {
            t.sha256 = "<masked>".into();
        }
        let body = toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot print: {e}\n"));
        let mut out = String::from(
            "# FilterDB effective configuration (precedence: defaults < file < env < flags)\n# origins:\n",
        );
        for key in KEYS.iter().copied().chain(["auth.token", "source"]) {
            out.push_str(&format!("#   {key} = {}\n", origin(self, key)));
        }
        out.push('\n');
        out.push_str(&body);
        out
    }
}

/// SHA-256 hex of a token, as stored in `[[auth.token]] sha256`.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn config_precedence_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\nsnapshot_retain = 3\n[limits]\nmax_k = 50\n",
        )
        .unwrap();
        let l = load(
            Some(&f),
            env(&[
                ("FILTERDB_LISTEN", "127.0.0.1:2"),
                ("FILTERDB_LIMITS_MAX_K", "60"),
            ]),
            &[("limits.max_k".into(), "70".into())],
        )
        .unwrap();
        assert_eq!(l.config.listen, "127.0.0.1:2");
        assert_eq!(l.config.snapshot_retain, 3);
        assert_eq!(l.config.limits.max_k, 70);
        assert_eq!(l.config.shutdown_grace_secs, 30);
        assert_eq!(l.origins["listen"], "env FILTERDB_LISTEN");
        assert!(l.origins["snapshot_retain"].starts_with("file "));
        assert_eq!(l.origins["limits.max_k"], "flag --limits-max-k");
    }

    #[test]
    fn config_errors_name_key_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        let e = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(e.contains("lisen") && e.contains("c.toml"), "{e}");
        std::fs::write(&f, "log_format = \"xml\"\n").unwrap();
        let e = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(e.contains("log_format") && e.contains("c.toml"), "{e}");
        let e = load(None, env(&[("FILTERDB_LIMITS_MAX_K", "many")]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FILTERDB_LIMITS_MAX_K"), "{e}");
    }

    #[test]
    fn config_refuses_tokens_in_clear_on_public_address() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let h = token_hash("secret");
        std::fs::write(&f, format!("listen = \"0.0.0.0:50051\"\n[[auth.token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{h}\"\n"))
            .unwrap();
        let e = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(e.contains("allow_insecure_tokens"), "{e}");
        let l = load(
            Some(&f),
            env(&[("FILTERDB_AUTH_ALLOW_INSECURE_TOKENS", "true")]),
            &[],
        )
        .unwrap();
        assert!(l.config.auth_enabled());
        let printed = l.to_toml();
        assert!(
            !printed.contains(&h) && printed.contains("<masked>"),
            "{printed}"
        );
        let back: Config = toml::from_str(&printed).unwrap();
        assert_eq!(back.listen, "0.0.0.0:50051");
    }

    #[test]
    fn config_defaults_keep_auth_off() {
        let l = load(None, env(&[]), &[]).unwrap();
        assert!(!l.config.auth_enabled());
        assert!(!l.config.tls.enabled());
    }
}
