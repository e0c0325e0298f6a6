//! End-to-end harness for micromsg: starts the real `msgserver` and `msghandler`
//! binaries in throw-away directories and talks to them the way their users do —
//! HTTP to the front, a Unix socket to the core.
//!
//! What it is for: the tests under `tests/tests/`, which state the wire contract of
//! ARCHITECTURE.md ("HTTP contract: x0 compatibility") and of docs/API.md (the `/v1`
//! API) against real processes over real sockets. What it is not for: rules of the broker or the codec, which are
//! unit-tested beside their code in microseconds.
//!
//! Every test gets its own temporary directory, socket path and TCP port, so tests
//! run in parallel (cargo-nextest runs each in its own process). The binaries are
//! built once per test process with `cargo build`, so a test never runs a stale
//! binary. Children are killed with SIGKILL when their handle is dropped, and their
//! logs are printed if the test is failing at that moment.
//!
//! With `MICROMSG_E2E_VIA_NGINX=1` every msghandler gets a private nginx running the
//! shipped site in front of it, and the tests talk to nginx (module [`nginx`]).
//!
//! The cluster tests (issue 9) start a private `redis-server` and several pairs
//! sharing it (module [`redis`]: [`Redis`], [`Cluster`]).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

pub use hyper::header::HeaderMap;
pub use hyper::{Method, StatusCode};
pub use serde_json::json;

pub mod nginx;
use nginx::Nginx;
pub use nginx::via_nginx;

pub mod redis;
pub use redis::{Cluster, Pair, Redis, node_name};

/// How long a child gets to create its socket or port before the test gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling period while waiting for a child to come up.
const STARTUP_POLL: Duration = Duration::from_millis(10);
/// Upper bound for any single HTTP exchange, so that a hung server fails the test
/// with a message instead of hanging the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The headers the real x0 client sends with every POST (`sysCallXMLRPC`).
pub const X0_HEADERS: &[(&str, &str)] = &[
    ("Content-Type", "application/json; charset=UTF-8"),
    ("Accept", "application/json"),
    ("Cache-Control", "max-age=0"),
    ("Upgrade-Insecure-Requests", "1"),
];

/// The four paths x0 applications point their URLs at.
pub const X0_PATHS: &[&str] = &["/python/MsgHandler.py", "/get", "/set", "/del"];

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// Paths of the freshly built binaries.
#[derive(Debug)]
pub struct Binaries {
    pub msgserver: PathBuf,
    pub msghandler: PathBuf,
    pub msgctl: PathBuf,
}

/// Builds `msgserver` and `msghandler` once per test process and returns where they
/// are. A `OnceLock` and not a lazy static per test: every test in the process must
/// see the same build, and a failed build must fail every test with cargo's output.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(build_binaries)
}

