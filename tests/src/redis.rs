//! A private `redis-server` and clusters of msghandler+msgserver pairs sharing it
//! (issue 9: scale out past one host), for `tests/tests/cluster.rs`.
//!
//! Each [`Redis`] runs in its own temporary directory on a Unix socket only (no TCP
//! port to collide on), persisting with an append-only file fsynced on every write,
//! as docs recommend for "nothing answered ok is lost": a [`Redis::kill`] or
//! [`Redis::stop`] followed by [`Redis::restart`] reloads everything acknowledged.
//!
//! `redis-server` comes from `MICROMSG_REDIS_SERVER`, else PATH (or /usr/bin,
//! /usr/sbin). Without one, [`Redis::start`] fails the test in CI (`CI=true`) and
//! elsewhere prints a loud notice and returns None, so that a developer without
//! Redis can still run the rest of the suite.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::{
    Core, CoreOptions, Handler, HandlerOptions, STARTUP_POLL, STARTUP_TIMEOUT, command, read_log,
    sigkill_and_reap, signal, temp_dir, wait_timeout,
};

/// Overrides which `redis-server` runs.
pub const REDIS_SERVER_ENV: &str = "MICROMSG_REDIS_SERVER";

/// How long Redis gets to exit after SIGTERM (it fsyncs the AOF first).
const REDIS_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `redis-server` to run, if there is one.
fn redis_server_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(REDIS_SERVER_ENV) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|bin| bin.is_file())
}

/// A running `redis-server` on `<tmp>/redis.sock`, data in `<tmp>`.
pub struct Redis {
    dir: TempDir,
    bin: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Redis {
    /// Starts redis-server and waits until it answers PING. None (after a loud
    /// notice) when redis-server is not installed and this is not CI; in CI a
    /// missing redis-server fails the test.
    pub fn start() -> Option<Redis> {
        let Some(bin) = redis_server_binary() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("no redis-server and CI=true: install redis-server (.ci/run does)");
            }
            eprintln!(
                "\n!!!!! SKIPPED: redis-server not installed (apt-get install redis-server, \
                 or set {REDIS_SERVER_ENV}); this cluster test checked nothing !!!!!\n"
            );
            return None;
        };
        let dir = temp_dir("micromsg-redis-");
        // A core started as root drops to www-data before it connects: it must be
        // able to traverse to the socket (which is itself 0777), and no more.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("opening the Redis directory for traversal");
        let socket = dir.path().join("redis.sock");
        let log = dir.path().join("redis.log");
        let mut redis = Redis {
            dir,
            bin,
            socket,
            log,
            child: None,
            starts: 0,
        };
        redis.spawn_and_wait();
        Some(redis)
    }

    fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let mut cmd = command(
            &self.bin,
            &self.log,
            &format!("redis-server start #{}", self.starts),
        );
        cmd.args(["--port", "0"])
            .arg("--unixsocket")
            .arg(&self.socket)
            .args(["--unixsocketperm", "777"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            // As docs/CLUSTER.md asks: bounded, and refusing rather than evicting.
            .args(["--maxmemory", "1gb", "--maxmemory-policy", "noeviction"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--logfile", ""])
            // Not the system's /etc/redis: nothing but what is on this line.
            .args(["--protected-mode", "no"]);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().expect("polling redis-server") {
                panic!(
                    "redis-server exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            // "-LOADING" while the AOF is read back: not ready yet.
            if self.command(&["PING"]).is_ok_and(|r| r == "PONG") {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "redis-server did not answer PING on {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(STARTUP_POLL);
        }
    }

    /// What msgserver's `redis_url` is set to.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the AOF lives.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the running server (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running")
            .id()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM and wait for the exit (Redis fsyncs its AOF on the way out).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, Signal::SIGTERM);
        if wait_timeout(&mut child, REDIS_STOP_TIMEOUT).is_none() {
            sigkill_and_reap(&mut child);
            panic!("redis-server did not exit within {REDIS_STOP_TIMEOUT:?} of SIGTERM");
        }
    }

    /// SIGKILL, then reap: what a crash or an OOM kill does.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigkill_and_reap(&mut child);
        }
    }

    /// Stops Redis if it runs (SIGTERM), then starts it again in the same
    /// directory, so that it reloads its AOF, and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// One command on a fresh connection to the socket: the reply of a simple
    /// string, integer or bulk string as text (`(nil)` for a null bulk), an
    /// error reply as Err. For readiness and for looking into what the engine
    /// stored; not a client library.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end_matches("\r\n");
        match line.split_at_checked(1) {
            Some(("+" | ":", rest)) => Ok(rest.to_owned()),
            Some(("-", rest)) => Err(rest.to_owned()),
            Some(("$", "-1")) => Ok("(nil)".to_owned()),
            Some(("$", len)) => {
                let len: usize = len.parse().map_err(|_| format!("bad reply {line:?}"))?;
                let mut body = vec![0u8; len + 2];
                std::io::Read::read_exact(&mut reader, &mut body).map_err(|e| e.to_string())?;
                body.truncate(len);
                String::from_utf8(body).map_err(|e| e.to_string())
            }
            _ => Err(format!("unexpected reply {line:?}")),
        }
    }

    /// How many keys the database holds (`DBSIZE`).
    pub fn dbsize(&self) -> u64 {
        self.command(&["DBSIZE"])
            .unwrap_or_else(|e| panic!("DBSIZE: {e}"))
            .parse()
            .expect("DBSIZE answers an integer")
    }

    /// Everything redis-server wrote, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- redis-server log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

/// One host of a cluster: a core on the shared Redis and a handler in front of it.
pub struct Pair {
    pub core: Core,
    pub handler: Handler,
}

