//! msgserver's configuration: defaults here, a TOML file over them, `MICROMSG_*`
//! environment variables over that, and command-line flags over everything.
//!
//! A key in the file that no field takes is an error naming it: a typo must not
//! silently leave a default in force. The environment is read for known keys
//! only: other `MICROMSG_*` variables are left alone (tools and tests share the
//! prefix, e.g. `MICROMSG_BIN_DIR`), and `--check-config` lists them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::broker::{BrokerConfig, DeliveryMode, OverflowPolicy};
use crate::routing::{ChannelSettings, Pattern};

/// Every key of `etc/msgserver.toml`. Durations are seconds (fractions allowed) so
/// that a file, an environment variable and a test all write them the same way.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Octal, as chmod takes it.
    pub socket_mode: String,
    pub socket_owner: String,
    pub socket_group: String,
    /// Who the core becomes after binding its socket, when started as root.
    pub user: String,
    pub group: String,
    /// Peers allowed in addition to root, our own uid and the socket's group.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// The operator's socket (msgctl); unset puts it beside `socket`
    /// ([`ServerConfig::admin_socket`]).
    pub admin_socket: Option<PathBuf>,
    /// Octal; never looser than 0750 ([`ServerConfig::admin_socket_mode`]).
    pub admin_socket_mode: String,
    /// Group of the admin socket when started as root; unset keeps root's.
    pub admin_group: Option<String>,
    /// Operators allowed on the admin socket besides root and the uid that started
    /// the core.
    pub admin_uids: Vec<u32>,
    pub max_sessions: usize,
    pub max_queued_bytes: u64,
    pub delivery: DeliveryMode,
    pub mailbox_max_len: usize,
    pub overflow: OverflowPolicy,
    pub max_payload_bytes: usize,
    pub message_ttl: f64,
    pub visibility_timeout: f64,
    pub idle_mailbox_timeout: f64,
    pub max_poll_timeout: f64,
    pub max_deliveries: u32,
    pub dedup_window: f64,
    pub session_timeout: f64,
    pub kick_retention: f64,
    pub max_reply_ttl: f64,
    /// Per channel pattern, first match wins (`[[channels]]` tables).
    pub channels: Vec<ChannelConfig>,
    /// Where durable storage lives; unset keeps everything in memory only.
    pub data_dir: Option<PathBuf>,
    pub fsync: FsyncPolicy,
    pub fsync_interval: f64,
    pub compact_min_bytes: u64,
    pub max_in_flight: usize,
    pub heartbeat_timeout: f64,
    pub log: String,
    pub log_format: LogFormat,
    /// Who owns the state: this process (`embedded`), or a Redis shared with other
    /// cores (`redis`, docs/CLUSTER.md).
    pub backend: Backend,
    pub redis_url: String,
    pub redis_prefix: String,
    /// Seconds a Redis call may take before its request fails with StoreUnavailable.
    pub redis_timeout: f64,
    /// This core's name in the cluster; unset: `<hostname>-<pid>`.
    pub node_name: Option<String>,
}

/// Where the core's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process: memory only, or the log in `data_dir`.
    Embedded,
    /// In Redis, shared by every core with the same `redis_prefix`.
    Redis,
}

pub use micromsg_logging::LogFormat;

/// One `[[channels]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub pattern: String,
    #[serde(default)]
    pub history_len: usize,
    /// Seconds; 0 keeps history of any age (up to `history_len`).
    #[serde(default)]
    pub history_secs: f64,
    #[serde(default)]
    pub max_pending: usize,
    #[serde(default)]
    pub priority: i32,
}