fn build_binaries() -> Binaries {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace");
    let manifest = workspace.join("Cargo.toml");
    // This test binary is <target>/<profile>/deps/<name>; the binaries we build end
    // up in <target>/<profile>/, next to `deps`.
    let exe = std::env::current_exe().expect("locating the test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "-p", "msgserver", "-p", "msghandler"])
        .arg("--manifest-path")
        .arg(&manifest);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // Build into the same target directory as this test binary, even when it was
    // chosen with --target-dir rather than the environment.
    if let Some(target_dir) = profile_dir.parent()
        && target_dir.join("CACHEDIR.TAG").exists()
    {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running cargo to build the binaries");
    if !output.status.success() {
        panic!(
            "cargo build of msgserver and msghandler failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let binaries = Binaries {
        msgserver: profile_dir.join("msgserver"),
        msghandler: profile_dir.join("msghandler"),
        msgctl: profile_dir.join("msgctl"),
    };
    for bin in [&binaries.msgserver, &binaries.msghandler, &binaries.msgctl] {
        assert!(
            bin.exists(),
            "cargo build succeeded but {} is missing",
            bin.display()
        );
    }
    binaries
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A fresh private (0700) temporary directory, as `scripts/run-local` uses: the core
/// must not need to reach its socket's directory after dropping to `www-data`.
fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temporary directory")
}

/// A command for `bin` whose stdout and stderr go to `log` (appended), with no
/// `MICROMSG_*` variable leaking in from the environment running the tests.
fn command(bin: &Path, log: &Path, banner: &str) -> Command {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening the log file");
    writeln!(file, "===== {banner} =====").expect("writing the log file");
    let err = file.try_clone().expect("cloning the log file handle");
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MICROMSG_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(STARTUP_POLL);
    }
}

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    // ESRCH only means it is already gone, which is what we wanted.
    let _ = kill(pid, sig);
}

fn sigkill_and_reap(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        signal(child, Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// Writes `key = value` TOML lines; strings are quoted with JSON escapes, which
/// TOML basic strings accept.
#[derive(Default)]
struct Toml(String);

impl Toml {
    fn raw(&mut self, key: &str, value: impl std::fmt::Display) {
        self.0.push_str(&format!("{key} = {value}\n"));
    }
    fn str(&mut self, key: &str, value: &str) {
        self.raw(key, Value::from(value));
    }
    fn float(&mut self, key: &str, value: f64) {
        // Always with a decimal point: TOML keeps integers and floats apart.
        self.raw(key, format!("{value:?}"));
    }
}

// ---------------------------------------------------------------------------
// msgserver
// ---------------------------------------------------------------------------

/// Options for the core; `None` leaves the key out so the binary's default applies.
#[derive(Debug, Clone, Default)]
pub struct CoreOptions {
    /// Passed as `--delivery` ("x0" or "ack").
    pub delivery: Option<String>,
    pub mailbox_max_len: Option<usize>,
    /// "drop_oldest" or "reject".
    pub overflow: Option<String>,
    pub max_payload_bytes: Option<usize>,
    pub message_ttl: Option<f64>,
    pub visibility_timeout: Option<f64>,
    pub max_poll_timeout: Option<f64>,
    /// Durable storage in `<core dir>/data` (`--data-dir`).
    pub durable: bool,
    /// Passed as `--fsync` ("always", "interval" or "never").
    pub fsync: Option<String>,
    /// Appended verbatim to the TOML file.
    pub extra_toml: String,
    /// Why this test needs the embedded backend even in a run on Redis (see
    /// [`CoreOptions::embedded`]).
    pub embedded_only: Option<&'static str>,
    /// The only capabilities the core may hold, written as in a systemd unit's
    /// `CapabilityBoundingSet=` ("CAP_CHOWN CAP_SETUID"); it is started through
    /// `setpriv --bounding-set`. None: what the test process has.
    pub bounding_set: Option<String>,
}

/// The environment variable that runs the end-to-end suite on the Redis backend:
/// `MICROMSG_E2E_BACKEND=redis` gives every core that is not durable (a data
/// directory is the embedded backend's) a private redis-server.
pub const BACKEND_ENV: &str = "MICROMSG_E2E_BACKEND";

/// Whether this run puts cores on the Redis backend.
pub fn on_redis() -> bool {
    std::env::var(BACKEND_ENV).is_ok_and(|v| v == "redis")
}

impl CoreOptions {
    /// These options, for a test of what only the embedded backend has (a limit
    /// Redis's maxmemory replaces, a status without Redis in it, no network
    /// socket): its core stays embedded in a run on Redis, and says `why` there.
    pub fn embedded(mut self, why: &'static str) -> CoreOptions {
        self.embedded_only = Some(why);
        self
    }

    fn toml(&self, socket: &Path) -> String {
        let mut t = Toml::default();
        t.str("socket", &socket.to_string_lossy());
        t.str("log", "info");
        if let Some(v) = self.mailbox_max_len {
            t.raw("mailbox_max_len", v);
        }
        if let Some(v) = &self.overflow {
            t.str("overflow", v);
        }
        if let Some(v) = self.max_payload_bytes {
            t.raw("max_payload_bytes", v);
        }
        if let Some(v) = self.message_ttl {
            t.float("message_ttl", v);
        }
        if let Some(v) = self.visibility_timeout {
            t.float("visibility_timeout", v);
        }
        if let Some(v) = self.max_poll_timeout {
            t.float("max_poll_timeout", v);
        }
        t.0.push_str(&self.extra_toml);
        t.0
    }
}

/// A running `msgserver` in its own temporary directory.
pub struct Core {
    dir: TempDir,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    options: CoreOptions,
    child: Option<Child>,
    starts: u32,
    /// The core's private Redis in a run on the Redis backend; declared after
    /// `child` so that it stops after the core.
    _redis: Option<Redis>,
}

impl Core {
    /// Starts msgserver on `<tmp>/core.sock` and waits until it accepts connections.
    pub fn start(options: CoreOptions) -> Core {
        let dir = temp_dir("micromsg-core-");
        if options.durable {
            // The core drops to www-data before it opens its data directory inside.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("opening the core's directory for traversal");
        }
        let socket = dir.path().join("core.sock");
        let config = dir.path().join("msgserver.toml");
        let mut options = options;
        let redis = if on_redis()
            && !options.durable
            && !options.extra_toml.contains("backend")
            && options.embedded_only.is_none()
        {
            let redis = Redis::start().expect("MICROMSG_E2E_BACKEND=redis needs redis-server");
            options.extra_toml = format!(
                "backend = \"redis\"\nredis_url = {}\nredis_timeout = 1.0\n{}",
                Value::from(redis.url()),
                options.extra_toml
            );
            Some(redis)
        } else {
            if let (true, Some(why)) = (on_redis(), options.embedded_only) {
                println!("this core stays on the embedded backend: {why}");
            }
            None
        };
        std::fs::write(&config, options.toml(&socket)).expect("writing msgserver.toml");
        let log = dir.path().join("msgserver.log");
        let mut core = Core {
            dir,
            socket,
            config,
            log,
            options,
            child: None,
            starts: 0,
            _redis: redis,
        };
        core.spawn_and_wait();
        core
    }

    /// The command line this core runs with (also used to start a rival on the
    /// same socket).
    pub fn command(&self, banner: &str) -> Command {
        let mut cmd = match &self.options.bounding_set {
            None => command(&binaries().msgserver, &self.log, banner),
            Some(caps) => {
                // setpriv executes the core in its own process: same pid, only the
                // bounding set is narrowed (root's capabilities after exec).
                let mut keep = "-all".to_owned();
                for cap in caps.split_whitespace() {
                    let name = cap.strip_prefix("CAP_").unwrap_or(cap).to_lowercase();
                    keep.push_str(&format!(",+{name}"));
                }
                let mut cmd = command(Path::new("setpriv"), &self.log, banner);
                cmd.args(["--bounding-set", &keep, "--"])
                    .arg(&binaries().msgserver);
                cmd
            }
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config);
        if let Some(delivery) = &self.options.delivery {
            cmd.args(["--delivery", delivery]);
        }
        if self.options.durable {
            cmd.arg("--data-dir").arg(self.data_dir());
        }
        if let Some(fsync) = &self.options.fsync {
            cmd.args(["--fsync", fsync]);
        }
        cmd
    }

    /// Where a durable core keeps its log.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGTERM, then waits up to `timeout` for the exit; panics if it does not come.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("msgserver is not running");
        signal(&child, Signal::SIGTERM);
        match wait_timeout(&mut child, timeout) {
            Some(status) => status,
            None => {
                sigkill_and_reap(&mut child);
                panic!("msgserver did not exit within {timeout:?} of SIGTERM");
            }
        }
    }

    fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let mut cmd = self.command(&format!("msgserver start #{}", self.starts));
        let child = cmd.spawn().expect("spawning msgserver");
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().expect("polling msgserver") {
                panic!(
                    "msgserver exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            // Not "its socket takes a connection": the backlog does from bind, before
            // the privilege drop and recovery. Started is when it says it listens.
            if self.log_of_this_start().contains("msgserver listening") {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "msgserver did not say it listens on {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(STARTUP_POLL);
        }
    }

    /// SIGKILL, then reap. The socket file stays behind, as after a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigkill_and_reap(&mut child);
        }
    }

    /// Kills msgserver if it runs, then starts it again on the same socket path,
    /// configuration and data directory (after a kill the stale socket file is still
    /// there: the server must remove it).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait();
    }

    /// Starts a second msgserver on this core's socket, expecting it to refuse;
    /// returns its exit status (None if it was still running after `timeout`, in
    /// which case it has been killed) and what it wrote to stderr.
    pub fn start_rival(&self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let rival_log = self.dir.path().join("rival.log");
        let mut cmd = self.command("rival msgserver (its output is in rival.log)");
        let out = File::create(&rival_log).expect("creating rival.log");
        cmd.stdout(Stdio::null()).stderr(out);
        let mut child = cmd.spawn().expect("spawning the rival msgserver");
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            sigkill_and_reap(&mut child);
        }
        (status, read_log(&rival_log))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("msgserver is not running").id()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Everything msgserver wrote to stdout and stderr, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The log since the marker of the latest start.
    fn log_of_this_start(&self) -> String {
        let log = self.log();
        let marker = format!("===== msgserver start #{} =====", self.starts);
        match log.rfind(&marker) {
            Some(at) => log[at..].to_owned(),
            None => String::new(),
        }
    }

    /// Where this core's admin socket is (beside its main socket, by default).
    pub fn admin_socket(&self) -> PathBuf {
        ipc::paths::admin_socket_beside(&self.socket)
    }

    /// `msgctl --admin-socket <this core's admin socket>`, ready for arguments, with
    /// no `MICROMSG_*` variable from the environment running the tests.
    pub fn msgctl_command(&self) -> Command {
        let mut cmd = Command::new(&binaries().msgctl);
        cmd.arg("--admin-socket")
            .arg(self.admin_socket())
            .stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MICROMSG_") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    /// Runs msgctl on this core with `args`; returns its exit status and stdout,
    /// with stderr appended.
    pub fn msgctl(&self, args: &[&str]) -> (ExitStatus, String) {
        run_for_text(self.msgctl_command().args(args))
    }

    /// `msgctl --json <args>`, which must succeed and print exactly one JSON
    /// document on stdout (progress and errors go to stderr); returns it.
    pub fn msgctl_json(&self, args: &[&str]) -> Value {
        let output = self
            .msgctl_command()
            .arg("--json")
            .args(args)
            .output()
            .expect("running msgctl");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "msgctl --json {args:?}: {}\n{stdout}{stderr}",
            output.status
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("msgctl --json {args:?} printed no single JSON document ({e}): {stdout}")
        })
    }
}

