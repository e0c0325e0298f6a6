//! Where the core's socket lives when nobody says otherwise. Both binaries must agree
//! on this default, which is why it sits in the contract crate.

use std::path::PathBuf;

/// `$XDG_RUNTIME_DIR/micromsg/msgserver.sock` for a desktop user,
/// `/run/micromsg/msgserver.sock` for root, and a per-user directory under the
/// temporary directory otherwise, so that a developer needs no root to run both
/// processes and two users on one machine do not collide.
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("micromsg").join("msgserver.sock");
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        PathBuf::from("/run/micromsg/msgserver.sock")
    } else {
        std::env::temp_dir()
            .join(format!("micromsg-{uid}"))
            .join("msgserver.sock")
    }
}
