//! One persistent HTTP/1.1 keep-alive connection, reopened when the server closes it.
//!
//! Deliberately no pool: each task of the generator owns exactly one connection, as a
//! browser tab's long-poll loop (or its EventSource) does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

/// A reply, read to its end.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Connection {
    addr: SocketAddr,
    /// `Host` header value (hyper's low-level client does not add one).
    pub host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// The task driving the current connection: aborting it closes the socket even
    /// while a request is in flight, which dropping the sender does not.
    task: Option<AbortHandle>,
    /// How often the connection had to be opened again.
    pub reconnects: u64,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Result<Self> {
        let (sender, task) = handshake(addr).await?;
        Ok(Connection {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
            sender: Some(sender),
            task: Some(task),
            reconnects: 0,
        })
    }

    /// Sends one request and reads the whole reply within `limit` (connecting again
    /// included). A connection the server closed between requests (keep-alive limit,
    /// idle timeout) is reopened first; a failure or a timeout during the request is
    /// returned, and the next request opens a new connection.
    pub async fn send(&mut self, request: Request<Full<Bytes>>, limit: Duration) -> Result<Reply> {
        match tokio::time::timeout(limit, self.send_unbounded(request)).await {
            Ok(result) => result,
            Err(_) => {
                self.sender = None;
                anyhow::bail!("no answer within {} s", limit.as_secs_f64())
            }
        }
    }

    async fn send_unbounded(&mut self, request: Request<Full<Bytes>>) -> Result<Reply> {
        let sender = self.ready().await?;
        let result = async {
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        Ok(result?)
    }

    /// Sends one request and returns as soon as the head of the reply arrived within
    /// `limit`, its body still to be read: for a reply that does not end by itself,
    /// an event stream. The connection serves nothing else until that body ended or
    /// was dropped (dropped early, the next request opens a new connection).
    pub async fn open_stream(
        &mut self,
        request: Request<Full<Bytes>>,
        limit: Duration,
    ) -> Result<Response<Incoming>> {
        let opened = tokio::time::timeout(limit, async {
            let sender = self.ready().await?;
            Ok::<_, anyhow::Error>(sender.send_request(request).await?)
        })
        .await;
        match opened {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                self.sender = None;
                Err(error)
            }
            Err(_) => {
                self.sender = None;
                anyhow::bail!("no answer within {} s", limit.as_secs_f64())
            }
        }
    }

    /// The sender, ready for a request: a connection the server closed between
    /// requests (keep-alive limit, idle timeout) is opened again first.
    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        let usable = match &mut self.sender {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.sender = None;
            let (mut sender, task) = handshake(self.addr).await?;
            sender.ready().await.context("new connection not ready")?;
            self.sender = Some(sender);
            self.task = Some(task);
            self.reconnects += 1;
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Closes the socket at once, as a browser tab that goes away does, even in the
    /// middle of a request (a parked poll).
    pub fn close(mut self) {
        self.sender = None;
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn handshake(addr: SocketAddr) -> Result<(SendRequest<Full<Bytes>>, AbortHandle)> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: no answer within 10 s"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes the connection.
        let _ = connection.await;
    });
    Ok((sender, task.abort_handle()))
}
