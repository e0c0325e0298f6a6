//! The core's listening socket: claiming the path, permissions, privilege drop and
//! the check of who connects.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{Context, bail};
use nix::unistd::{Group, Uid, User, chown, setgid, setgroups, setuid};
use tracing::{info, warn};

use crate::config::ServerConfig;

/// Binds the socket path, taking it over from a dead server but never from a live
/// one, and applies the configured mode and (as root) owner. Returns the listener
/// and the socket's group.
pub fn bind(config: &ServerConfig) -> anyhow::Result<(UnixListener, u32)> {
    let path = config.socket.as_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    claim_path(path)?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode()?))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if Uid::effective().is_root() {
        let owner = user(&config.socket_owner)?;
        let group = group(&config.socket_group)?;
        chown(path, Some(owner.uid), Some(group.gid)).with_context(|| {
            format!("chown {} to {}:{}", path.display(), owner.name, group.name)
        })?;
    } else {
        info!(
            socket = %path.display(),
            "not running as root: socket keeps our own owner and group, no privilege drop"
        );
    }
    let gid = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .gid();
    Ok((listener, gid))
}

/// A socket file that nobody answers on is what a killed server leaves behind: it
/// is removed. One that answers belongs to a live server, and anything that is not
/// a socket is not ours to delete.
fn claim_path(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match UnixStream::connect(path) {
        Ok(_) => bail!(
            "another msgserver is already running on {} (it accepted a connection)",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            warn!(socket = %path.display(), "removing stale socket left by a server that is gone");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("probing existing socket {}", path.display())),
    }
}

/// As root, become the configured user for good; otherwise do nothing.
pub fn drop_privileges(config: &ServerConfig) -> anyhow::Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let user = user(&config.user)?;
    let group = group(&config.group)?;
    // Order matters: supplementary groups and gid can only be changed while still root.
    setgroups(&[group.gid]).context("setgroups")?;
    setgid(group.gid).context("setgid")?;
    setuid(user.uid).context("setuid")?;
    if setuid(Uid::from_raw(0)).is_ok() {
        bail!("privilege drop failed: could regain root after setuid");
    }
    info!(user = %user.name, group = %group.name, "dropped root privileges");
    Ok(())
}

/// Creates the data directory (mode 0700) and, as root, gives it to the user the
/// core is about to become, so that everything inside is created by that user.
pub fn prepare_data_dir(config: &ServerConfig, dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    if Uid::effective().is_root() {
        let user = user(&config.user)?;
        let group = group(&config.group)?;
        chown(dir, Some(user.uid), Some(group.gid)).with_context(|| {
            format!("handing data directory {} to {}", dir.display(), user.name)
        })?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            chown(&path, Some(user.uid), Some(group.gid))
                .with_context(|| format!("handing {} to {}", path.display(), user.name))?;
        }
    }
    Ok(())
}

fn user(name: &str) -> anyhow::Result<User> {
    User::from_name(name)
        .with_context(|| format!("looking up user {name:?}"))?
        .with_context(|| {
            format!("user {name:?} does not exist (set user/socket_owner in the config)")
        })
}

fn group(name: &str) -> anyhow::Result<Group> {
    Group::from_name(name)
        .with_context(|| format!("looking up group {name:?}"))?
        .with_context(|| {
            format!("group {name:?} does not exist (set group/socket_group in the config)")
        })
}

/// Who may talk to the core, checked with SO_PEERCRED on every connection as a
/// second line behind the socket's file mode.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    uids: HashSet<u32>,
    gids: HashSet<u32>,
}

impl PeerPolicy {
    /// Root, ourselves, the socket's group, and whatever the configuration adds.
    /// Built after the privilege drop (so "ourselves" is who we became) from the
    /// socket's gid read before it (the socket's directory may not be ours to read
    /// afterwards).
    pub fn new(config: &ServerConfig, socket_gid: u32) -> Self {
        let mut uids: HashSet<u32> = config.allowed_uids.iter().copied().collect();
        uids.insert(0);
        uids.insert(Uid::effective().as_raw());
        let mut gids: HashSet<u32> = config.allowed_gids.iter().copied().collect();
        gids.insert(socket_gid);
        PeerPolicy { uids, gids }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> ServerConfig {
        ServerConfig {
            socket: dir.join("core.sock"),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn stale_socket_is_replaced_but_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let live = bind(&config).unwrap();
        let err = bind(&config).unwrap_err();
        assert!(format!("{err:#}").contains("already running"), "{err:#}");
        drop(live); // the file stays behind, as after a crash
        assert!(config.socket.exists());
        bind(&config).expect("stale socket is taken over");
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        std::fs::write(&config.socket, b"precious").unwrap();
        let err = bind(&config).unwrap_err();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read(&config.socket).unwrap(), b"precious");
    }

    #[test]
    fn socket_gets_the_configured_mode() {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            socket_mode: "0750".into(),
            ..config_in(dir.path())
        };
        let (_listener, _) = bind(&config).unwrap();
        let mode = std::fs::metadata(&config.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
    }

    #[test]
    fn peer_policy_admits_root_and_the_socket_group_only() {
        let policy = PeerPolicy {
            uids: HashSet::from([0, 1000]),
            gids: HashSet::from([33]),
        };
        assert!(policy.allows(0, 0));
        assert!(policy.allows(1000, 1000));
        assert!(policy.allows(4242, 33));
        assert!(!policy.allows(4242, 4242));
    }
}
