//! The WebSocket transport as msgbench's subscribers speak it (`/v1/ws`,
//! docs/TRANSPORTS.md): opening a connection and checking its welcome, the frames
//! read from it and the acknowledgement written to it.
//!
//! The client is tokio-tungstenite, a real RFC 6455 implementation, so that what is
//! measured is the server's framing and not a shortcut of ours.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// One subscriber's connection.
pub type Socket = WebSocketStream<TcpStream>;

/// The flow control a subscriber asks for in the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Every message pushed as soon as it arrives, and acknowledged by the server
    /// once written to the socket: the client sends no acks.
    Fast,
    /// At most N messages given and not acknowledged; the client acks what it got.
    Window(u32),
}

impl Flow {
    /// The name the server's welcome frame gives it.
    pub fn name(self) -> &'static str {
        match self {
            Flow::Fast => "fast",
            Flow::Window(_) => "window",
        }
    }

    pub fn window(self) -> Option<u32> {
        match self {
            Flow::Fast => None,
            Flow::Window(n) => Some(n),
        }
    }
}

/// The path and query that open session `session`'s WebSocket in `flow`.
pub fn path(session: &str, flow: Flow) -> String {
    match flow {
        Flow::Fast => format!("/v1/ws?session={session}&flow=fast"),
        Flow::Window(n) => format!("/v1/ws?session={session}&flow=window&window={n}"),
    }
}

/// Opens session `session`'s WebSocket at `addr` over a TCP_NODELAY socket and
/// reads the welcome frame, which must come first and confirm the flow asked for;
/// all within `limit`.
pub async fn connect(
    addr: SocketAddr,
    session: &str,
    flow: Flow,
    limit: Duration,
) -> Result<Socket> {
    let url = format!("ws://{addr}{}", path(session, flow));
    let opened = tokio::time::timeout(limit, async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut socket, _response) = tokio_tungstenite::client_async(url.as_str(), stream)
            .await
            .with_context(|| format!("upgrading GET {url}"))?;
        let first = loop {
            match socket.next().await {
                Some(Ok(WsMessage::Text(text))) => break text,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => bail!("{url}: the first frame is not a welcome: {other:?}"),
                Some(Err(error)) => bail!("{url}: {error}"),
                None => bail!("{url}: closed before its welcome"),
            }
        };
        check_welcome(first.as_str(), session, flow).with_context(|| url.clone())?;
        Ok(socket)
    })
    .await;
    opened.unwrap_or_else(|_| bail!("{url}: no welcome within {} s", limit.as_secs_f64()))
}

/// `{"op":"welcome","session":S,"flow":F,"window":N}`, for this session and flow.
fn check_welcome(text: &str, session: &str, flow: Flow) -> Result<()> {
    #[derive(Deserialize)]
    struct Welcome<'a> {
        #[serde(borrow)]
        op: Cow<'a, str>,
        #[serde(borrow)]
        session: Cow<'a, str>,
        #[serde(borrow)]
        flow: Cow<'a, str>,
        window: Option<u32>,
    }
    let welcome: Welcome = serde_json::from_str(text)
        .with_context(|| format!("the first frame is not a welcome: {text}"))?;
    if welcome.op != "welcome"
        || welcome.session != session
        || welcome.flow != flow.name()
        || welcome.window != flow.window()
    {
        bail!(
            "welcomed as {text}, asked for session {session} in {} flow",
            flow.name()
        );
    }
    Ok(())
}

/// A frame from the server, as far as a subscriber reads it: `message` frames
/// carry `id` and the delivered `message` (read as `M`), `error` frames the
/// refusal's names. Other frames (`acked`, `pong`, ...) only have their `op` read.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a, M> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    pub id: Option<u64>,
    pub message: Option<M>,
    #[serde(borrow)]
    pub exception_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub exception: Option<Cow<'a, str>>,
}

/// `{"op":"ack","ids":[...]}`: acknowledges these messages given on the connection.
pub fn ack_frame(ids: &[u64]) -> String {
    let mut out = String::with_capacity(20 + ids.len() * 17);
    out.push_str(r#"{"op":"ack","ids":["#);
    for (k, id) in ids.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push_str(&id.to_string());
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_url_asks_for_the_flow() {
        assert_eq!(path("sub3", Flow::Fast), "/v1/ws?session=sub3&flow=fast");
        assert_eq!(
            path("sub3", Flow::Window(32)),
            "/v1/ws?session=sub3&flow=window&window=32"
        );
    }

    #[test]
    fn a_welcome_must_name_the_session_and_flow_asked_for() {
        let fast = r#"{"op":"welcome","session":"sub1","flow":"fast"}"#;
        assert!(check_welcome(fast, "sub1", Flow::Fast).is_ok());
        assert!(check_welcome(fast, "sub2", Flow::Fast).is_err());
        assert!(check_welcome(fast, "sub1", Flow::Window(32)).is_err());
        let window = r#"{"op":"welcome","session":"sub1","flow":"window","window":8}"#;
        assert!(check_welcome(window, "sub1", Flow::Window(8)).is_ok());
        assert!(check_welcome(window, "sub1", Flow::Window(32)).is_err());
        let refused = r#"{"op":"error","exception_id":"InvalidField","exception":"flow"}"#;
        assert!(check_welcome(refused, "sub1", Flow::Fast).is_err());
    }

    #[test]
    fn message_and_error_frames_read_back() {
        let frame: ServerFrame<Value> =
            serde_json::from_str(r#"{"op":"message","id":17,"message":{"seq":1}}"#).unwrap();
        assert_eq!((frame.op.as_ref(), frame.id), ("message", Some(17)));
        assert_eq!(frame.message.unwrap()["seq"], 1);
        let frame: ServerFrame<Value> = serde_json::from_str(
            r#"{"op":"error","exception_id":"Kicked","exception":"bye","ref":null}"#,
        )
        .unwrap();
        assert_eq!(frame.exception_id.as_deref(), Some("Kicked"));
        assert!(frame.message.is_none());
    }

    #[test]
    fn an_ack_frame_lists_the_ids() {
        assert_eq!(ack_frame(&[17]), r#"{"op":"ack","ids":[17]}"#);
        assert_eq!(ack_frame(&[17, 18, 20]), r#"{"op":"ack","ids":[17,18,20]}"#);
        let parsed: Value = serde_json::from_str(&ack_frame(&[1, 2])).unwrap();
        assert_eq!(parsed["ids"], serde_json::json!([1, 2]));
    }
}
