//! A private nginx in front of msghandler, for running the end-to-end suite through
//! the shipped site (`etc/nginx/micromsg.conf`) as well as directly.
//!
//! Opt-in with `MICROMSG_E2E_VIA_NGINX=1`: then [`crate::Handler::start`] starts
//! one of these per msghandler and [`crate::Handler::addr`] is nginx's. The site is
//! used as shipped, every location and directive of it; only its upstream address
//! and its `listen` lines are replaced, and the `http {}` around it is the part of
//! Debian's `nginx.conf` that matters to a site. Tests that must reach msghandler
//! itself say why with [`crate::HandlerOptions::direct`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use tempfile::TempDir;

use crate::{STARTUP_POLL, STARTUP_TIMEOUT, free_port, read_log, sigkill_and_reap, temp_dir};

/// The environment variable that routes the suite through nginx.
pub const VIA_NGINX_ENV: &str = "MICROMSG_E2E_VIA_NGINX";
/// Overrides which nginx binary runs (default: `nginx` on PATH, else /usr/sbin).
pub const NGINX_BIN_ENV: &str = "MICROMSG_E2E_NGINX";

/// The site as shipped. Compiled in, so that editing it rebuilds the harness and a
/// test never runs against a copy older than the file.
pub const SHIPPED_SITE: &str = include_str!("../../etc/nginx/micromsg.conf");

/// The upstream line of the shipped site, replaced by msghandler's test address.
const SHIPPED_UPSTREAM: &str = "    server 127.0.0.1:8080;\n";
/// The listen lines of the shipped site, replaced by nginx's test address.
const SHIPPED_LISTEN: &str = "    listen 80;\n    listen [::]:80;\n";

/// Whether this run goes through nginx.
pub fn via_nginx() -> bool {
    std::env::var_os(VIA_NGINX_ENV).is_some_and(|v| v == "1")
}

/// The shipped site with its upstream at `upstream` and listening on `listen`.
/// Panics unless each replaced line is there exactly once: a changed site must
/// change the harness too, not be tested half-adapted.
pub fn adapt_site(site: &str, upstream: SocketAddr, listen: SocketAddr) -> String {
    for expected in [SHIPPED_UPSTREAM, SHIPPED_LISTEN] {
        assert_eq!(
            site.matches(expected).count(),
            1,
            "etc/nginx/micromsg.conf must contain exactly once:\n{expected}(tests/src/nginx.rs replaces it)"
        );
    }
    site.replacen(SHIPPED_UPSTREAM, &format!("    server {upstream};\n"), 1)
        .replacen(SHIPPED_LISTEN, &format!("    listen {listen};\n"), 1)
}

/// The whole nginx.conf for a test: Debian's http-level defaults around the site,
/// with every path nginx writes inside `dir`.
fn nginx_conf(dir: &Path, site: &str) -> String {
    let p = |name: &str| format!("\"{}\"", dir.join(name).display());
    format!(
        "# Written by the micromsg e2e harness (tests/src/nginx.rs) around\n\
         # etc/nginx/micromsg.conf.\n\
         # One process: a SIGKILL when the test ends leaves no worker holding the port.\n\
         master_process off;\n\
         pid {pid};\n\
         error_log {error} info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         # As in Debian's /etc/nginx/nginx.conf, which includes sites-enabled/.\n\
         sendfile on;\n\
         tcp_nopush on;\n\
         types_hash_max_size 2048;\n\
         default_type application/octet-stream;\n\
         gzip on;\n\
         access_log {access};\n\
         # Debian's defaults are under /var/lib/nginx, which a test must not touch.\n\
         client_body_temp_path {body};\n\
         proxy_temp_path {proxy};\n\
         fastcgi_temp_path {fastcgi};\n\
         uwsgi_temp_path {uwsgi};\n\
         scgi_temp_path {scgi};\n\
         {site}\n\
         }}\n",
        pid = p("nginx.pid"),
        error = p("error.log"),
        access = p("access.log"),
        body = p("body"),
        proxy = p("proxy"),
        fastcgi = p("fastcgi"),
        uwsgi = p("uwsgi"),
        scgi = p("scgi"),
    )
}

fn nginx_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os(NGINX_BIN_ENV) {
        return PathBuf::from(bin);
    }
    // Debian puts nginx in /usr/sbin, which is not on an ordinary user's PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|bin| bin.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{VIA_NGINX_ENV}=1 but there is no nginx (apt-get install nginx, or set {NGINX_BIN_ENV})"
            )
        })
}

/// A running nginx in its own temporary directory, proxying to one msghandler.
pub(crate) struct Nginx {
    dir: TempDir,
    addr: SocketAddr,
    child: Child,
}

impl Nginx {
    /// Starts nginx in front of msghandler at `upstream` and waits until it accepts
    /// TCP connections.
    pub(crate) fn start(upstream: SocketAddr) -> Nginx {
        let dir = temp_dir("micromsg-nginx-");
        let bin = nginx_binary();
        let conf = dir.path().join("nginx.conf");
        let out = dir.path().join("nginx.out");
        // As for msghandler: the free port may be taken before nginx binds it.
        for attempt in 1..=3 {
            let addr = free_port();
            let site = adapt_site(SHIPPED_SITE, upstream, addr);
            std::fs::write(&conf, nginx_conf(dir.path(), &site)).expect("writing nginx.conf");
            let log = std::fs::File::create(&out).expect("creating nginx.out");
            let err = log.try_clone().expect("cloning the log file handle");
            let mut child = Command::new(&bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                // Before it reads the config nginx logs to its built-in error log
                // (Debian: stderr); keep even that in the test's directory.
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait().expect("polling nginx") {
                    let text = Self::read_logs(dir.path());
                    if attempt < 3 && text.contains("in use") {
                        break;
                    }
                    panic!("nginx exited during startup ({status}):\n{text}");
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Nginx { dir, addr, child };
                }
                if Instant::now() >= deadline {
                    sigkill_and_reap(&mut child);
                    panic!(
                        "nginx did not listen on {addr} within {STARTUP_TIMEOUT:?}:\n{}",
                        Self::read_logs(dir.path())
                    );
                }
                std::thread::sleep(STARTUP_POLL);
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn read_logs(dir: &Path) -> String {
        format!(
            "{}{}",
            read_log(&dir.join("nginx.out")),
            read_log(&dir.join("error.log"))
        )
    }

    /// nginx's output and error log (with the access log, for a failing test).
    pub(crate) fn log(&self) -> String {
        format!(
            "{}----- nginx access log -----\n{}",
            Self::read_logs(self.dir.path()),
            read_log(&self.dir.path().join("access.log"))
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        sigkill_and_reap(&mut self.child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_site_adapts_to_test_addresses_keeping_everything_else() {
        let upstream: SocketAddr = "127.0.0.1:41001".parse().unwrap();
        let listen: SocketAddr = "127.0.0.1:41002".parse().unwrap();
        let site = adapt_site(SHIPPED_SITE, upstream, listen);
        assert!(site.contains("    server 127.0.0.1:41001;\n"));
        assert!(site.contains("    listen 127.0.0.1:41002;\n"));
        assert!(!site.contains("8080;"), "{site}");
        assert_eq!(
            site.lines().count(),
            SHIPPED_SITE.lines().count() - 1,
            "two listen lines became one, nothing else changed"
        );
    }
}