/// Runs `cmd` to the end; its exit status and stdout with stderr appended.
pub fn run_for_text(cmd: &mut Command) -> (ExitStatus, String) {
    let output = cmd.output().expect("running a command");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}

impl Drop for Core {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- msgserver log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// msghandler
// ---------------------------------------------------------------------------

/// Options for the front; `None` leaves the key out so the binary's default applies.
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// Passed as `--poll-timeout`. Short by default so that empty polls do not
    /// dominate the run time.
    pub poll_timeout: f64,
    pub max_body_bytes: Option<u64>,
    pub core_connections: Option<usize>,
    pub cors_allowed_origins: Option<Vec<String>>,
    /// Appended verbatim to the TOML file.
    pub extra_toml: String,
    /// Why the test must talk to msghandler itself, never through nginx (see
    /// [`HandlerOptions::direct`]); None lets `MICROMSG_E2E_VIA_NGINX` decide.
    pub direct: Option<&'static str>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            poll_timeout: 1.0,
            max_body_bytes: None,
            core_connections: None,
            cors_allowed_origins: None,
            extra_toml: String::new(),
            direct: None,
        }
    }
}

impl HandlerOptions {
    /// These options, for a test that checks msghandler's own handling of a TCP
    /// connection or a raw request (which nginx would answer or reshape first), or
    /// that plays the proxy itself: it reaches msghandler directly even in a run
    /// through nginx, and says `why` in its output there.
    pub fn direct(mut self, why: &'static str) -> HandlerOptions {
        self.direct = Some(why);
        self
    }

    fn toml(&self) -> String {
        let mut t = Toml::default();
        t.str("log", "info");
        if let Some(v) = self.max_body_bytes {
            t.raw("max_body_bytes", v);
        }
        if let Some(v) = self.core_connections {
            t.raw("core_connections", v);
        }
        if let Some(v) = &self.cors_allowed_origins {
            t.raw("cors_allowed_origins", Value::from(v.clone()));
        }
        t.0.push_str(&self.extra_toml);
        t.0
    }
}

/// A running `msghandler` listening on a free port of 127.0.0.1, with nginx in
/// front of it in a run through nginx.
pub struct Handler {
    _dir: TempDir,
    /// msghandler's own address.
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    /// Outlives a [`Handler::kill`], as the system's nginx outlives a restart of
    /// msghandler; stopped with the Handler.
    nginx: Option<Nginx>,
}