/// `n` msghandler+msgserver pairs sharing one Redis, as on `n` hosts behind a load
/// balancer. Pairs are named "a", "b", "c", ... (their `node_name`).
pub struct Cluster {
    // Dropped first: the pairs go before the Redis they use, so that their logs
    // show no outage at the end of a passing test.
    pairs: Vec<Pair>,
    handler_options: HandlerOptions,
    pub redis: Redis,
}

/// The `node_name` of pair `i`.
pub fn node_name(i: usize) -> String {
    let letter = u8::try_from(i)
        .ok()
        .filter(|&i| i < 26)
        .expect("at most 26 pairs");
    char::from(b'a' + letter).to_string()
}

impl Cluster {
    /// A Redis and `n` pairs with default core options plus `core_extra_toml`
    /// (config keys first, then `[[channels]]` tables) and `handler` for every
    /// handler. None when redis-server is missing outside CI (see [`Redis::start`]).
    pub fn start(n: usize, core_extra_toml: &str, handler: HandlerOptions) -> Option<Cluster> {
        Cluster::start_with(
            n,
            CoreOptions {
                extra_toml: core_extra_toml.into(),
                ..CoreOptions::default()
            },
            handler,
        )
    }

    /// As [`Cluster::start`], with every core option (delivery mode, visibility
    /// timeout, ...). The backend keys are put in front of `core.extra_toml`;
    /// `redis_timeout` is 1 s unless `core.extra_toml` sets it.
    pub fn start_with(n: usize, core: CoreOptions, handler: HandlerOptions) -> Option<Cluster> {
        let redis = Redis::start()?;
        let mut cluster = Cluster {
            pairs: Vec::with_capacity(n),
            handler_options: handler,
            redis,
        };
        for i in 0..n {
            let mut options = core.clone();
            options.extra_toml = cluster.core_toml(i, &core.extra_toml);
            let core = Core::start(options);
            let handler = Handler::start(core.socket(), cluster.handler_options.clone());
            cluster.pairs.push(Pair { core, handler });
        }
        Some(cluster)
    }

    /// The keys that put core `i` on this cluster's Redis, before `extra`.
    fn core_toml(&self, i: usize, extra: &str) -> String {
        let mut toml = format!(
            "backend = \"redis\"\nredis_url = {}\nnode_name = \"{}\"\n",
            serde_json::Value::from(self.redis.url()),
            node_name(i)
        );
        if !extra.contains("redis_timeout") {
            toml.push_str("redis_timeout = 1.0\n");
        }
        toml.push_str(extra);
        toml
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn pair(&self, i: usize) -> &Pair {
        &self.pairs[i]
    }

    pub fn pair_mut(&mut self, i: usize) -> &mut Pair {
        &mut self.pairs[i]
    }

    /// The handler of pair `i`.
    pub fn handler(&self, i: usize) -> &Handler {
        &self.pairs[i].handler
    }

    /// Every handler, in pair order.
    pub fn handlers(&self) -> Vec<&Handler> {
        self.pairs.iter().map(|p| &p.handler).collect()
    }

    /// The core of pair `i`.
    pub fn core(&self, i: usize) -> &Core {
        &self.pairs[i].core
    }

    /// `kill -9` of both processes of pair `i`: the host is gone. Its handler's
    /// address then refuses connections (or, through nginx, answers 502).
    pub fn kill_pair(&mut self, i: usize) {
        let pair = &mut self.pairs[i];
        // Both signalled before either is reaped, the core first: when a host
        // dies, its core gets no chance to tidy up after a handler connection that
        // dropped (which it would, seeing msghandler go first).
        if let Some(core) = pair.core.child.as_ref() {
            signal(core, Signal::SIGKILL);
        }
        if let Some(handler) = pair.handler.child.as_ref() {
            signal(handler, Signal::SIGKILL);
        }
        pair.core.kill();
        pair.handler.kill();
    }

    /// Starts the core of pair `i` again (same socket, same configuration) after a
    /// [`Cluster::kill_pair`] or a crash, and a fresh handler in front of it (on a
    /// new port: the old process is gone with its listening socket).
    pub fn restart_pair(&mut self, i: usize) {
        let options = self.handler_options.clone();
        let pair = &mut self.pairs[i];
        pair.handler.kill();
        pair.core.restart();
        pair.handler = Handler::start(pair.core.socket(), options);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_keeps_what_it_acknowledged_across_a_kill_and_a_stop() {
        let Some(mut redis) = Redis::start() else {
            return;
        };
        assert!(redis.url().starts_with("redis+unix:///"), "{}", redis.url());
        let mode = std::fs::metadata(redis.socket())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777, "any user may connect: {mode:o}");
        let mode = std::fs::metadata(redis.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711, "traversable, not listable: {mode:o}");
        assert_eq!(redis.command(&["SET", "k", "v1"]).as_deref(), Ok("OK"));
        let first = redis.pid();
        // appendfsync always: acknowledged is on disk, so a SIGKILL loses nothing.
        redis.kill();
        assert!(redis.command(&["PING"]).is_err(), "down after the kill");
        redis.restart();
        assert_ne!(redis.pid(), first);
        assert_eq!(redis.command(&["GET", "k"]).as_deref(), Ok("v1"));
        assert_eq!(redis.command(&["SET", "k", "v2"]).as_deref(), Ok("OK"));
        redis.stop();
        assert!(!redis.is_running());
        redis.restart();
        assert_eq!(redis.command(&["GET", "k"]).as_deref(), Ok("v2"));
        assert_eq!(redis.dbsize(), 1);
        assert!(redis.command(&["NOSUCHCOMMAND"]).is_err());
    }
}
