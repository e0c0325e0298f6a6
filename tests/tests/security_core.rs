//! The core's side of the security contract, against the real binary: started as
//! root it keeps nothing of root but the sockets it bound, the admin socket admits
//! only operators, and nothing of the core listens on the network.
//!
//! The privilege tests need root. In CI (`CI=true`) a test process without root
//! fails them loudly, since a skipped security test is a passed one in the report;
//! on a developer's machine they print a notice and pass.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use micromsg_e2e::*;
use nix::unistd::{Group, User};
use serde_json::Value;

/// Whether this test may go on: true as root; otherwise a failure in CI and a
/// printed notice elsewhere.
fn running_as_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root and CI=true: run the e2e tests as root in CI");
    }
    eprintln!("NOTICE: {test} skipped: it needs root (it starts msgserver as root)");
    false
}

fn nobody() -> (User, Group) {
    let user = User::from_name("nobody").unwrap().expect("user nobody");
    let group = Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup (Debian)");
    (user, group)
}

/// A core started as root that drops to nobody:nogroup and gives its main socket
/// to them too; `extra` is appended to its configuration.
fn core_as_nobody(extra: &str) -> Core {
    Core::start(CoreOptions {
        extra_toml: format!(
            "user = \"nobody\"\ngroup = \"nogroup\"\n\
             socket_owner = \"nobody\"\nsocket_group = \"nogroup\"\n{extra}"
        ),
        ..CoreOptions::default()
    })
}

/// What follows `<field>:` in /proc/<pid>/status, trimmed.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field}: line in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The numbers after `<field>:` in /proc/<pid>/status.
fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    status_field(pid, field)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

/// msgctl on `core` as uid/gid of `user`, with no supplementary groups (std drops
/// them when a root parent sets the uid). The binary and the admin socket's
/// directory must be reachable by that user.
fn msgctl_as(core: &Core, user: &User, group: &Group, args: &[&str]) -> (bool, String) {
    let mut cmd = core.msgctl_command();
    cmd.args(args)
        .uid(user.uid.as_raw())
        .gid(group.gid.as_raw());
    let (status, text) = run_for_text(&mut cmd);
    (status.success(), text)
}

/// The core's temporary directory is 0700: open it for traversal, so that an
/// unprivileged msgctl reaches the socket and meets the socket's own permissions.
fn open_for_traversal(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

#[test]
fn core_started_as_root_keeps_no_trace_of_root_but_its_admin_socket() {
    if !running_as_root("core_started_as_root_keeps_no_trace_of_root_but_its_admin_socket") {
        return;
    }
    let (user, group) = nobody();
    let core = core_as_nobody("");
    let (uid, gid) = (user.uid.as_raw(), group.gid.as_raw());

    // Real, effective, saved and filesystem ids, and no supplementary group left.
    assert_eq!(status_ids(core.pid(), "Uid"), vec![uid; 4]);
    assert_eq!(status_ids(core.pid(), "Gid"), vec![gid; 4]);
    let groups: HashSet<u32> = status_ids(core.pid(), "Groups").into_iter().collect();
    assert!(
        groups.is_subset(&HashSet::from([gid])),
        "supplementary groups left: {groups:?}"
    );

    let main = std::fs::metadata(core.socket()).unwrap();
    assert_eq!((main.uid(), main.gid()), (uid, gid), "main socket owner");
    assert_eq!(main.mode() & 0o777, 0o770, "main socket mode");
    let admin = std::fs::metadata(core.admin_socket()).unwrap();
    assert_eq!((admin.uid(), admin.gid()), (0, 0), "admin socket owner");
    assert_eq!(admin.mode() & 0o777, 0o750, "admin socket mode");

    // Root operates; the user the core (and msghandler) runs as does not, even
    // though the core itself is that user now.
    let (status, out) = core.msgctl(&["dead-letters", "list"]);
    assert!(
        status.success() && out.contains("0 dead letter(s)"),
        "{out}"
    );
    open_for_traversal(core.dir());
    let (ok, out) = msgctl_as(&core, &user, &group, &["dead-letters", "list"]);
    assert!(!ok, "msgctl as nobody must fail: {out}");
    assert!(
        out.contains(&format!(
            "permission denied on {}: msgctl must run as root or as a uid in admin_uids",
            core.admin_socket().display()
        )),
        "{out}"
    );
}

/// `CapabilityBoundingSet=` of systemd/msgserver.service, the unit's value as is.
fn units_bounding_set() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/msgserver.service");
    let unit = std::fs::read_to_string(path).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("msgserver.service sets CapabilityBoundingSet=")
        .to_owned()
}