/// When stored records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// A reply that depends on a change goes out only after the change is fsynced;
    /// everything that arrives meanwhile shares the next fsync (group commit).
    Always,
    /// Written at once, fsynced every `fsync_interval`: a power loss can cost that
    /// much, a crash of the process nothing.
    Interval,
    /// Written at once, fsynced only at a clean stop: survives a crash of the
    /// process, not of the machine.
    Never,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let broker = BrokerConfig::default();
        ServerConfig {
            socket: ipc::paths::default_socket_path(),
            socket_mode: "0770".into(),
            socket_owner: "www-data".into(),
            socket_group: "www-data".into(),
            user: "www-data".into(),
            group: "www-data".into(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            admin_socket: None,
            admin_socket_mode: "0750".into(),
            admin_group: None,
            admin_uids: Vec::new(),
            max_sessions: broker.max_sessions,
            max_queued_bytes: broker.max_queued_bytes,
            delivery: broker.delivery,
            mailbox_max_len: broker.mailbox_max_len,
            overflow: broker.overflow,
            max_payload_bytes: broker.max_payload_bytes,
            message_ttl: broker.message_ttl.map_or(0.0, |d| d.as_secs_f64()),
            visibility_timeout: broker.visibility_timeout.as_secs_f64(),
            idle_mailbox_timeout: broker.idle_mailbox_timeout.as_secs_f64(),
            max_poll_timeout: broker.max_poll_timeout.as_secs_f64(),
            max_deliveries: broker.max_deliveries,
            dedup_window: broker.dedup_window.as_secs_f64(),
            session_timeout: broker.session_timeout.as_secs_f64(),
            kick_retention: broker.kick_retention.as_secs_f64(),
            max_reply_ttl: broker.max_reply_ttl.as_secs_f64(),
            channels: Vec::new(),
            data_dir: None,
            fsync: FsyncPolicy::Always,
            fsync_interval: 0.05,
            compact_min_bytes: 64 * 1024 * 1024,
            max_in_flight: 65_536,
            heartbeat_timeout: 15.0,
            log: "info".into(),
            log_format: LogFormat::Auto,
            backend: Backend::Embedded,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_prefix: "micromsg".into(),
            redis_timeout: 2.0,
            node_name: None,
        }
    }
}