impl Handler {
    /// Starts msghandler for the core at `socket` and waits until its port accepts
    /// TCP connections.
    pub fn start(socket: &Path, options: HandlerOptions) -> Handler {
        let dir = temp_dir("micromsg-handler-");
        let config = dir.path().join("msghandler.toml");
        let proxied = via_nginx() && options.direct.is_none();
        if let (true, Some(why)) = (via_nginx(), options.direct) {
            println!("talking to msghandler directly, not through nginx: {why}");
        }
        let mut toml = options.toml();
        // What README's "Behind nginx" has operators set, unless the test chose.
        if proxied && !options.extra_toml.contains("trusted_proxies") {
            toml.push_str("trusted_proxies = [\"127.0.0.1\", \"::1\"]\n");
        }
        std::fs::write(&config, toml).expect("writing msghandler.toml");
        let log = dir.path().join("msghandler.log");
        // The free port is only free until someone else takes it: another test may
        // grab it between our probe and the child's bind, so retry a few times.
        for attempt in 1..=3 {
            let addr = free_port();
            let mut cmd = command(
                &binaries().msghandler,
                &log,
                &format!("msghandler on {addr} (attempt {attempt})"),
            );
            cmd.arg("--socket")
                .arg(socket)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--poll-timeout")
                .arg(options.poll_timeout.to_string())
                .arg("--config")
                .arg(&config);
            let mut child = cmd.spawn().expect("spawning msghandler");
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait().expect("polling msghandler") {
                    let text = read_log(&log);
                    if attempt < 3 && text.to_lowercase().contains("in use") {
                        break; // lost the race for the port; try another
                    }
                    panic!("msghandler exited during startup ({status}); log:\n{text}");
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    // Listening comes before the first IPC connection: a request in
                    // between would get CoreUnavailable. When a core is there, wait
                    // (briefly) for msghandler to have reached it.
                    if socket.exists() {
                        let ready = Instant::now() + Duration::from_secs(2);
                        while !read_log(&log).contains("connected to msgserver")
                            && Instant::now() < ready
                        {
                            std::thread::sleep(STARTUP_POLL);
                        }
                    }
                    let nginx = proxied.then(|| Nginx::start(addr));
                    return Handler {
                        _dir: dir,
                        addr,
                        log,
                        child: Some(child),
                        nginx,
                    };
                }
                if Instant::now() >= deadline {
                    sigkill_and_reap(&mut child);
                    panic!(
                        "msghandler did not listen on {addr} within {STARTUP_TIMEOUT:?}; log:\n{}",
                        read_log(&log)
                    );
                }
                std::thread::sleep(STARTUP_POLL);
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Where the tests connect: nginx in a run through nginx, else msghandler.
    pub fn addr(&self) -> SocketAddr {
        self.nginx.as_ref().map_or(self.addr, Nginx::addr)
    }

    /// msghandler's own address, also when nginx is in front.
    pub fn handler_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether requests to [`Handler::addr`] go through nginx.
    pub fn via_nginx(&self) -> bool {
        self.nginx.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("msghandler is not running").id()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        signal(
            self.child.as_ref().expect("msghandler is not running"),
            Signal::SIGTERM,
        );
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(
            self.child.as_mut().expect("msghandler was never started"),
            timeout,
        )
    }

    /// SIGTERM, then wait up to `timeout` for the exit status. Panics (after a
    /// SIGKILL) if the process does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.send_sigterm();
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!("msghandler did not exit within {timeout:?} of SIGTERM");
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            sigkill_and_reap(child);
        }
    }

    /// Everything msghandler wrote to stdout and stderr.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    // -- HTTP ---------------------------------------------------------------

    /// One HTTP/1.1 exchange on a fresh connection. `headers` are sent as given;
    /// hyper adds Host and Content-Length.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.exchange(method.clone(), path, headers, body.into()),
        )
        .await
        {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no reply within {REQUEST_TIMEOUT:?}"),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::TcpStream::connect(self.addr()).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection future drives the socket; it ends when `sender` is dropped.
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr().to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let response = sender.send_request(req.body(Full::new(body))?).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// POST `body` as the x0 client does (its exact headers).
    pub async fn post(&self, path: &str, body: &str) -> Reply {
        self.request(Method::POST, path, X0_HEADERS, body.to_owned())
            .await
    }

    /// POST `body` as the x0 client does; the reply must be JSON.
    pub async fn post_json(&self, path: &str, body: &str) -> (StatusCode, HeaderMap, Value) {
        let reply = self.post(path, body).await;
        let json = reply.json();
        (reply.status, reply.headers, json)
    }

    /// `POST /set`; asserts HTTP 200 and returns the JSON reply (ok or error).
    pub async fn set(&self, src: &str, dst: &str, payload: &Value) -> Value {
        let body = json!({"session_src": src, "session_dst": dst, "payload": payload});
        let (status, _, reply) = self.post_json("/set", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "SET {src} -> {dst}: {reply}");
        reply
    }

    /// `POST /set` that must succeed with `{"messages":null,"status":"ok","id":N}`;
    /// returns the message id.
    pub async fn set_ok(&self, src: &str, dst: &str, payload: &Value) -> u64 {
        let reply = self.set(src, dst, payload).await;
        assert_ok_with_id(&reply, &format!("SET {src} -> {dst}"))
    }

    /// A long-poll exactly as the x0 client sends it, on `POST /get`; asserts HTTP
    /// 200 and returns the JSON reply.
    pub async fn poll(&self, session: &str) -> Value {
        let (status, _, reply) = self.post_json("/get", &x0_get_body(session)).await;
        assert_eq!(status, StatusCode::OK, "GET {session}: {reply}");
        reply
    }

    /// A long-poll that must not fail: the messages, or None for `{"messages":null}`.
    pub async fn poll_messages(&self, session: &str) -> Option<Vec<Value>> {
        messages_of(&self.poll(session).await)
    }

    /// `POST /del` that must succeed.
    pub async fn del_ok(&self, session: &str) {
        let body = json!({"type": "DEL", "session_src": session});
        let (status, _, reply) = self.post_json("/del", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            reply,
            json!({"messages": null, "status": "ok"}),
            "DEL {session}"
        );
    }

    /// Sends `request` bytes as-is on a fresh TCP connection and reads one response
    /// (status line, headers and a Content-Length body, or up to EOF), waiting at
    /// most `timeout`. For what a well-behaved client cannot send, such as a
    /// Content-Length far beyond the body that follows.
    pub async fn raw_exchange(&self, request: &[u8], timeout: Duration) -> RawReply {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.addr()).await?;
            stream.write_all(request).await?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(reply) = RawReply::parse(&buf) {
                    return Ok::<_, std::io::Error>(reply);
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(RawReply::parse_to_eof(&buf));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => panic!("raw exchange with {}: {e}", self.addr()),
            Err(_) => panic!(
                "raw exchange with {}: no complete reply within {timeout:?}",
                self.addr()
            ),
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- msghandler log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
            if let Some(nginx) = &self.nginx {
                eprintln!("----- nginx log -----\n{}", nginx.log());
            }
        }
    }
}

