//! hello — a bare hyper 1 HTTP/1.1 server, the baseline of the benchmark.
//!
//! Every request is read to its end and answered at once with 200
//! `{"messages":null,"status":"ok"}` (an `OPTIONS` preflight with 204 and the CORS
//! headers). No routing, no state: the most requests per second, and the least CPU
//! per request, that hyper on tokio reaches on this machine.
//!
//! With `--park` it reads each request and never answers it: the memory that hyper
//! itself keeps per parked request, the floor under scenario 3's figure.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A bare hyper HTTP/1.1 server answering every request with a fixed JSON reply.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Never answer: hold every request open once its body is read.
    #[arg(long)]
    park: bool,
}

const REPLY: &[u8] = br#"{"messages":null,"status":"ok"}"#;

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let preflight = request.method() == Method::OPTIONS;
    let asked_headers = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    // Read the body, as any real server must.
    let _ = request.into_body().collect().await;
    let mut response = if preflight {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        if let Some(asked) = asked_headers {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        response
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(REPLY)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    Ok(response)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = msgbench::raise_fd_limit();
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("hello: listening on http://{}", args.listen);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                eprintln!("hello: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let park = args.park;
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request: Request<Incoming>| async move {
                        if park {
                            let _ = request.into_body().collect().await;
                            return std::future::pending().await;
                        }
                        answer(request).await
                    }),
                )
                .await;
        });
    }
}