impl ServerConfig {
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Ok(Self::load_reporting(file)?.0)
    }

    /// The configuration, and the `MICROMSG_*` environment variables that name no
    /// key and were therefore ignored.
    pub fn load_reporting(file: Option<&std::path::Path>) -> anyhow::Result<(Self, Vec<String>)> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            reject_unknown_keys::<ServerConfig>(file, "etc/msgserver.toml")?;
            builder = builder.add_source(config::File::from(file).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("MICROMSG")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("allowed_uids")
                .with_list_parse_key("allowed_gids")
                .with_list_parse_key("admin_uids"),
        );
        let loaded = builder.build().context("reading configuration")?;
        let mut ignored = Vec::new();
        let config = serde_ignored::deserialize(loaded, |key| {
            ignored.push(format!("MICROMSG_{}", key.to_string().to_uppercase()));
        })
        .context("invalid configuration (see etc/msgserver.toml for every key)")?;
        Ok((config, ignored))
    }

    /// Everything about the configuration that would stop a start, checked without
    /// touching a socket or the data directory: what `--check-config` runs, and
    /// what a start runs first.
    pub fn validate(&self) -> anyhow::Result<()> {
        tracing_subscriber::EnvFilter::try_new(&self.log)
            .with_context(|| format!("log filter {:?}", self.log))?;
        self.socket_mode()?;
        self.admin_socket_mode()?;
        self.broker()?;
        self.fsync_interval()?;
        self.heartbeat_timeout()?;
        anyhow::ensure!(self.max_in_flight > 0, "max_in_flight must be more than 0");
        if self.backend == Backend::Redis {
            self.cluster()?;
        }
        Ok(())
    }

    /// The Redis backend's settings, checked.
    pub fn cluster(&self) -> anyhow::Result<crate::cluster::Settings> {
        anyhow::ensure!(
            self.data_dir.is_none(),
            "data_dir is for the embedded backend; with backend = \"redis\" Redis keeps the data"
        );
        redis::parse_redis_url(&self.redis_url).with_context(|| {
            format!(
                "redis_url {:?} is not a redis:// or redis+unix:// URL",
                self.redis_url
            )
        })?;
        anyhow::ensure!(
            !self.redis_prefix.is_empty() && !self.redis_prefix.contains(['*', '?', '[', ' ']),
            "redis_prefix {:?} must be non-empty, without spaces or glob characters",
            self.redis_prefix
        );
        let node = match &self.node_name {
            Some(name) => name.clone(),
            None => format!(
                "{}-{}",
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "core".into()),
                std::process::id()
            ),
        };
        anyhow::ensure!(
            !node.is_empty() && !node.contains(['|', ' ']),
            "node_name {node:?} must be non-empty, without '|' or spaces"
        );
        Ok(crate::cluster::Settings {
            url: self.redis_url.clone(),
            prefix: self.redis_prefix.clone(),
            timeout: seconds("redis_timeout", self.redis_timeout)?,
            node,
            broker: self.broker()?,
        })
    }

    pub fn socket_mode(&self) -> anyhow::Result<u32> {
        octal_mode("socket_mode", &self.socket_mode)
    }

    /// Where the admin socket is: as configured, else beside the main socket (after
    /// `--socket` has moved it).
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| ipc::paths::admin_socket_beside(&self.socket))
    }

    /// The admin socket's mode, refused when it gives "other" anything, or the
    /// group write. Connecting needs write permission, so group write would make
    /// the whole group operators; it is allowed only toward an `admin_group` chosen
    /// for that purpose.
    pub fn admin_socket_mode(&self) -> anyhow::Result<u32> {
        let mode = octal_mode("admin_socket_mode", &self.admin_socket_mode)?;
        if mode & 0o007 != 0 {
            bail!(
                "admin_socket_mode {:?} gives other users access to the admin socket; \
                 use 0750 or stricter",
                self.admin_socket_mode
            );
        }
        if mode & 0o020 != 0 && self.admin_group.is_none() {
            bail!(
                "admin_socket_mode {:?} lets the socket's group connect (group write); \
                 use 0750 or stricter, or set admin_group to a group of operators",
                self.admin_socket_mode
            );
        }
        Ok(mode)
    }

    pub fn broker(&self) -> anyhow::Result<BrokerConfig> {
        Ok(BrokerConfig {
            delivery: self.delivery,
            mailbox_max_len: self.mailbox_max_len.max(1),
            overflow: self.overflow,
            max_payload_bytes: self.max_payload_bytes,
            message_ttl: match self.message_ttl {
                0.0 => None,
                secs => Some(seconds("message_ttl", secs)?),
            },
            visibility_timeout: seconds("visibility_timeout", self.visibility_timeout)?,
            idle_mailbox_timeout: seconds("idle_mailbox_timeout", self.idle_mailbox_timeout)?,
            max_poll_timeout: seconds("max_poll_timeout", self.max_poll_timeout)?,
            max_deliveries: self.max_deliveries,
            dedup_window: seconds("dedup_window", self.dedup_window)?,
            session_timeout: seconds("session_timeout", self.session_timeout)?,
            kick_retention: seconds("kick_retention", self.kick_retention)?,
            max_reply_ttl: seconds("max_reply_ttl", self.max_reply_ttl)?,
            max_sessions: self.max_sessions,
            max_queued_bytes: self.max_queued_bytes,
            channels: self
                .channels
                .iter()
                .map(ChannelConfig::settings)
                .collect::<anyhow::Result<_>>()?,
        })
    }

    pub fn fsync_interval(&self) -> anyhow::Result<Duration> {
        seconds("fsync_interval", self.fsync_interval)
    }

    pub fn heartbeat_timeout(&self) -> anyhow::Result<Duration> {
        seconds("heartbeat_timeout", self.heartbeat_timeout)
    }
}

impl ChannelConfig {
    fn settings(&self) -> anyhow::Result<ChannelSettings> {
        let pattern = Pattern::parse(&self.pattern)
            .map_err(|e| anyhow::anyhow!("[[channels]] pattern {:?}: {e}", self.pattern))?;
        Ok(ChannelSettings {
            pattern,
            history_len: self.history_len,
            history_age: match self.history_secs {
                0.0 => None,
                secs => Some(seconds("history_secs", secs)?),
            },
            max_pending: self.max_pending,
            priority: self.priority,
        })
    }
}