/// Starts a core and a handler in front of it.
pub fn start(core: CoreOptions, handler: HandlerOptions) -> (Core, Handler) {
    let core = Core::start(core);
    let handler = Handler::start(core.socket(), handler);
    (core, handler)
}

/// Starts a core and a handler with default options (poll timeout 1 s).
pub fn start_default() -> (Core, Handler) {
    start(CoreOptions::default(), HandlerOptions::default())
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("reading the bound address")
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// One HTTP reply, body read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body text if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply ({}) is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is not text").to_owned())
    }
}

/// A reply read off a raw TCP socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    /// A complete reply at the start of `buf`, if there is one (head plus as many
    /// body bytes as Content-Length says; without Content-Length only EOF ends it).
    fn parse(buf: &[u8]) -> Option<RawReply> {
        let (mut reply, body_start) = Self::parse_head(buf)?;
        let len: usize = reply.header("content-length")?.trim().parse().ok()?;
        let body = buf.get(body_start..body_start + len)?;
        reply.body = body.to_vec();
        Some(reply)
    }

    fn parse_to_eof(buf: &[u8]) -> RawReply {
        let (mut reply, body_start) = Self::parse_head(buf).unwrap_or_else(|| {
            panic!(
                "connection closed before a complete response head: {:?}",
                String::from_utf8_lossy(buf)
            )
        });
        reply.body = buf[body_start..].to_vec();
        reply
    }

    fn parse_head(buf: &[u8]) -> Option<(RawReply, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let body_start = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(e) => panic!(
                "malformed response head ({e}): {:?}",
                String::from_utf8_lossy(buf)
            ),
        };
        let headers = response
            .headers
            .iter()
            .map(|h| {
                let value = std::str::from_utf8(h.value).expect("header value is not text");
                (h.name.to_ascii_lowercase(), value.to_owned())
            })
            .collect();
        let status = response.code.expect("a complete head has a status");
        Some((
            RawReply {
                status,
                headers,
                body: Vec::new(),
            },
            body_start,
        ))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

// ---------------------------------------------------------------------------
// x0 bodies and checks
// ---------------------------------------------------------------------------

/// Asserts an x0 SET reply that stored a message; returns its id.
pub fn assert_ok_with_id(reply: &Value, what: &str) -> u64 {
    assert_eq!(reply["status"], "ok", "{what}: {reply}");
    assert_eq!(reply["messages"], Value::Null, "{what}: {reply}");
    reply["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no message id in {reply}"))
}

/// The long-poll body the real x0 client sends.
pub fn x0_get_body(session: &str) -> String {
    json!({
        "session_src": session,
        "type": "GET",
        "SessionData": {"ID": "SYS_SESSION", "Value": session}
    })
    .to_string()
}

/// `messages` of a poll reply: Some(array) or None for null. Panics on anything
/// else (an error body, a missing key).
pub fn messages_of(reply: &Value) -> Option<Vec<Value>> {
    match reply.get("messages") {
        Some(Value::Null) => None,
        Some(Value::Array(messages)) => Some(messages.clone()),
        _ => panic!("not a poll reply: {reply}"),
    }
}

/// Asserts that `reply` is the x0 error body of kind `kind` and returns its text.
pub fn assert_error(reply: &Value, kind: &str) -> String {
    assert_eq!(
        reply.get("error"),
        Some(&Value::Bool(true)),
        "expected an error body, got {reply}"
    );
    assert_eq!(
        reply.get("exception_id").and_then(Value::as_str),
        Some(kind),
        "expected exception_id {kind:?}, got {reply}"
    );
    let text = reply
        .get("exception")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("error body without an exception text: {reply}"));
    assert!(!text.is_empty(), "empty exception text: {reply}");
    text.to_owned()
}

/// A unique-enough session id for one test (tests share nothing, but readable
/// distinct names help when reading logs).
pub fn session(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// The members of a JSON object as their raw text, exactly as they appear in
/// `json` (for "passes through untouched" checks that a parsed Value would hide).
pub fn raw_members(json: &str) -> std::collections::BTreeMap<String, String> {
    let members: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not a JSON object ({e}): {json}"));
    members
        .into_iter()
        .map(|(k, v)| (k, v.get().to_owned()))
        .collect()
}

/// The elements of a JSON array as their raw text.
pub fn raw_elements(json: &str) -> Vec<String> {
    let elements: Vec<Box<serde_json::value::RawValue>> =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not a JSON array ({e}): {json}"));
    elements.into_iter().map(|v| v.get().to_owned()).collect()
}

/// One JSON POST to `addr` that may fail (refused connection, reset, timeout, a
/// non-JSON body): for load that keeps going while processes are killed under it.
pub async fn try_post(addr: SocketAddr, path: &str, body: String) -> Result<Value, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not JSON ({e}): {body:?}"))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no reply within {REQUEST_TIMEOUT:?}")))
}

// ---------------------------------------------------------------------------
// API v1 (docs/API.md)
// ---------------------------------------------------------------------------

/// The backend key [`HandlerOptions::with_backend_key`] configures and
/// [`Handler::backend`] sends.
pub const BACKEND_KEY: &str = "e2e-backend-key";

/// The headers of a v1 client call: plain JSON, nothing x0-specific.
const V1_HEADERS: &[(&str, &str)] = &[("Content-Type", "application/json")];

impl HandlerOptions {
    /// These options plus `backend_key = BACKEND_KEY`: without a key the backend
    /// API answers 403, so every test that binds, kicks or publishes to users needs it.
    pub fn with_backend_key(mut self) -> HandlerOptions {
        self.extra_toml
            .push_str(&format!("backend_key = {}\n", Value::from(BACKEND_KEY)));
        self
    }
}

impl Handler {
    /// POST `body` as JSON to `path` with `headers` added to the JSON content type;
    /// the reply must be JSON (errors included: every v1 error has the x0 body).
    pub async fn v1_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> (StatusCode, Value) {
        let all: Vec<(&str, &str)> = V1_HEADERS.iter().chain(headers).copied().collect();
        let reply = self
            .request(Method::POST, path, &all, body.to_string())
            .await;
        (reply.status, reply.json())
    }

