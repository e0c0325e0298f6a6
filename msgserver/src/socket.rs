//! The core's listening socket: claiming the path, permissions, privilege drop and
//! the check of who connects.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{Context, bail};
use nix::unistd::{Group, Uid, User, chown, seteuid, setgid, setgroups, setuid};
use tracing::info;

use crate::config::ServerConfig;

/// Binds the main socket path, taking it over from a dead server but never from a
/// live one, and applies the configured mode and (as root) owner. Returns the
/// listener and the socket's group.
pub fn bind(config: &ServerConfig) -> anyhow::Result<(UnixListener, u32)> {
    let path = config.socket.as_path();
    let owner = if Uid::effective().is_root() {
        let owner = user(&config.socket_owner)?;
        let group = group(&config.socket_group)?;
        Some((owner, group))
    } else {
        info!(
            socket = %path.display(),
            "not running as root: socket keeps our own owner and group, no privilege drop"
        );
        None
    };
    let listener = bind_at(path, config.socket_mode()?, owner)?;
    let gid = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .gid();
    Ok((listener, gid))
}

/// Binds the operator's socket: as root, owned by root and `admin_group` (root's
/// group by default), never looser than 0750. Bound before the privilege drop, it
/// keeps accepting afterwards, while the user the core becomes (the one msghandler
/// runs as) cannot connect to it.
pub fn bind_admin(config: &ServerConfig) -> anyhow::Result<UnixListener> {
    let path = config.admin_socket();
    let mode = config.admin_socket_mode()?;
    let owner = if Uid::effective().is_root() {
        let root = User::from_uid(Uid::from_raw(0))
            .context("looking up root")?
            .context("there is no user with uid 0")?;
        let group = match &config.admin_group {
            Some(name) => group(name)?,
            None => Group::from_gid(root.gid)
                .context("looking up root's group")?
                .context("root's group does not exist")?,
        };
        Some((root, group))
    } else {
        None
    };
    bind_at(&path, mode, owner)
}

fn bind_at(path: &Path, mode: u32, owner: Option<(User, Group)>) -> anyhow::Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some((owner, group)) = owner {
        chown(path, Some(owner.uid), Some(group.gid)).with_context(|| {
            format!("chown {} to {}:{}", path.display(), owner.name, group.name)
        })?;
    }
    Ok(listener)
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
    match probe(path, &meta) {
        Ok(_) => bail!(
            "another msgserver is already running on {} (it accepted a connection)",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            // Not a warning: under systemd every restart finds one (after the
            // privilege drop the core may not unlink its socket from the
            // root-owned /run/micromsg), and a crash is systemd's to report.
            info!(socket = %path.display(), "removing stale socket left by a server that is gone");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("probing existing socket {}", path.display())),
    }
}

