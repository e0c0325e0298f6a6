//! The WebSocket frames of docs/TRANSPORTS.md: what a client may ask for in a frame,
//! and every frame the server sends. Pure functions over text, no I/O, like
//! [`crate::v1`], whose parsers the requests that reach the core go through.

use std::borrow::Cow;

use ipc::{Message, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::v1::{self, Answer, Route};
use crate::x0::{self, X0Error, describe_parse_error};

/// How a connection paces what it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Pushed as soon as it arrives; counts as acknowledged once written.
    Fast,
    /// Each message only after the previous one was acknowledged.
    Ack,
    /// At most this many given and not yet acknowledged.
    Window(u32),
}

impl Flow {
    /// The flow a client asks for by name (`fast`, `ack`, `window`, none: `window`)
    /// and window size (none: `default_window`), from the URL or a `flow` frame.
    pub fn parse(
        mode: Option<&str>,
        window: Option<u32>,
        default_window: u32,
        max_window: u32,
    ) -> Result<Flow, X0Error> {
        match mode {
            Some("fast") => Ok(Flow::Fast),
            Some("ack") => Ok(Flow::Ack),
            None | Some("window") => match window.unwrap_or(default_window) {
                n @ 1.. if n <= max_window => Ok(Flow::Window(n)),
                _ => Err(X0Error::new(
                    "InvalidField",
                    format!("window must be 1 to {max_window}"),
                )),
            },
            Some(other) => Err(X0Error::new(
                "InvalidField",
                format!("flow {other:?} is not one of \"fast\", \"ack\", \"window\""),
            )),
        }
    }

    /// Messages that may be given and unacknowledged at once; `None` for no limit.
    pub fn window(self) -> Option<u32> {
        match self {
            Flow::Fast => None,
            Flow::Ack => Some(1),
            Flow::Window(n) => Some(n),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Flow::Fast => "fast",
            Flow::Ack => "ack",
            Flow::Window(_) => "window",
        }
    }
}

/// A frame from the client, once understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's `ref`, as raw JSON text, to echo in the answer.
    pub reference: Option<String>,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Carried out by the core exactly as the `/v1` route of the same name would.
    Core(v1::Operation),
    Flow(Flow),
    /// The last message given on this connection, again.
    Get,
    Ping,
}

/// A frame that was refused; `reference` is echoed when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reference: Option<String>,
    pub error: X0Error,
    /// Not a request at all (not a JSON object with a known `op`): the client does
    /// not speak this protocol, and the connection ends (1008). Otherwise a request
    /// was refused, and the connection stays open.
    pub violation: bool,
}

/// What every frame has beside its operation's own keys, which are read by that
/// operation's parser (unknown keys are ignored on both passes).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FlowBody {
    mode: Option<String>,
    window: Option<u32>,
}

/// Understands a frame from the client of `session`. Requests that the `/v1` API
/// also has are parsed by its parser, with the connection's session.
pub fn parse(
    json: &[u8],
    session: &str,
    default_window: u32,
    max_window: u32,
) -> Result<Request, Refused> {
    crate::x0::require_object(json).map_err(|error| Refused {
        reference: None,
        error,
        violation: true,
    })?;
    let envelope: Envelope = serde_json::from_slice(json).map_err(|_| Refused {
        reference: None,
        error: describe_parse_error::<Envelope>(json),
        violation: true,
    })?;
    let reference = envelope.reference.map(|r| r.get().to_owned());
    let violation = |error| Refused {
        reference: reference.clone(),
        error,
        violation: true,
    };
    let refuse = |error| Refused {
        reference: reference.clone(),
        error,
        violation: false,
    };
    let Some(op) = envelope.op else {
        return Err(violation(X0Error::new("MissingField", "op is missing")));
    };
    let route = match &*op {
        "publish" => Route::Publish,
        "subscribe" => Route::Subscribe,
        "unsubscribe" => Route::Unsubscribe,
        "ack" => Route::Ack,
        "replies" => Route::Replies,
        "pause" => Route::Pause,
        "resume" => Route::Resume,
        "get" => {
            return Ok(Request {
                reference,
                op: Op::Get,
            });
        }
        "ping" => {
            return Ok(Request {
                reference,
                op: Op::Ping,
            });
        }
        "flow" => {
            let body: FlowBody = serde_json::from_slice(json)
                .map_err(|_| refuse(describe_parse_error::<FlowBody>(json)))?;
            let flow = Flow::parse(
                body.mode.as_deref(),
                body.window,
                default_window,
                max_window,
            )
            .map_err(refuse)?;
            return Ok(Request {
                reference,
                op: Op::Flow(flow),
            });
        }
        other => {
            return Err(violation(X0Error::new(
                "UnknownType",
                format!(
                    "op {other:?} is not one of publish, subscribe, unsubscribe, ack, flow, get, pause, resume, replies, ping"
                ),
            )));
        }
    };
    match v1::parse_for(route, json, Some(session)) {
        Ok(operation) => Ok(Request {
            reference,
            op: Op::Core(operation),
        }),
        Err(error) => Err(refuse(error)),
    }
}

