//! For the tests beside the code: msghandler's routes on a real TCP socket, in front
//! of no core at all or of a scripted stand-in for one on a Unix socket.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ipc::{
    ClientFrame, FrameCodec, Hello, Request as CoreRequest, Response as CoreResponse, ServerFrame,
    Welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::task::TaskTracker;

use crate::backend_key::BackendKey;
use crate::config::Secret;
use crate::core_link::{CorePool, PoolConfig};
use crate::http::{App, Cors, Streams, handle};

/// Answers a core request, or leaves it unanswered with `None`.
pub type Script = fn(&CoreRequest) -> Option<CoreResponse>;

/// What the stand-in core was asked, in order (heartbeats left out).
pub type Asked = Arc<Mutex<Vec<CoreRequest>>>;

fn socket_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("msghandler-http-{}-{n}.sock", std::process::id()))
}

/// Removes the stand-in core's socket file when the test ends.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A durable core that answers as `script` says.
pub fn fake_core(script: Script) -> (SocketFile, Asked) {
    fake_core_answering(move |request| script(request).map(|response| (0, response)))
}

/// A core whose answers come after a delay (ms), for races between an answer and
/// what the handler does meanwhile.
pub type DelayedScript = fn(&CoreRequest) -> Option<(u64, CoreResponse)>;

pub fn fake_core_delayed(script: DelayedScript) -> (SocketFile, Asked) {
    fake_core_answering(script)
}

fn fake_core_answering(
    answer: impl Fn(&CoreRequest) -> Option<(u64, CoreResponse)> + Send + Sync + 'static,
) -> (SocketFile, Asked) {
    let answer = std::sync::Arc::new(answer);
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let asked = Asked::default();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                let mut reader = FramedRead::new(r, FrameCodec::<Hello, Welcome>::new());
                let mut writer = FramedWrite::new(w, FrameCodec::<Hello, Welcome>::new());
                reader.next().await.unwrap().unwrap();
                let accepted = Welcome::Accepted {
                    version: ipc::PROTOCOL_VERSION,
                    durable: true,
                };
                writer.send(accepted).await.unwrap();
                let mut reader = reader.map_decoder(FrameCodec::retype::<ClientFrame, ServerFrame>);
                let mut writer = writer.map_encoder(FrameCodec::retype::<ClientFrame, ServerFrame>);
                // One writer, so that answers without a delay keep their order.
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ServerFrame>();
                tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        if writer.send(frame).await.is_err() {
                            return;
                        }
                    }
                });
                while let Some(Ok(frame)) = reader.next().await {
                    let reply = match &frame.request {
                        CoreRequest::Ping => Some((0, CoreResponse::Pong)),
                        other => {
                            log.lock().unwrap().push(other.clone());
                            answer(other)
                        }
                    };
                    let Some((ms, response)) = reply else {
                        continue;
                    };
                    let reply = ServerFrame {
                        id: frame.id,
                        response,
                    };
                    if ms == 0 {
                        let _ = tx.send(reply);
                    } else {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            let _ = tx.send(reply);
                        });
                    }
                }
            });
        }
    });
    (SocketFile(path), asked)
}

/// A socket path nothing listens on.
pub fn no_core() -> PathBuf {
    socket_path()
}

/// The streaming settings of the tests: the configuration's defaults.
pub fn streams() -> Streams {
    Streams {
        ping_interval: Duration::from_secs(20),
        send_timeout: Duration::from_secs(10),
        max_buffer: 1 << 20,
        heartbeat: Duration::from_secs(15),
        default_window: 32,
        max_window: 1024,
    }
}

pub struct Handler {
    pub addr: std::net::SocketAddr,
    pub stop: watch::Sender<bool>,
    pub tasks: TaskTracker,
}

pub async fn handler(socket: PathBuf, backend_key: Option<&str>) -> Handler {
    handler_with(socket, backend_key, streams()).await
}

/// A handler with `max_body_bytes` 1024 and a poll timeout of 200 ms.
pub async fn handler_with(socket: PathBuf, backend_key: Option<&str>, streams: Streams) -> Handler {
    let core = CorePool::start(PoolConfig {
        socket,
        connections: 1,
        max_in_flight: 64,
        heartbeat_interval: Duration::from_secs(5),
        core_wait: Duration::from_millis(300),
    });
    let (stop, shutdown) = watch::channel(false);
    let key = backend_key.map(|k| Secret(k.into()));
    let tasks = TaskTracker::new();
    let metrics = crate::metrics::Metrics::new(&["127.0.0.1".to_owned()])
        .unwrap()
        .worker(core.metrics().clone());
    let app = Arc::new(App {
        core,
        metrics,
        poll_timeout: Duration::from_millis(200),
        max_body_bytes: 1024,
        body_read_timeout: Duration::from_secs(5),
        cors: Cors::new(&["*".to_owned()]).unwrap(),
        backend_key: BackendKey::from_config(key.as_ref(), None)
            .unwrap()
            .map(Arc::new),
        tokens: None,
        limits: Arc::new(crate::limits::Limits::new(&Default::default()).unwrap()),
        bindings: Default::default(),
        shutdown,
        streams,
        tasks: tasks.clone(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let app = app.clone();
            let service = service_fn(move |request| handle(app.clone(), peer.ip(), request));
            tokio::spawn(
                http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    Handler { addr, stop, tasks }
}

pub struct Answer {
    pub status: u16,
    /// The header lines, lower-cased.
    pub head: String,
    pub body: serde_json::Value,
    /// The body as it came.
    pub text: String,
}

impl Handler {
    pub async fn call(&self, method: &str, path: &str, headers: &[&str], body: &str) -> Answer {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        Answer {
            status: head[9..12].parse().unwrap(),
            head: head.to_ascii_lowercase(),
            body: serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
            text: body.to_owned(),
        }
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.call("POST", path, &[], body).await
    }
}

impl Answer {
    pub fn refusal(&self) -> (u16, &str) {
        (
            self.status,
            self.body["exception_id"].as_str().unwrap_or(""),
        )
    }
}

/// Reads from `stream` into `seen` until it holds `needle`; panics after 5 s.
pub async fn read_until(stream: &mut TcpStream, seen: &mut String, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0; 4096];
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {seen:?}"))
            .unwrap();
        assert!(n > 0, "closed before {needle:?} in {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Waits until the stand-in core was asked something `matches` accepts; panics
/// after 5 s.
pub async fn asked_for(asked: &Asked, matches: impl Fn(&CoreRequest) -> bool) -> CoreRequest {
    for _ in 0..500 {
        if let Some(request) = asked.lock().unwrap().iter().find(|r| matches(r)) {
            return request.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never asked; asked {:?}", asked.lock().unwrap());
}

/// Waits until the stand-in core was given back `count` messages for `session`, in
/// any number of returns; the ids in the order given back. Panics after 10 s.
pub async fn given_back(asked: &Asked, session: &str, count: usize) -> Vec<ipc::MessageId> {
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids = asked
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                CoreRequest::Return {
                    session: s,
                    messages,
                } if s == session => Some(messages),
                _ => None,
            })
            .flatten()
            .map(|m| m.id)
            .collect();
        if ids.len() >= count {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{session}: {} of {count} given back", ids.len());
}