    /// POST `body` to a v1 path (`/v1/publish`, `/v1/subscribe`, ...).
    pub async fn v1(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.v1_with(path, &[], &body).await
    }

    /// A v1 call that must answer 200; returns the reply.
    pub async fn v1_ok(&self, path: &str, body: Value) -> Value {
        let (status, reply) = self.v1(path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "POST {path} {body}: {reply}");
        reply
    }

    /// GET a v1 path with its query string (`/v1/presence?channel=C`).
    pub async fn v1_get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let reply = self
            .request(Method::GET, path_and_query, &[], Bytes::new())
            .await;
        (reply.status, reply.json())
    }

    /// POST `body` to a backend path (`/v1/backend/...`) with the right key.
    pub async fn backend(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let auth = format!("Bearer {BACKEND_KEY}");
        self.v1_with(path, &[("Authorization", &auth)], &body).await
    }

    /// A backend call that must answer 200; returns the reply.
    pub async fn backend_ok(&self, path: &str, body: Value) -> Value {
        let (status, reply) = self.backend(path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "POST {path} {body}: {reply}");
        reply
    }

    /// `POST /v1/poll` with `body`, which must answer 200 with a consistent reply
    /// (`ids` are the envelopes' ids in order, `cursor` the highest of them);
    /// returns the envelopes.
    pub async fn v1_poll_with(&self, body: Value) -> Vec<Value> {
        let reply = self.v1_ok("/v1/poll", body.clone()).await;
        let what = format!("POST /v1/poll {body}");
        let messages = reply["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no messages array in {reply}"))
            .clone();
        let ids = ids_of(&messages);
        assert_eq!(reply["ids"], json!(ids), "{what}: ids beside messages");
        match ids.iter().max() {
            Some(max) => assert_eq!(reply["cursor"], json!(max), "{what}: cursor"),
            None => assert!(
                reply["cursor"].is_null(),
                "{what}: cursor without messages: {reply}"
            ),
        }
        messages
    }

    /// `POST /v1/poll` for `session` waiting at most `timeout` seconds.
    pub async fn v1_poll(&self, session: &str, timeout: f64) -> Vec<Value> {
        self.v1_poll_with(json!({"session": session, "timeout": timeout}))
            .await
    }

    /// Polls `session` until a poll waits `timeout` seconds for nothing; returns
    /// everything it was given, in order.
    pub async fn v1_drain(&self, session: &str, timeout: f64) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let batch = self.v1_poll(session, timeout).await;
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }
}

/// Asserts a v1 error: `status` and the x0 error body of kind `kind`; returns its
/// text.
pub fn assert_v1_error(
    (status, reply): &(StatusCode, Value),
    expected: StatusCode,
    kind: &str,
) -> String {
    assert_eq!(*status, expected, "expected {expected} {kind}, got {reply}");
    assert_error(reply, kind)
}

/// The `data` of each envelope, in order.
pub fn data_of(envelopes: &[Value]) -> Vec<Value> {
    envelopes.iter().map(|e| e["data"].clone()).collect()
}

/// The `id` of an envelope or of a publish reply.
pub fn id_of(json: &Value) -> u64 {
    json["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no message id in {json}"))
}

/// The `id` of each envelope, in order.
pub fn ids_of(envelopes: &[Value]) -> Vec<u64> {
    envelopes.iter().map(id_of).collect()
}

// ---------------------------------------------------------------------------
// Server-Sent Events (docs/TRANSPORTS.md)
// ---------------------------------------------------------------------------

/// How long the head of an event stream may take: it comes before any event.
const SSE_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// One block of an event stream: the lines up to the blank line that ends them (an
/// event, a `retry:` line, a comment), without their line endings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseBlock {
    pub lines: Vec<String>,
}

impl SseBlock {
    /// The value of the first `name:` line (one space after the colon dropped, as
    /// EventSource does).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            Some(value.strip_prefix(' ').unwrap_or(value))
        })
    }

    /// How many `data:` lines the block has.
    pub fn data_lines(&self) -> usize {
        self.lines.iter().filter(|l| l.starts_with("data:")).count()
    }

    /// The `data:` line parsed as JSON; panics unless there is exactly one and it
    /// is JSON.
    pub fn json(&self) -> Value {
        assert_eq!(self.data_lines(), 1, "one data line per event: {self:?}");
        let data = self.field("data").expect("counted above");
        serde_json::from_str(data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {self:?}"))
    }

    /// `id:` as a number; panics without one.
    pub fn id(&self) -> u64 {
        self.field("id")
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no numeric id: {self:?}"))
    }

    /// Only comment lines (`: heartbeat`).
    pub fn is_comment(&self) -> bool {
        self.lines.iter().all(|l| l.starts_with(':'))
    }

    /// Carries data, so EventSource dispatches it.
    pub fn is_event(&self) -> bool {
        self.data_lines() > 0
    }
}

/// What an event stream did next.
#[derive(Debug)]
pub enum SseNext {
    Block(SseBlock),
    /// The server ended the response (or the connection went).
    Ended,
    /// Nothing complete arrived within the wait.
    Silent,
}

/// An open `GET /v1/events` response, read block by block as EventSource would.
pub struct EventStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: hyper::body::Incoming,
    /// Bytes of a line not yet complete.
    partial: Vec<u8>,
    /// Lines of the block being read: kept here so that a wait that runs out in
    /// the middle of a block loses nothing.
    block: Vec<String>,
    /// Every line read so far (to check what the stream starts with).
    pub first_lines: Vec<String>,
    ended: bool,
    /// Kept open with the stream: a dropped sender may let hyper close the
    /// connection before the endless body is done.
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Drives the socket. Aborted on drop so that dropping the stream closes the TCP
    /// connection at once, as a closed tab does.
    conn: tokio::task::JoinHandle<()>,
}