/// `{"op":"<op>"` and the `ref`, for the caller to add its keys to and close.
fn open(op: &str, reference: Option<&str>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(r#"{"op":""#);
    out.push_str(op);
    out.push('"');
    if let Some(reference) = reference {
        out.push_str(r#","ref":"#);
        out.push_str(reference);
    }
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The first frame after the upgrade.
pub fn welcome(session: &str, flow: Flow) -> String {
    let mut out = open("welcome", None);
    out.push_str(r#","session":"#);
    out.push_str(&json_string(session));
    out.push_str(r#","flow":""#);
    out.push_str(flow.name());
    out.push('"');
    if let Some(window) = flow.window() {
        out.push_str(r#","window":"#);
        out.push_str(itoa::Buffer::new().format(window));
    }
    out.push('}');
    out
}

/// A delivered message: its body goes in as it is, one JSON value already.
pub fn message(message: &Message, again: bool) -> String {
    let mut out = String::with_capacity(message.body.len() + 48);
    out.push_str(r#"{"op":"message","id":"#);
    out.push_str(itoa::Buffer::new().format(message.id));
    out.push_str(r#","message":"#);
    out.push_str(&message.body);
    if again {
        out.push_str(r#","again":true"#);
    }
    out.push('}');
    out
}

/// `{"op":"ok"}` and `{"op":"pong"}`: answers with nothing to report.
pub fn done(op: &str, reference: Option<&str>) -> String {
    let mut out = open(op, reference);
    out.push('}');
    out
}

pub fn error(reference: Option<&str>, error: &X0Error) -> String {
    let mut out = open("error", reference);
    out.push_str(r#","exception_id":"#);
    out.push_str(&json_string(error.kind));
    out.push_str(r#","exception":"#);
    out.push_str(&json_string(&error.message));
    out.push('}');
    out
}

/// The frame for the core's answer to a request, or `None` when there is nothing to
/// say: an `ack` is answered only when it carried a `ref`, so that a client that
/// acknowledges every message is not sent a frame for each.
pub fn answer(reference: Option<&str>, answer: &Answer, response: Response) -> Option<String> {
    let mut digits = itoa::Buffer::new();
    let out = match (answer, response) {
        (_, Response::Error(e)) => {
            return Some(error(reference, &e.into()));
        }
        (
            Answer::Sent,
            Response::Sent {
                id,
                recipients,
                dropped,
                duplicate,
            },
        ) => {
            let mut out = open("published", reference);
            out.push_str(r#","id":"#);
            out.push_str(digits.format(id));
            out.push_str(r#","recipients":"#);
            out.push_str(digits.format(recipients));
            x0::close_publish_reply(&mut out, dropped, duplicate);
            return Some(out);
        }
        (
            Answer::Subscribed,
            Response::Subscribed {
                recovered,
                complete,
            },
        ) => {
            let mut out = open("subscribed", reference);
            out.push_str(r#","recovered":"#);
            out.push_str(digits.format(recovered));
            out.push_str(if complete {
                r#","complete":true"#
            } else {
                r#","complete":false"#
            });
            out
        }
        (Answer::Unsubscribed, Response::Count(n)) => {
            let mut out = open("unsubscribed", reference);
            out.push_str(r#","count":"#);
            out.push_str(digits.format(n));
            out
        }
        (Answer::Acked, Response::Acked { count }) => {
            reference?;
            let mut out = open("acked", reference);
            out.push_str(r#","count":"#);
            out.push_str(digits.format(count));
            out
        }
        (Answer::Done, Response::Done) => open("ok", reference),
        (_, other) => {
            let unexpected = X0Error::new(
                "InternalError",
                format!("unexpected reply from the core: {other:?}"),
            );
            return Some(error(reference, &unexpected));
        }
    };
    let mut out = out;
    out.push('}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::{AckSelector, ErrorKind, Subscription, Target};
    use serde_json::json;

    fn request(frame: &str) -> Request {
        parse(frame.as_bytes(), "S", 32, 1024).unwrap()
    }

    fn refused(frame: &str) -> (Option<String>, &'static str) {
        let refused = parse(frame.as_bytes(), "S", 32, 1024).unwrap_err();
        assert!(!refused.violation, "{frame} is a request");
        (refused.reference, refused.error.kind)
    }

    fn violation(frame: &str) -> (Option<String>, &'static str) {
        let refused = parse(frame.as_bytes(), "S", 32, 1024).unwrap_err();
        assert!(refused.violation, "{frame} is not a request");
        (refused.reference, refused.error.kind)
    }

    fn value(frame: &str) -> serde_json::Value {
        serde_json::from_str(frame).unwrap()
    }

    #[test]
    fn a_publish_frame_is_a_v1_publish_from_the_connections_session() {
        let r = request(
            r#"{"op":"publish","ref":{"n":[1]},"target":{"session":"B"},"data":{"k":1.50},"session":"forged"}"#,
        );
        assert_eq!(r.reference.as_deref(), Some(r#"{"n":[1]}"#));
        let Op::Core(v1::Operation::Send(send)) = r.op else {
            panic!("{:?}", r.op)
        };
        assert_eq!(send.src.as_deref(), Some("S"));
        assert_eq!(send.target, Some(Target::Session("B".into())));
        assert_eq!(send.data, r#"{"k":1.50}"#);
    }

    #[test]
    fn frames_are_refused_by_the_same_rules_as_http_bodies() {
        assert_eq!(
            refused(r#"{"op":"publish","ref":7,"target":{"user":"u"},"data":1}"#),
            (Some("7".into()), "Forbidden")
        );
        assert_eq!(
            refused(r#"{"op":"publish","ref":"a","target":{"session":"B"}}"#),
            (Some(r#""a""#.into()), "MissingField")
        );
        assert_eq!(refused(r#"{"op":"subscribe"}"#), (None, "MissingField"));
        assert_eq!(
            refused(r#"{"op":"ack","ids":[1],"cursor":2}"#).1,
            "InvalidField"
        );
    }

    #[test]
    fn subscriptions_acks_pauses_and_replies_map_to_their_core_requests() {
        let core = |frame: &str| match request(frame).op {
            Op::Core(v1::Operation::Request(request, answer)) => (request, answer),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            core(r#"{"op":"subscribe","channel":"news.>","since":4}"#),
            (
                ipc::Request::Subscribe {
                    session: "S".into(),
                    subscription: Subscription {
                        channel: "news.>".into(),
                        subject: None,
                        group: None,
                    },
                    since: Some(4),
                },
                Answer::Subscribed
            )
        );
        assert_eq!(
            core(r#"{"op":"ack","ids":[17,18]}"#).0,
            ipc::Request::Ack {
                session: "S".into(),
                which: AckSelector::Ids(vec![17, 18]),
            }
        );
        assert_eq!(
            core(r#"{"op":"ack","cursor":18}"#).0,
            ipc::Request::Ack {
                session: "S".into(),
                which: AckSelector::UpTo(18),
            }
        );
        assert_eq!(
            core(r#"{"op":"pause"}"#).0,
            ipc::Request::SetPaused {
                session: "S".into(),
                paused: true,
            }
        );
        assert_eq!(
            core(r#"{"op":"replies","reference":17,"ttl":30}"#).0,
            ipc::Request::AwaitReply {
                session: "S".into(),
                reference: 17,
                ttl_ms: 30_000,
            }
        );
        assert_eq!(
            core(r#"{"op":"unsubscribe","channel":"c"}"#).1,
            Answer::Unsubscribed
        );
    }

    #[test]
    fn flow_get_and_ping_stay_on_the_connection() {
        assert_eq!(
            request(r#"{"op":"flow","mode":"fast"}"#).op,
            Op::Flow(Flow::Fast)
        );
        assert_eq!(
            request(r#"{"op":"flow","mode":"ack"}"#).op,
            Op::Flow(Flow::Ack)
        );
        assert_eq!(
            request(r#"{"op":"flow","mode":"window","window":5}"#).op,
            Op::Flow(Flow::Window(5))
        );
        assert_eq!(
            request(r#"{"op":"flow","mode":"window"}"#).op,
            Op::Flow(Flow::Window(32))
        );
        assert_eq!(
            refused(r#"{"op":"flow","mode":"window","window":0}"#).1,
            "InvalidField"
        );
        assert_eq!(refused(r#"{"op":"flow","window":1025}"#).1, "InvalidField");
        assert_eq!(refused(r#"{"op":"flow","mode":"turbo"}"#).1, "InvalidField");
        assert_eq!(
            refused(r#"{"op":"flow","window":"x","ref":1}"#),
            (Some("1".into()), "InvalidField")
        );
        assert_eq!(request(r#"{"op":"get"}"#).op, Op::Get);
        let ping = request(r#"{"op":"ping","ref":"p1","extra":[]}"#);
        assert_eq!(
            (ping.op, ping.reference.as_deref()),
            (Op::Ping, Some(r#""p1""#))
        );
    }

    #[test]
    fn frames_that_are_not_requests_are_violations_named_precisely() {
        assert_eq!(violation("{not json"), (None, "InvalidJson"));
        assert_eq!(violation(""), (None, "InvalidJson"));
        assert_eq!(violation("[1]"), (None, "InvalidField"));
        // serde would read the elements as the envelope's fields in order.
        assert_eq!(violation(r#"["ping"]"#), (None, "InvalidField"));
        assert_eq!(violation(r#"["publish",null]"#), (None, "InvalidField"));
        assert_eq!(
            violation(r#"{"ref":3}"#),
            (Some("3".into()), "MissingField")
        );
        assert_eq!(
            violation(r#"{"op":"poll","ref":3}"#),
            (Some("3".into()), "UnknownType")
        );
        assert_eq!(violation(r#"{"op":7}"#), (None, "InvalidField"));
        // An escaped op name is still the op.
        assert_eq!(request(r#"{"op":"p\u0069ng"}"#).op, Op::Ping);
    }

    #[test]
    fn server_frames_render_as_documented() {
        assert_eq!(
            value(&welcome("a\"b", Flow::Window(32))),
            json!({"op":"welcome","session":"a\"b","flow":"window","window":32})
        );
        assert_eq!(
            value(&welcome("S", Flow::Ack)),
            json!({"op":"welcome","session":"S","flow":"ack","window":1})
        );
        assert_eq!(
            welcome("S", Flow::Fast),
            r#"{"op":"welcome","session":"S","flow":"fast"}"#
        );
        let m = Message {
            id: 17,
            body: r#"{"id":17,"data":{"n":1.50}}"#.into(),
        };
        assert_eq!(
            message(&m, false),
            r#"{"op":"message","id":17,"message":{"id":17,"data":{"n":1.50}}}"#
        );
        assert_eq!(
            message(&m, true),
            r#"{"op":"message","id":17,"message":{"id":17,"data":{"n":1.50}},"again":true}"#
        );
        assert_eq!(done("pong", Some(r#""p""#)), r#"{"op":"pong","ref":"p"}"#);
        assert_eq!(done("ok", None), r#"{"op":"ok"}"#);
        assert_eq!(
            value(&error(
                Some("[1]"),
                &X0Error::new("Kicked", "kicked: \"bye\"")
            )),
            json!({"op":"error","ref":[1],"exception_id":"Kicked","exception":"kicked: \"bye\""})
        );
    }

    #[test]
    fn core_answers_become_their_frames() {
        let sent = |dropped, duplicate| Response::Sent {
            id: 17,
            recipients: 3,
            dropped,
            duplicate,
        };
        assert_eq!(
            answer(Some("1"), &Answer::Sent, sent(0, false)).unwrap(),
            r#"{"op":"published","ref":1,"id":17,"recipients":3}"#
        );
        assert_eq!(
            answer(None, &Answer::Sent, sent(2, true)).unwrap(),
            r#"{"op":"published","id":17,"recipients":3,"dropped":2,"duplicate":true}"#
        );
        let subscribed = Response::Subscribed {
            recovered: 3,
            complete: true,
        };
        assert_eq!(
            answer(Some("2"), &Answer::Subscribed, subscribed).unwrap(),
            r#"{"op":"subscribed","ref":2,"recovered":3,"complete":true}"#
        );
        assert_eq!(
            answer(None, &Answer::Unsubscribed, Response::Count(1)).unwrap(),
            r#"{"op":"unsubscribed","count":1}"#
        );
        assert_eq!(
            answer(Some("3"), &Answer::Acked, Response::Acked { count: 2 }).unwrap(),
            r#"{"op":"acked","ref":3,"count":2}"#
        );
        assert_eq!(
            answer(None, &Answer::Acked, Response::Acked { count: 2 }),
            None
        );
        assert_eq!(
            answer(None, &Answer::Done, Response::Done).unwrap(),
            r#"{"op":"ok"}"#
        );
        let refused = Response::error(ErrorKind::MailboxFull, "full");
        assert_eq!(
            value(&answer(Some("4"), &Answer::Sent, refused).unwrap()),
            json!({"op":"error","ref":4,"exception_id":"MailboxFull","exception":"full"})
        );
        // A refused ack is said even without a ref: the client must hear it.
        let refused = Response::error(ErrorKind::Kicked, "gone");
        assert!(
            answer(None, &Answer::Acked, refused)
                .unwrap()
                .contains("Kicked")
        );
        let odd = answer(None, &Answer::Done, Response::Count(1)).unwrap();
        assert!(odd.contains("InternalError"), "{odd}");
    }
}