/// Fails naming every key of `file` that no field of `T` takes. The file alone is
/// read here, so that the environment, which carries unrelated `MICROMSG_*`
/// variables, cannot trip it.
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

fn octal_mode(key: &str, text: &str) -> anyhow::Result<u32> {
    let digits = text.trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .with_context(|| format!("{key} {text:?} is not an octal mode"))?;
    if mode > 0o777 {
        bail!("{key} {text:?} is out of range");
    }
    Ok(mode)
}

fn seconds(key: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .with_context(|| format!("{key} = {secs} is not a duration in seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_admin_mode(mode: &str, group: Option<&str>) -> ServerConfig {
        ServerConfig {
            admin_socket_mode: mode.into(),
            admin_group: group.map(str::to_owned),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn admin_socket_mode_looser_than_0750_is_refused() {
        for ok in ["0750", "0700", "0600", "0740"] {
            assert!(
                with_admin_mode(ok, None).admin_socket_mode().is_ok(),
                "{ok}"
            );
        }
        for loose in ["0751", "0755", "0777", "0770", "0754"] {
            let err = with_admin_mode(loose, None)
                .admin_socket_mode()
                .unwrap_err();
            assert!(
                format!("{err:#}").contains("0750 or stricter"),
                "{loose}: {err:#}"
            );
        }
        // Group write only toward a group chosen to be operators.
        assert!(
            with_admin_mode("0770", Some("msgadmin"))
                .admin_socket_mode()
                .is_ok()
        );
        assert!(
            with_admin_mode("0775", Some("msgadmin"))
                .admin_socket_mode()
                .is_err()
        );
    }

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/msgserver.toml");

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
        let fields = field_names::<ServerConfig>();
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
        reject_unknown_keys::<ServerConfig>(path, "etc/msgserver.toml").unwrap();
        ServerConfig::load(Some(path)).unwrap().validate().unwrap();
        let (all, documented) = example_with_every_key();
        let dir = tempfile::tempdir().unwrap();
        let with_all = dir.path().join("all.toml");
        std::fs::write(&with_all, all).unwrap();
        reject_unknown_keys::<ServerConfig>(&with_all, "etc/msgserver.toml").unwrap();
        let missing: Vec<_> = field_names::<ServerConfig>()
            .iter()
            .filter(|f| !documented.contains(**f))
            .collect();
        assert!(missing.is_empty(), "not in etc/msgserver.toml: {missing:?}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("core.toml");
        std::fs::write(&file, "delivery = \"ack\"\nvisiblity_timeout = 3\n").unwrap();
        let err = format!("{:#}", ServerConfig::load(Some(&file)).unwrap_err());
        assert!(err.contains("unknown key `visiblity_timeout`"), "{err}");
        std::fs::write(&file, "log_format = \"yaml\"\n").unwrap();
        assert!(ServerConfig::load(Some(&file)).is_err());
        std::fs::write(&file, "log_format = \"json\"\n").unwrap();
        let config = ServerConfig::load(Some(&file)).unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn a_bad_value_fails_validation_before_anything_is_bound() {
        let bad = [
            ServerConfig {
                log: "info,=[".into(),
                ..ServerConfig::default()
            },
            ServerConfig {
                socket_mode: "999".into(),
                ..ServerConfig::default()
            },
            ServerConfig {
                visibility_timeout: -1.0,
                ..ServerConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        ServerConfig::default().validate().unwrap();
    }

    #[test]
    fn admin_socket_defaults_to_beside_the_main_socket() {
        let config = ServerConfig {
            socket: "/tmp/t/core.sock".into(),
            ..ServerConfig::default()
        };
        assert_eq!(
            config.admin_socket(),
            PathBuf::from("/tmp/t/core-admin.sock")
        );
        let config = ServerConfig {
            admin_socket: Some("/elsewhere/a.sock".into()),
            ..config
        };
        assert_eq!(config.admin_socket(), PathBuf::from("/elsewhere/a.sock"));
    }
}
