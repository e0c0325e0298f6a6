//! Where the core's sockets live when nobody says otherwise. The binaries must agree
//! on these defaults, which is why they sit in the contract crate.

use std::path::{Path, PathBuf};

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

/// The operator's socket beside the main one: `<dir>/<stem>-admin.<ext>`, so
/// `msgserver.sock` gives `msgserver-admin.sock`. Derived here and nowhere else, so
/// that msgserver and msgctl find the same file from the same main socket path, and
/// two cores whose sockets share a directory do not share an admin socket.
pub fn admin_socket_beside(socket: &Path) -> PathBuf {
    let stem = socket
        .file_stem()
        .map_or_else(|| "msgserver".into(), |s| s.to_string_lossy().into_owned());
    let name = match socket.extension() {
        Some(ext) => format!("{stem}-admin.{}", ext.to_string_lossy()),
        None => format!("{stem}-admin"),
    };
    socket.with_file_name(name)
}

/// The admin socket beside [`default_socket_path`].
pub fn default_admin_socket_path() -> PathBuf {
    admin_socket_beside(&default_socket_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_socket_sits_beside_the_main_socket_with_an_admin_suffix() {
        assert_eq!(
            admin_socket_beside(Path::new("/run/micromsg/msgserver.sock")),
            Path::new("/run/micromsg/msgserver-admin.sock")
        );
        assert_eq!(
            admin_socket_beside(Path::new("/tmp/t/core")),
            Path::new("/tmp/t/core-admin")
        );
        assert_eq!(
            default_admin_socket_path().parent(),
            default_socket_path().parent()
        );
    }
}