/// Connects to the socket file at `path`, to learn whether a server answers on it.
/// Root may be refused: under the systemd unit it holds no CAP_DAC_OVERRIDE, and
/// since the last start the main socket belongs to the user msghandler runs as
/// (mode 0770). That user may connect, so root asks again as it, for this one
/// call, before any thread that could act meanwhile exists.
fn probe(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<UnixStream> {
    match UnixStream::connect(path) {
        Err(e)
            if e.kind() == ErrorKind::PermissionDenied
                && Uid::effective().is_root()
                && meta.uid() != 0 =>
        {
            seteuid(Uid::from_raw(meta.uid()))?;
            let answer = UnixStream::connect(path);
            // Back to uid 0 is always allowed while the real uid is 0; failing
            // would leave the process half dropped, so it must not go on.
            seteuid(Uid::from_raw(0)).expect("returning to euid 0 after probing the socket");
            answer
        }
        other => other,
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

/// Creates the data directory (mode 0700) and, as root, gives it and what is in
/// it to the user the core is about to become, so that everything inside is
/// created by that user. What is inside goes first, while the directory may still
/// be root's to read: under the systemd unit root holds no CAP_DAC_OVERRIDE nor
/// CAP_DAC_READ_SEARCH, and cannot look into a directory an earlier start handed
/// over (which needs nothing more).
pub fn prepare_data_dir(config: &ServerConfig, dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let user = user(&config.user)?;
    let group = group(&config.group)?;
    let meta = std::fs::metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    let handed_over = (meta.uid(), meta.gid()) == (user.uid.as_raw(), group.gid.as_raw());
    let listing = || format!("listing data directory {}", dir.display());
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.with_context(listing)?.path();
                chown(&path, Some(user.uid), Some(group.gid))
                    .with_context(|| format!("handing {} to {}", path.display(), user.name))?;
            }
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied && handed_over => {}
        Err(e) => return Err(e).with_context(listing),
    }
    if !handed_over {
        chown(dir, Some(user.uid), Some(group.gid)).with_context(|| {
            format!("handing data directory {} to {}", dir.display(), user.name)
        })?;
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

/// Who may use the admin socket, checked with SO_PEERCRED: root, the uid that
/// started the core (so a developer running it without root can use msgctl) and
/// `admin_uids`. Never the user the core drops to merely for being it: msghandler
/// runs as that user, and a compromised front must not become an operator. No
/// group grants anything here.
#[derive(Debug, Clone)]
pub struct AdminPolicy {
    uids: HashSet<u32>,
    started_by: u32,
}

impl AdminPolicy {
    /// `started_by` is the real uid read before any privilege drop.
    pub fn new(started_by: u32, admin_uids: &[u32]) -> Self {
        let mut uids: HashSet<u32> = admin_uids.iter().copied().collect();
        uids.insert(0);
        uids.insert(started_by);
        AdminPolicy { uids, started_by }
    }

    /// As [`AdminPolicy::new`], refusing a configuration that names the user the
    /// core drops to (which is msghandler's) in `admin_uids`.
    pub fn for_config(config: &ServerConfig, started_by: u32) -> anyhow::Result<Self> {
        if Uid::effective().is_root() {
            let dropped_to = user(&config.user)?;
            if config.admin_uids.contains(&dropped_to.uid.as_raw()) {
                bail!(
                    "admin_uids contains uid {} ({}), the user the core drops to and \
                     msghandler runs as: that would make every handler an operator",
                    dropped_to.uid,
                    dropped_to.name
                );
            }
        }
        Ok(AdminPolicy::new(started_by, &config.admin_uids))
    }

    pub fn allows(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }

    /// What a refused peer is told.
    pub fn refusal(&self, uid: u32) -> String {
        format!(
            "uid {uid} may not use the admin socket: only root, uid {} (who started \
             msgserver) and admin_uids may",
            self.started_by
        )
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
    fn admin_policy_admits_root_the_starting_uid_and_admin_uids_only() {
        // Started as root, dropped to www-data (33), one operator (1000).
        let policy = AdminPolicy::new(0, &[1000]);
        assert!(policy.allows(0));
        assert!(policy.allows(1000));
        assert!(!policy.allows(33), "the dropped-to user is msghandler's");
        assert!(!policy.allows(65534));
        // A developer without root: the core runs as them, and so does msgctl.
        let policy = AdminPolicy::new(1000, &[]);
        assert!(policy.allows(1000));
        assert!(policy.allows(0));
        assert!(!policy.allows(1001));
        assert!(policy.refusal(1001).contains("uid 1001"));
    }

    #[test]
    fn admin_socket_is_created_with_its_own_mode_beside_the_main_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let (_main, _) = bind(&config).unwrap();
        let _admin = bind_admin(&config).unwrap();
        let mode = std::fs::metadata(dir.path().join("core-admin.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        let loose = ServerConfig {
            admin_socket_mode: "0777".into(),
            ..config_in(dir.path())
        };
        let err = bind_admin(&loose).unwrap_err();
        assert!(format!("{err:#}").contains("0750 or stricter"), "{err:#}");
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