/// Under the unit root is root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH,
/// and what an earlier start handed over (the main socket, the data directory) is
/// no longer root's to open. A restart, after a crash or a clean stop, must come
/// up anyway, and with what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_under_its_units_capabilities_restarts_over_what_its_last_run_left() {
    if !running_as_root("core_under_its_units_capabilities_restarts_over_what_its_last_run_left") {
        return;
    }
    let mut core = Core::start(CoreOptions {
        durable: true,
        bounding_set: Some(units_bounding_set()),
        extra_toml: "user = \"nobody\"\ngroup = \"nogroup\"\n\
                     socket_owner = \"nobody\"\nsocket_group = \"nogroup\"\n"
            .into(),
        ..CoreOptions::default()
    });
    // Else this proves nothing: the test process (root) could open everything.
    let bounding = u64::from_str_radix(&status_field(core.pid(), "CapBnd"), 16).unwrap();
    const DAC_OVERRIDE_AND_READ_SEARCH: u64 = 0b110;
    assert_eq!(
        bounding & DAC_OVERRIDE_AND_READ_SEARCH,
        0,
        "CapBnd {bounding:x}"
    );
    let (user, group) = nobody();
    let data = std::fs::metadata(core.data_dir()).unwrap();
    assert_eq!(
        (data.uid(), data.gid()),
        (user.uid.as_raw(), group.gid.as_raw())
    );

    let h = Handler::start(
        core.socket(),
        HandlerOptions {
            extra_toml: "core_wait = 5.0\n".into(),
            ..HandlerOptions::default()
        },
    );
    h.set_ok("a", "b", &serde_json::json!({"n": 1})).await;
    core.restart(); // SIGKILL: the socket file stays behind
    h.set_ok("a", "b", &serde_json::json!({"n": 2})).await;
    core.terminate(std::time::Duration::from_secs(10));
    core.restart(); // after a clean stop
    let numbers: Vec<Value> = h
        .poll_messages("b")
        .await
        .expect("messages for b")
        .iter()
        .map(|m| m["n"].clone())
        .collect();
    assert_eq!(numbers, [1, 2], "core log:\n{}", core.log());
}

#[test]
fn peer_check_refuses_a_uid_outside_admin_uids_that_got_past_the_file_mode() {
    if !running_as_root("peer_check_refuses_a_uid_outside_admin_uids_that_got_past_the_file_mode") {
        return;
    }
    let (user, group) = nobody();
    // nogroup may connect by the file mode; only admin_uids decides.
    let admin_group = "admin_group = \"nogroup\"\nadmin_socket_mode = \"0770\"\n";
    let www = "user = \"www-data\"\ngroup = \"www-data\"\n";
    let core = Core::start(CoreOptions {
        extra_toml: format!("{www}{admin_group}"),
        ..CoreOptions::default()
    });
    open_for_traversal(core.dir());
    let (ok, out) = msgctl_as(&core, &user, &group, &["dead-letters", "list"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("msgserver refused the connection")
            && out.contains(&format!("uid {} may not use the admin socket", user.uid)),
        "{out}"
    );
    drop(core);

    let core = Core::start(CoreOptions {
        extra_toml: format!("{www}{admin_group}admin_uids = [{}]\n", user.uid),
        ..CoreOptions::default()
    });
    open_for_traversal(core.dir());
    let (ok, out) = msgctl_as(&core, &user, &group, &["dead-letters", "list"]);
    assert!(ok && out.contains("0 dead letter(s)"), "{out}");
}

/// Starts msgserver with `config`, which must stop it: its stderr, and the directory
/// it ran in (the socket was to be `core.sock` there).
fn refused_start(config: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("msgserver.toml");
    std::fs::write(&file, config).unwrap();
    let output = std::process::Command::new(&binaries().msgserver)
        .arg("--config")
        .arg(&file)
        .arg("--socket")
        .arg(dir.path().join("core.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    (stderr, dir)
}

#[test]
fn a_core_that_would_make_its_own_user_an_operator_does_not_start() {
    if !running_as_root("a_core_that_would_make_its_own_user_an_operator_does_not_start") {
        return;
    }
    let (user, _) = nobody();
    let (stderr, _) = refused_start(&format!(
        "user = \"nobody\"\ngroup = \"nogroup\"\nadmin_uids = [{}]\n",
        user.uid
    ));
    assert!(stderr.contains("every handler an operator"), "{stderr}");
}

#[test]
fn a_loose_admin_socket_mode_is_refused_at_start() {
    let (stderr, dir) = refused_start("admin_socket_mode = \"0777\"\n");
    assert!(
        stderr.contains("admin_socket_mode") && stderr.contains("0750 or stricter"),
        "{stderr}"
    );
    assert!(!dir.path().join("core-admin.sock").exists());
}

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Inodes of every TCP and UDP socket (IPv4 and IPv6) in this network namespace.
fn network_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue; // no IPv6 in this kernel
        };
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9) {
                inodes.insert(inode.parse().unwrap());
            }
        }
    }
    inodes
}

#[test]
fn nothing_of_the_core_listens_on_tcp_or_udp_only_msghandler_does() {
    let (core, handler) = start_default();
    let core_sockets = socket_inodes(core.pid());
    // At least the main and the admin listener.
    assert!(core_sockets.len() >= 2, "{core_sockets:?}");
    let network = network_inodes();
    let exposed: Vec<_> = core_sockets.intersection(&network).collect();
    assert!(
        exposed.is_empty(),
        "msgserver holds network sockets {exposed:?}"
    );
    // The method sees a network socket where there is one.
    let front = socket_inodes(handler.pid());
    assert!(
        front.intersection(&network).next().is_some(),
        "msghandler's TCP listener is not in /proc/net/tcp*"
    );
}
