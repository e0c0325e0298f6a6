//! msghandler's configuration: defaults here, a TOML file over them, `MICROMSG_*`
//! environment variables over that, and command-line flags over everything.
//!
//! A key in the file that no field takes is an error naming it. The environment
//! is read for known keys only: other `MICROMSG_*` variables are left alone (tools
//! and tests share the prefix, e.g. `MICROMSG_ADMIN_SOCKET`, a key of msgserver's),
//! and `--check-config` lists them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

const BACKEND_KEY_ENV: &str = "MICROMSG_BACKEND_KEY";
const TOKEN_SECRET_ENV: &str = "MICROMSG_TOKEN_SECRET";

/// Every key of `etc/msghandler.toml`. Durations are seconds (fractions allowed).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HandlerConfig {
    pub socket: PathBuf,
    pub listen: SocketAddr,
    /// How long the server holds a long-poll that has nothing to deliver.
    pub poll_timeout: f64,
    /// Largest request body accepted; larger ones get 413 without being read.
    pub max_body_bytes: u64,
    /// How long a client may take to send a request's head, counted from when the
    /// connection is ready for it: a new connection, or a keep-alive one after its
    /// last response. Bounds slowloris clients and idle keep-alive connections.
    pub header_read_timeout: f64,
    /// How long a client may take to send a request's body once its head is in; a
    /// body that trickles or never ends is refused and the connection closed.
    pub body_read_timeout: f64,
    /// Origins allowed by CORS; `"*"` allows any.
    pub cors_allowed_origins: Vec<String>,
    /// Worker threads, each with its own runtime and IPC connections; 0 means one
    /// per two CPUs.
    pub threads: usize,
    /// Persistent IPC connections to the core per worker thread (requests are
    /// multiplexed on them).
    pub core_connections: usize,
    /// Requests one IPC connection may have unanswered; parked polls count.
    pub max_in_flight: usize,
    /// Heartbeat period on each IPC connection; three missed beats mean a hung core.
    pub heartbeat_interval: f64,
    /// How long a request waits for a core connection before failing with
    /// `CoreUnavailable` (a long-poll waits up to its own timeout instead).
    pub core_wait: f64,
    /// On SIGTERM, how long open HTTP connections get to finish before exit.
    pub shutdown_grace: f64,
    /// The shared secret of the backend API (`/v1/backend/...`); without it (or
    /// `backend_key_file`) that API is disabled.
    pub backend_key: Option<Secret>,
    /// A file whose contents (trimmed) are the backend key, so that the secret can
    /// stay out of the configuration file and the environment.
    pub backend_key_file: Option<PathBuf>,
    /// Seconds between WebSocket pings; a connection silent for three is closed.
    pub ws_ping_interval: f64,
    /// How long a write to a WebSocket (or an SSE stream) may take before the
    /// client counts as not reading and is dropped.
    pub ws_send_timeout: f64,
    /// Bytes a WebSocket may have waiting to be written before the client counts as
    /// not reading; more than the largest message the core accepts.
    pub ws_max_buffer: usize,
    /// Seconds between comment lines on an idle SSE stream, so that proxies keep it.
    pub sse_heartbeat: f64,
    /// Messages a WebSocket client is given ahead of its acknowledgements when it
    /// asks for no window of its own.
    pub ws_default_window: u32,
    /// The largest window a WebSocket client may ask for.
    pub ws_max_window: u32,
    /// `"none"` (x0: anyone may act for any session) or `"token"` (a signed JWT per
    /// session; see [`crate::auth`]).
    pub auth: String,
    /// `HS256` (shared secret), `EdDSA` or `RS256` (the backend's public key).
    pub token_algorithm: String,
    pub token_secret: Option<Secret>,
    pub token_secret_file: Option<PathBuf>,
    pub token_public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss` / `aud`.
    pub token_issuer: Option<String>,
    pub token_audience: Option<String>,
    /// Seconds of clock difference forgiven on `exp` and `nbf`.
    pub token_leeway: u64,
    /// Requests per second from one client address (sustained, and the burst
    /// above it); 0 turns the limit off.
    pub rate_limit_ip: u32,
    pub rate_limit_ip_burst: u32,
    /// Requests (and WebSocket frames) per second for one session.
    pub rate_limit_session: u32,
    pub rate_limit_session_burst: u32,
    /// Open connections from one address; 0 turns the limit off.
    pub max_connections_per_ip: usize,
    /// Proxies (addresses or networks) whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
    /// Who may read `/metrics` (addresses or networks), judged on the client
    /// address after `trusted_proxies`.
    pub metrics_allow: Vec<String>,
    pub log: String,
    pub log_format: LogFormat,
}

pub use micromsg_logging::LogFormat;

/// A string that is never shown: `HandlerConfig` derives `Debug`, and a secret in a
/// log line or a panic message is a leaked secret.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            socket: ipc::paths::default_socket_path(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            poll_timeout: 10.0,
            max_body_bytes: 1024 * 1024,
            header_read_timeout: 10.0,
            body_read_timeout: 30.0,
            cors_allowed_origins: vec!["*".into()],
            threads: 0,
            core_connections: 1,
            max_in_flight: 65_536,
            heartbeat_interval: 5.0,
            core_wait: 1.0,
            shutdown_grace: 5.0,
            backend_key: None,
            backend_key_file: None,
            ws_ping_interval: 20.0,
            ws_send_timeout: 10.0,
            ws_max_buffer: 1024 * 1024,
            sse_heartbeat: 15.0,
            ws_default_window: 32,
            ws_max_window: 1024,
            auth: "none".into(),
            token_algorithm: "HS256".into(),
            token_secret: None,
            token_secret_file: None,
            token_public_key_file: None,
            token_issuer: None,
            token_audience: None,
            token_leeway: 5,
            rate_limit_ip: 0,
            rate_limit_ip_burst: 0,
            rate_limit_session: 0,
            rate_limit_session_burst: 0,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            metrics_allow: vec!["127.0.0.1".into(), "::1".into()],
            log: "info".into(),
            log_format: LogFormat::Auto,
        }
    }
}

impl HandlerConfig {
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Ok(Self::load_reporting(file)?.0)
    }

    /// The configuration, and the `MICROMSG_*` environment variables that name no
    /// key and were therefore ignored.
    pub fn load_reporting(file: Option<&std::path::Path>) -> anyhow::Result<(Self, Vec<String>)> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            reject_unknown_keys::<HandlerConfig>(file, "etc/msghandler.toml")?;
            builder = builder.add_source(config::File::from(file).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("MICROMSG")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("cors_allowed_origins")
                .with_list_parse_key("trusted_proxies")
                .with_list_parse_key("metrics_allow"),
        );
        let loaded = builder.build().context("reading configuration")?;
        let mut ignored = Vec::new();
        let mut config: HandlerConfig = serde_ignored::deserialize(loaded, |key| {
            ignored.push(format!("MICROMSG_{}", key.to_string().to_uppercase()));
        })
        .context("invalid configuration (see etc/msghandler.toml for every key)")?;
        // `try_parsing` would read a key such as "007" or "12e34" as a number and
        // hand back "7" or "inf": the key's text is taken as it is.
        if let Some(raw) = std::env::var_os(BACKEND_KEY_ENV) {
            let raw = raw
                .into_string()
                .map_err(|_| anyhow::anyhow!("{BACKEND_KEY_ENV} is not UTF-8"))?;
            config.backend_key = Some(Secret(raw));
        }
        if let Some(raw) = std::env::var_os(TOKEN_SECRET_ENV) {
            let raw = raw
                .into_string()
                .map_err(|_| anyhow::anyhow!("{TOKEN_SECRET_ENV} is not UTF-8"))?;
            config.token_secret = Some(Secret(raw));
        }
        Ok((config, ignored))
    }
}

/// Fails naming every key of `file` that no field of `T` takes. The file alone is
/// read here, so that the environment, which carries unrelated `MICROMSG_*`
/// variables, cannot trip it. (msgserver has the same rule in its own config.rs:
/// the two binaries share only the ipc crate.)
pub fn reject_unknown_keys<T: DeserializeOwned>(
    file: &std::path::Path,
    documented_in: &str,
) -> anyhow::Result<()> {
    let source = config::Config::builder()
        .add_source(config::File::from(file).required(true))
        .build()
        .with_context(|| format!("reading {}", file.display()))?;
    let mut unknown = Vec::new();
    let _: T = serde_ignored::deserialize(source, |key| unknown.push(format!("`{key}`")))
        .with_context(|| format!("invalid configuration in {}", file.display()))?;
    if !unknown.is_empty() {
        bail!(
            "{}: unknown key{} {} (see {documented_in} for every key)",
            file.display(),
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", ")
        );
    }
    Ok(())
}

/// A secret given inline (`key`) or as a file's trimmed contents (`key_file`);
/// `None` when neither is set. Both at once, or an empty secret, is a mistake the
/// operator should hear about at start.
pub fn secret_text(
    key: &str,
    inline: Option<&Secret>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    let text = match (inline, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => anyhow::bail!("set {key} or {key}_file, not both"),
        (Some(Secret(text)), None) => text.trim().to_owned(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading {key}_file {}", file.display()))?
            .trim()
            .to_owned(),
    };
    anyhow::ensure!(
        !text.is_empty(),
        "{key} is empty; set a long random string or leave it unset"
    );
    Ok(Some(text))
}

/// Addresses or networks (`10.0.0.0/8`, `::1`) of the list `key`: a plain
/// address is the network of just itself.
pub fn networks(key: &str, entries: &[String]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    entries
        .iter()
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| anyhow::anyhow!("{key}: {entry:?} is not an IP address or network"))
        })
        .collect()
}

pub fn seconds(key: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .with_context(|| format!("{key} = {secs} is not a duration in seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/msghandler.toml");

    /// The field names serde knows for `T`, captured from the `deserialize_struct`
    /// call its derived impl makes.
    fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
        use serde::de::{self, Visitor};
        #[derive(Debug)]
        struct Fields(&'static [&'static str]);
        impl std::fmt::Display for Fields {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("fields captured")
            }
        }
        impl std::error::Error for Fields {}
        impl de::Error for Fields {
            fn custom<M: std::fmt::Display>(_: M) -> Self {
                Fields(&[])
            }
        }
        struct Capture;
        impl<'de> de::Deserializer<'de> for Capture {
            type Error = Fields;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
                Err(Fields(&[]))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Fields> {
                Err(Fields(fields))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 u8 u16 u32 u64 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct
                map enum identifier ignored_any
            }
        }
        T::deserialize(Capture).map(|_| ()).unwrap_err().0
    }

    /// The example file with every commented-out `# key = value` line of a
    /// top-level key switched on.
    fn example_with_every_key() -> (String, std::collections::BTreeSet<String>) {
        let fields = field_names::<HandlerConfig>();
        let text = std::fs::read_to_string(EXAMPLE).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        let mut out = String::new();
        for line in text.lines() {
            let plain = line.strip_prefix("# ").unwrap_or(line);
            if let Some(table) = plain.strip_prefix("[[").and_then(|t| t.strip_suffix("]]")) {
                keys.insert(table.to_owned());
            }
            let key = plain.split(" = ").next().unwrap_or("").trim();
            let active = |key: &str| text.lines().any(|l| l.starts_with(&format!("{key} = ")));
            if plain.contains(" = ") && fields.contains(&key) {
                // A commented example of a key also set is documentation, not a
                // second value.
                if keys.insert(key.to_owned()) && (plain == line || !active(key)) {
                    out.push_str(plain);
                } else {
                    out.push_str(line);
                }
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        (out, keys)
    }

    #[test]
    fn the_example_file_has_no_unknown_key_and_documents_every_key() {
        let path = std::path::Path::new(EXAMPLE);
        reject_unknown_keys::<HandlerConfig>(path, "etc/msghandler.toml").unwrap();
        HandlerConfig::load(Some(path)).unwrap();
        let (all, documented) = example_with_every_key();
        let dir = tempfile::tempdir().unwrap();
        let with_all = dir.path().join("all.toml");
        std::fs::write(&with_all, all).unwrap();
        reject_unknown_keys::<HandlerConfig>(&with_all, "etc/msghandler.toml").unwrap();
        let missing: Vec<_> = field_names::<HandlerConfig>()
            .iter()
            .filter(|f| !documented.contains(**f))
            .collect();
        assert!(
            missing.is_empty(),
            "not in etc/msghandler.toml: {missing:?}"
        );
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("front.toml");
        std::fs::write(&file, "poll_timeout = 3\nmetrics_alow = []\n").unwrap();
        let err = format!("{:#}", HandlerConfig::load(Some(&file)).unwrap_err());
        assert!(err.contains("unknown key `metrics_alow`"), "{err}");
        std::fs::write(
            &file,
            "log_format = \"json\"\nmetrics_allow = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        let config = HandlerConfig::load(Some(&file)).unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.metrics_allow, ["10.0.0.0/8"]);
    }
}