impl EventStream {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is not text").to_owned())
    }

    /// The next block, the end of the stream, or silence after `within`.
    pub async fn next(&mut self, within: Duration) -> SseNext {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.partial.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let line = String::from_utf8(line).expect("an event stream is UTF-8");
                if self.first_lines.len() < 16 {
                    self.first_lines.push(line.clone());
                }
                if !line.is_empty() {
                    self.block.push(line);
                } else if !self.block.is_empty() {
                    return SseNext::Block(SseBlock {
                        lines: std::mem::take(&mut self.block),
                    });
                }
            }
            if self.ended {
                return SseNext::Ended;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return SseNext::Silent,
                Ok(None) | Ok(Some(Err(_))) => self.ended = true,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.partial.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next block that carries data (comments and `retry:` blocks skipped);
    /// panics if the stream ends or nothing comes within `within`.
    pub async fn event(&mut self, within: Duration) -> SseBlock {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                SseNext::Block(block) if block.is_event() => return block,
                SseNext::Block(_) => continue,
                SseNext::Ended => panic!("the event stream ended while an event was due"),
                SseNext::Silent => panic!("no event within {within:?}"),
            }
        }
    }

    /// `count` events in a row.
    pub async fn events(&mut self, count: usize, within: Duration) -> Vec<SseBlock> {
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            events.push(self.event(within).await);
        }
        events
    }

    /// Asserts that no event comes within `within` (comments may).
    pub async fn assert_no_event(&mut self, within: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                SseNext::Block(block) if block.is_event() => {
                    panic!("{what}: expected no event, got {block:?}")
                }
                SseNext::Block(_) => continue,
                SseNext::Ended => panic!("{what}: the stream ended"),
                SseNext::Silent => return,
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Handler {
    /// `GET /v1/events?<query>` with `headers` (`Last-Event-ID`), as EventSource
    /// sends it; returns once the response head is in, whatever its status.
    pub async fn events(&self, query: &str, headers: &[(&str, &str)]) -> EventStream {
        let path = format!("/v1/events?{query}");
        let open = async {
            let stream = tokio::net::TcpStream::connect(self.addr()).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let conn = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = hyper::Request::builder()
                .method(Method::GET)
                .uri(&path)
                .header(hyper::header::HOST, self.addr().to_string())
                .header(hyper::header::ACCEPT, "text/event-stream")
                .header(hyper::header::CACHE_CONTROL, "no-cache");
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            let response = sender
                .send_request(req.body(Full::new(Bytes::new()))?)
                .await?;
            let (parts, body) = response.into_parts();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(EventStream {
                status: parts.status,
                headers: parts.headers,
                body,
                partial: Vec::new(),
                block: Vec::new(),
                first_lines: Vec::new(),
                ended: false,
                _sender: sender,
                conn,
            })
        };
        match tokio::time::timeout(SSE_HEAD_TIMEOUT, open).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => panic!("GET {path}: {e}"),
            Err(_) => panic!("GET {path}: no response head within {SSE_HEAD_TIMEOUT:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// systemd, played by the test: socket activation and sd_notify
// ---------------------------------------------------------------------------

/// A service manager's notification socket (`NOTIFY_SOCKET`), bound the way systemd
/// binds its own: a Unix datagram socket that any user may write to, so that a core
/// that has dropped to `www-data` still reaches it.
pub struct NotifySocket {
    _dir: TempDir,
    path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = temp_dir("micromsg-notify-");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("opening the notify directory for traversal");
        let path = dir.path().join("notify");
        let socket =
            std::os::unix::net::UnixDatagram::bind(&path).expect("binding the notify socket");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .expect("opening the notify socket to every user");
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    /// What to set `NOTIFY_SOCKET` to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads notifications until one has the line `state` (e.g. "READY=1"); returns
    /// every line read, or None if `timeout` passed first.
    pub fn wait_for(&self, state: &str, timeout: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("setting the notify socket's timeout");
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let done = text.lines().any(|line| line == state);
                    lines.extend(text.lines().map(str::to_owned));
                    if done {
                        return Some(lines);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
    }
}

/// msghandler started the way systemd's `msghandler.socket` starts it: the test
/// holds the listening socket for its whole life, and each process gets it as fd 3
/// with `LISTEN_FDS=1` and `LISTEN_PID` set to its own pid (sd_listen_fds(3)).
/// Between two processes nobody accepts, and connections wait in the backlog.
pub struct ActivatedHandler {
    dir: TempDir,
    listener: TcpListener,
    core_socket: PathBuf,
    options: HandlerOptions,
    notify: NotifySocket,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ActivatedHandler {
    /// Binds a listening socket on a free port of 127.0.0.1, starts msghandler on it
    /// for the core at `core_socket`, and waits for its READY=1.
    pub fn start(core_socket: &Path, options: HandlerOptions) -> ActivatedHandler {
        let dir = temp_dir("micromsg-handler-");
        std::fs::write(dir.path().join("msghandler.toml"), options.toml())
            .expect("writing msghandler.toml");
        let log = dir.path().join("msghandler.log");
        let mut handler = ActivatedHandler {
            listener: TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"),
            dir,
            core_socket: core_socket.to_owned(),
            options,
            notify: NotifySocket::bind(),
            log,
            child: None,
            starts: 0,
        };
        handler.spawn_and_wait_ready();
        handler
    }

    /// What `systemctl restart msghandler.service` does: SIGTERM, wait for the exit
    /// (panics if it does not come within `timeout` or is not 0), then start a new
    /// process on the same listening socket and wait for its READY=1. Returns how
    /// long no process was accepting.
    pub fn restart(&mut self, timeout: Duration) -> Duration {
        let mut child = self.child.take().expect("msghandler is not running");
        signal(&child, Signal::SIGTERM);
        let stopping = Instant::now();
        match wait_timeout(&mut child, timeout) {
            Some(status) => assert!(
                status.success(),
                "msghandler exited with {status} on SIGTERM; log:\n{}",
                self.log()
            ),
            None => {
                sigkill_and_reap(&mut child);
                panic!("msghandler did not exit within {timeout:?} of SIGTERM");
            }
        }
        self.spawn_and_wait_ready();
        stopping.elapsed()
    }

    fn spawn_and_wait_ready(&mut self) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        self.starts += 1;
        // sh sets LISTEN_PID to its own pid and then becomes msghandler with exec, so
        // the variable names the msghandler process, as systemd's does.
        let mut cmd = command(
            Path::new("/bin/sh"),
            &self.log,
            &format!("msghandler start #{} (socket-activated)", self.starts),
        );
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(&binaries().msghandler)
            .arg("--socket")
            .arg(&self.core_socket)
            .arg("--poll-timeout")
            .arg(self.options.poll_timeout.to_string())
            .arg("--config")
            .arg(self.dir.path().join("msghandler.toml"))
            .env("LISTEN_FDS", "1")
            .env("NOTIFY_SOCKET", self.notify.path());
        let fd = self.listener.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
        // dup2 gives fd 3 without close-on-exec; when the socket already is fd 3,
        // the flag is cleared instead.
        unsafe {
            cmd.pre_exec(move || {
                let ok = if fd == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0) != -1
                } else {
                    nix::libc::dup2(fd, 3) != -1
                };
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn().expect("spawning msghandler");
        match self.notify.wait_for("READY=1", STARTUP_TIMEOUT) {
            Some(_) => self.child = Some(child),
            None => {
                sigkill_and_reap(&mut child);
                panic!(
                    "msghandler sent no READY=1 within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("reading the listening address")
    }

    /// Everything every msghandler process wrote, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for ActivatedHandler {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            sigkill_and_reap(child);
        }
        if std::thread::panicking() {
            eprintln!(
                "----- msghandler log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// /v1 helpers shared by the routing and cluster tests
// ---------------------------------------------------------------------------

/// `/v1/subscribe` for `session` with the keys of `subscription`; must succeed.
pub async fn subscribe(h: &Handler, session: &str, mut subscription: Value) -> Value {
    subscription["session"] = json!(session);
    let reply = h.v1_ok("/v1/subscribe", subscription).await;
    assert_eq!(reply["subscribed"], true, "subscribe {session}: {reply}");
    reply
}

/// `/v1/unsubscribe` for `session`; returns how many subscriptions went.
pub async fn unsubscribe(h: &Handler, session: &str, mut subscription: Value) -> u64 {
    subscription["session"] = json!(session);
    let reply = h.v1_ok("/v1/unsubscribe", subscription).await;
    reply["unsubscribed"]
        .as_u64()
        .unwrap_or_else(|| panic!("unsubscribe {session}: {reply}"))
}

/// A client publish of `data` from `session` to `target`; must succeed.
pub async fn publish(h: &Handler, session: &str, target: Value, data: Value) -> Value {
    h.v1_ok(
        "/v1/publish",
        json!({"session": session, "target": target, "data": data}),
    )
    .await
}

/// A backend publish (no source) of `data` to `target`; must succeed.
pub async fn backend_publish(h: &Handler, target: Value, data: Value) -> Value {
    h.backend_ok(
        "/v1/backend/publish",
        json!({"target": target, "data": data}),
    )
    .await
}

/// The backend binds `session` to `user` (not exclusively).
pub async fn bind(h: &Handler, session: &str, user: &str) {
    let reply = h
        .backend_ok(
            "/v1/backend/bind",
            json!({"session": session, "user": user}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "bind {session} to {user}: {reply}");
}

/// The backend kicks `session`.
pub async fn kick(h: &Handler, session: &str, reason: &str) {
    let reply = h
        .backend_ok(
            "/v1/backend/kick",
            json!({"session": session, "reason": reason}),
        )
        .await;
    assert_eq!(reply, json!({"status": "ok"}), "kick {session}");
}

/// How many sessions a publish reached.
pub fn recipients(reply: &Value) -> u64 {
    reply["recipients"]
        .as_u64()
        .unwrap_or_else(|| panic!("no recipients in {reply}"))
}

/// `data.<key>` of each envelope as a number.
pub fn numbers(envelopes: &[Value], key: &str) -> Vec<u64> {
    data_of(envelopes)
        .iter()
        .map(|d| {
            d[key]
                .as_u64()
                .unwrap_or_else(|| panic!("no number {key:?} in {d}"))
        })
        .collect()
}

pub fn assert_nothing(what: &str, envelopes: &[Value]) {
    assert!(
        envelopes.is_empty(),
        "{what} should have got nothing, got {envelopes:?}"
    );
}

/// Publishes `data: {"n": n}` for each n in `range` to `channel` from the backend
/// through `h`; returns the publish replies.
pub async fn publish_numbered(
    h: &Handler,
    channel: &str,
    range: std::ops::Range<u64>,
) -> Vec<Value> {
    let mut replies = Vec::new();
    for n in range {
        replies.push(backend_publish(h, json!({"channel": channel}), json!({"n": n})).await);
    }
    replies
}

/// A consumer group's share-out of jobs `0..n` (`data.job`): `got[i]` is what
/// `members[i]` received. Each member got a fair share (a count in `fair`), in
/// order, and every job went to exactly one member.
pub fn assert_shared_out(
    members: &[String],
    got: &[Vec<Value>],
    n: usize,
    fair: std::ops::RangeInclusive<usize>,
) {
    let mut copies = vec![0u32; n];
    for (m, envelopes) in members.iter().zip(got) {
        let jobs = numbers(envelopes, "job");
        println!("{m}: {} of {n} jobs", jobs.len());
        assert!(
            fair.contains(&jobs.len()),
            "{m} got {} of {n} jobs, not a fair share ({fair:?})",
            jobs.len()
        );
        assert!(
            jobs.windows(2).all(|w| w[0] < w[1]),
            "{m} got its share out of order: {jobs:?}"
        );
        for job in jobs {
            copies[job as usize] += 1;
        }
    }
    let lost: Vec<usize> = (0..n).filter(|&j| copies[j] == 0).collect();
    let doubled: Vec<usize> = (0..n).filter(|&j| copies[j] > 1).collect();
    assert!(lost.is_empty(), "jobs given to no member: {lost:?}");
    assert!(doubled.is_empty(), "jobs given to two members: {doubled:?}");
}
