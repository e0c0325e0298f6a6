//! The x0 `micro-msg-server` wire format: what the real x0 browser client sends, what
//! it must get back, and the error body. Pure functions over bytes, no I/O.

use indexmap::IndexMap;
use ipc::{AckSelector, Message, MessageId};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest session id accepted; x0's are short, and a bound keeps a hostile client
/// from making the core store megabyte-sized keys.
pub const MAX_SESSION_LEN: usize = 256;

/// A refusal shown to the client as `{"error":true,"exception_id":..,"exception":..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X0Error {
    pub kind: &'static str,
    pub message: String,
}

/// A core's refusal keeps its name (`exception_id`) and its words.
impl From<ipc::Error> for X0Error {
    fn from(error: ipc::Error) -> Self {
        X0Error::new(error.kind.name(), error.message)
    }
}

impl X0Error {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        X0Error {
            kind,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct ErrorBody<'a> {
            error: bool,
            exception_id: &'a str,
            exception: &'a str,
        }
        serde_json::to_string(&ErrorBody {
            error: true,
            exception_id: self.kind,
            exception: &self.message,
        })
        .expect("strings serialize")
    }
}

/// Which x0 endpoint a request came in on; `/python/MsgHandler.py` takes all three
/// operations and says which in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Any,
    Get,
    Set,
    Del,
}

impl Endpoint {
    /// The x0 endpoint at `path`, if it is one of the four x0 paths.
    pub fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/python/MsgHandler.py" => Endpoint::Any,
            "/get" => Endpoint::Get,
            "/set" => Endpoint::Set,
            "/del" => Endpoint::Del,
            _ => return None,
        })
    }
}

/// What a request asks for, once understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Queue `body` (the object the recipient will receive) for `dst`.
    Set {
        src: String,
        dst: String,
        body: String,
        /// The sender's own message id (`msg_id`), for idempotent retries.
        key: Option<String>,
    },
    Get {
        session: String,
        /// False when the client acknowledges by id (`"auto_ack":false`) instead of
        /// by asking again.
        ack_previous: bool,
    },
    Del {
        session: String,
        /// `ids` or `cursor` when given, else everything given out.
        which: AckSelector,
    },
}

impl Operation {
    /// The session the request acts for.
    pub fn caller(&self) -> &str {
        match self {
            Operation::Set { src, .. } => src,
            Operation::Get { session, .. } | Operation::Del { session, .. } => session,
        }
    }
}

/// Every key the x0 client may send; unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    session_src: Option<String>,
    session_dst: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(rename = "SessionData")]
    session_data: Option<SessionData>,
    #[serde(rename = "RequestData", borrow)]
    request_data: Option<RequestData<'a>>,
    /// Beyond x0: idempotency key of a SET.
    msg_id: Option<String>,
    /// Beyond x0: `false` makes a GET leave earlier messages unacknowledged.
    auto_ack: Option<bool>,
    /// Beyond x0: a DEL of exactly these message ids, or of every id up to `cursor`.
    ids: Option<Vec<MessageId>>,
    cursor: Option<MessageId>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SessionData {
    #[serde(rename = "Value")]
    value: Option<String>,
}

/// The x0 example's "Send Data" button.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestData<'a> {
    #[serde(rename = "FormlistSelectDstUser")]
    select_dst_user: Option<SelectDstUser>,
    #[serde(rename = "FormlistExchangeData", borrow)]
    exchange_data: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SelectDstUser {
    #[serde(rename = "DstUserSession")]
    dst_user_session: Option<String>,
}

/// Refuses a body that is not a JSON object before serde sees it: serde's derived
/// structs also accept an array, reading its elements as the fields in order, so
/// `["SET","a","b",{}]` would be a SET that no key-based filter in front of us
/// (a proxy rule on `session_dst`, a log search) would recognise.
pub fn require_object(json: &[u8]) -> Result<(), X0Error> {
    match json
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        Some(b'{') | None => Ok(()),
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok() => Err(
            X0Error::new("InvalidField", "the request body must be a JSON object"),
        ),
        // Not JSON at all: the parser words that.
        Some(_) => Ok(()),
    }
}

/// Understands a JSON request body that arrived on `endpoint`.
pub fn parse(endpoint: Endpoint, json: &[u8]) -> Result<Operation, X0Error> {
    require_object(json)?;
    // The plain parser on the hot path; the path-tracking one only to word an error.
    let body: Body =
        serde_json::from_slice(json).map_err(|_| describe_parse_error::<Body>(json))?;
    let is_form_button = body
        .request_data
        .as_ref()
        .is_some_and(|r| r.select_dst_user.is_some());
    let op = match (endpoint, body.kind.as_deref()) {
        (Endpoint::Get, _) => "GET",
        (Endpoint::Set, _) => "SET",
        (Endpoint::Del, _) => "DEL",
        (Endpoint::Any, Some(kind)) => kind,
        (Endpoint::Any, None) if is_form_button => "SET",
        (Endpoint::Any, None) => {
            return Err(X0Error::new(
                "MissingField",
                "type is missing: expected \"GET\", \"SET\" or \"DEL\"",
            ));
        }
    };
    let src = session(&body)?;
    if body
        .msg_id
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_SESSION_LEN)
    {
        return Err(X0Error::new(
            "InvalidField",
            format!("msg_id must be 1 to {MAX_SESSION_LEN} bytes"),
        ));
    }
    match op {
        "GET" | "get" => Ok(Operation::Get {
            session: src,
            ack_previous: body.auto_ack.unwrap_or(true),
        }),
        "DEL" | "del" => {
            let which = match (body.ids, body.cursor) {
                (Some(_), Some(_)) => {
                    return Err(X0Error::new("InvalidField", "give ids or cursor, not both"));
                }
                (Some(ids), None) => AckSelector::Ids(ids),
                (None, Some(cursor)) => AckSelector::UpTo(cursor),
                (None, None) => AckSelector::All,
            };
            Ok(Operation::Del {
                session: src,
                which,
            })
        }
        "SET" | "set" if is_form_button && body.payload.is_none() => form_button(src, &body),
        "SET" | "set" => {
            let dst = checked_session("session_dst", body.session_dst.clone())?;
            let payload = body
                .payload
                .ok_or_else(|| X0Error::new("MissingField", "payload is missing"))?;
            let key = body.msg_id.clone();
            let body = delivered_object(payload, &src)?;
            Ok(Operation::Set {
                src,
                dst,
                body,
                key,
            })
        }
        other => Err(X0Error::new(
            "UnknownType",
            format!("type {other:?} is not one of \"GET\", \"SET\", \"DEL\""),
        )),
    }
}

/// Why `json` is not a `T`, worded for the client: invalid JSON, or the field that
/// has the wrong type. Parsing again is slower, which only a refusal pays.
pub fn describe_parse_error<'a, T: Deserialize<'a>>(json: &'a [u8]) -> X0Error {
    let mut de = serde_json::Deserializer::from_slice(json);
    let error = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => match de.end() {
            Ok(()) => return X0Error::new("InvalidJson", "the request body is not valid JSON"),
            Err(e) => e,
        },
        Err(e) if e.path().to_string() != "." && e.inner().is_data() => {
            return X0Error::new("InvalidField", format!("{}: {}", e.path(), e.inner()));
        }
        // A key given twice is refused rather than resolved: the first and the last
        // win in different parsers, so either choice would be somebody's surprise.
        Err(e) if e.inner().is_data() && e.inner().to_string().starts_with("duplicate field") => {
            return X0Error::new("InvalidField", e.inner().to_string());
        }
        Err(e) => e.into_inner(),
    };
    if error.is_data() {
        X0Error::new("InvalidField", "the request body must be a JSON object")
    } else {
        X0Error::new(
            "InvalidJson",
            format!("the request body is not valid JSON: {error}"),
        )
    }
}

/// `session_src`, or `SessionData.Value` where it is missing.
fn session(body: &Body) -> Result<String, X0Error> {
    let src = body
        .session_src
        .clone()
        .or_else(|| body.session_data.as_ref().and_then(|s| s.value.clone()));
    checked_session("session_src", src)
}

/// A present id of 1 to [`MAX_SESSION_LEN`] bytes (`field` names it in the error).
pub fn checked_session(field: &str, value: Option<String>) -> Result<String, X0Error> {
    let value = value.ok_or_else(|| X0Error::new("MissingField", format!("{field} is missing")))?;
    if value.is_empty() {
        return Err(X0Error::new("InvalidField", format!("{field} is empty")));
    }
    if value.len() > MAX_SESSION_LEN {
        return Err(X0Error::new(
            "InvalidField",
            format!("{field} is longer than {MAX_SESSION_LEN} bytes"),
        ));
    }
    Ok(value)
}

fn form_button(src: String, body: &Body) -> Result<Operation, X0Error> {
    let request_data = body.request_data.as_ref().expect("caller checked");
    let dst = checked_session(
        "RequestData.FormlistSelectDstUser.DstUserSession",
        request_data
            .select_dst_user
            .as_ref()
            .and_then(|d| d.dst_user_session.clone()),
    )?;
    let data = request_data.exchange_data.ok_or_else(|| {
        X0Error::new(
            "MissingField",
            "RequestData.FormlistExchangeData is missing",
        )
    })?;
    let delivered = format!(
        r#"{{"msg-type":"net-message","method-id":"set-data","dst-object":"FormlistExchangeData","payload":{},"session_src":{}}}"#,
        data.get(),
        json_string(&src),
    );
    Ok(Operation::Set {
        src,
        dst,
        body: delivered,
        key: body.msg_id.clone(),
    })
}

/// `payload` with `"session_src": src` added (replacing any the sender put there: the
/// recipient must be able to trust it). The payload's text is kept as sent, so
/// numbers, escapes and key order arrive exactly as the sender wrote them.
fn delivered_object(payload: &RawValue, src: &str) -> Result<String, X0Error> {
    let text = payload.get();
    let not_an_object = || X0Error::new("InvalidField", "payload must be a JSON object");
    // RawValue is valid JSON without surrounding whitespace, so an object starts with
    // '{' and ends with '}'.
    if !text.starts_with('{') {
        return Err(not_an_object());
    }
    if text.contains("session_src") {
        return replace_session_src(text, src);
    }
    // Common case: splice the member in before the closing brace.
    let inner = text[1..text.len() - 1].trim();
    let mut out = String::with_capacity(text.len() + src.len() + 20);
    out.push_str(&text[..text.len() - 1]);
    if !inner.is_empty() {
        out.push(',');
    }
    out.push_str(r#""session_src":"#);
    out.push_str(&json_string(src));
    out.push('}');
    Ok(out)
}

/// The rare path: the payload mentions `session_src` (as a key, or anywhere in a
/// string), so rebuild the object member by member, each value as raw text.
fn replace_session_src(text: &str, src: &str) -> Result<String, X0Error> {
    let mut object: IndexMap<String, &RawValue> = serde_json::from_str(text)
        .map_err(|_| X0Error::new("InvalidField", "payload must be a JSON object"))?;
    let src = RawValue::from_string(json_string(src)).expect("a JSON string is valid JSON");
    object.insert("session_src".to_owned(), &src);
    Ok(serde_json::to_string(&object).expect("raw JSON values serialize"))
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// `{"messages":[...],"ids":[...]}` from message bodies that are each one JSON
/// object, or `{"messages":null}` when there are none (what the x0 client expects).
/// The x0 client reads only `messages`; `ids` (same order) is for clients that
/// acknowledge by id or cursor.
pub fn messages_reply(messages: &[Message]) -> String {
    if messages.is_empty() {
        return NO_MESSAGES.to_owned();
    }
    let mut out = open_batch(messages);
    out.push('}');
    out
}

/// `{"messages":[...],"ids":[...]` with room left for whatever the caller closes
/// the object with. Bodies go in as they are: each is one JSON value already.
pub fn open_batch(messages: &[Message]) -> String {
    let bytes: usize = messages.iter().map(|m| m.body.len() + 20).sum();
    let mut out = String::with_capacity(bytes + 48);
    out.push_str(r#"{"messages":["#);
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&message.body);
    }
    out.push_str(r#"],"ids":["#);
    let mut digits = itoa::Buffer::new();
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(digits.format(message.id));
    }
    out.push(']');
    out
}

pub const NO_MESSAGES: &str = r#"{"messages":null}"#;
pub const OK: &str = r#"{"messages":null,"status":"ok"}"#;

/// The SET reply: the message's id, and how many older messages were dropped to
/// make room or whether this was a retry of a message already stored.
pub fn set_reply(id: MessageId, dropped: u32, duplicate: bool) -> String {
    let mut out = format!(r#"{{"messages":null,"status":"ok","id":{id}"#);
    close_publish_reply(&mut out, dropped, duplicate);
    out
}

/// Ends a publish reply (x0 or /v1) with what only sometimes needs saying.
pub fn close_publish_reply(out: &mut String, dropped: u32, duplicate: bool) {
    if dropped > 0 {
        out.push_str(&format!(r#","dropped":{dropped}"#));
    }
    if duplicate {
        out.push_str(r#","duplicate":true"#);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(endpoint: Endpoint, json: &str) -> (String, String, serde_json::Value) {
        match parse(endpoint, json.as_bytes()).unwrap() {
            Operation::Set { src, dst, body, .. } => {
                (src, dst, serde_json::from_str(&body).unwrap())
            }
            other => panic!("{other:?}"),
        }
    }

    fn error_kind(endpoint: Endpoint, json: &str) -> &'static str {
        parse(endpoint, json.as_bytes()).unwrap_err().kind
    }

    #[test]
    fn a_json_array_is_not_a_request_even_when_its_elements_fit_the_fields() {
        for json in [
            r#"["SET","a","b",{"x":1}]"#,
            r#" ["GET","a"]"#,
            r#""GET""#,
            "7",
            "null",
        ] {
            for endpoint in [Endpoint::Any, Endpoint::Set, Endpoint::Get] {
                let error = parse(endpoint, json.as_bytes()).unwrap_err();
                assert_eq!(error.kind, "InvalidField", "{json}");
                assert!(error.message.contains("JSON object"), "{json}: {error:?}");
            }
        }
        assert_eq!(error_kind(Endpoint::Set, "[not json"), "InvalidJson");
        assert_eq!(error_kind(Endpoint::Set, "{not json"), "InvalidJson");
        assert_eq!(error_kind(Endpoint::Set, "not json"), "InvalidJson");
    }

    #[test]
    fn a_key_given_twice_is_refused_naming_the_key() {
        for (json, key) in [
            (
                r#"{"session_src":"a","session_dst":"b","session_dst":"c","payload":{}}"#,
                "session_dst",
            ),
            (
                r#"{"session_src":"a","session_dst":"b","payload":{},"payload":{"x":1}}"#,
                "payload",
            ),
            (
                r#"{"SessionData":{"Value":"a","Value":"b"},"type":"GET"}"#,
                "Value",
            ),
        ] {
            let error = parse(Endpoint::Any, json.as_bytes()).unwrap_err();
            assert_eq!(error.kind, "InvalidField", "{json}");
            assert!(
                error.message.contains("duplicate field") && error.message.contains(key),
                "{json}: {error:?}"
            );
        }
    }

    #[test]
    fn set_adds_session_src_to_the_payload() {
        let (src, dst, body) = set(
            Endpoint::Any,
            r#"{"type":"SET","session_src":"A","session_dst":"B","payload":{"k":1}}"#,
        );
        assert_eq!((src.as_str(), dst.as_str()), ("A", "B"));
        assert_eq!(body, serde_json::json!({"k":1,"session_src":"A"}));
    }

    #[test]
    fn payload_values_pass_through_as_raw_text() {
        let json = r#"{"session_src":"A","session_dst":"B","payload":{"big":12345678901234567890,"f":1.50,"s":"\u00fc","n":{"z":[1,2]}}}"#;
        let Operation::Set { body, .. } = parse(Endpoint::Set, json.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            body,
            r#"{"big":12345678901234567890,"f":1.50,"s":"\u00fc","n":{"z":[1,2]},"session_src":"A"}"#
        );
    }

    #[test]
    fn empty_and_spaced_payloads_get_a_well_formed_object() {
        for (payload, want) in [
            ("{}", r#"{"session_src":"A"}"#),
            ("{ }", r#"{ "session_src":"A"}"#),
            (
                r#"{ "k" : [1, {"x":"}"}] }"#,
                r#"{ "k" : [1, {"x":"}"}] ,"session_src":"A"}"#,
            ),
        ] {
            // Whitespace around the value is not part of it.
            let json = format!(
                r#"{{"session_src":"A","session_dst":"B","payload":  {payload}
 }}"#
            );
            let Operation::Set { body, .. } = parse(Endpoint::Set, json.as_bytes()).unwrap() else {
                panic!()
            };
            assert_eq!(body, want);
            serde_json::from_str::<serde_json::Value>(&body).expect("valid JSON");
        }
    }

    #[test]
    fn a_payload_that_merely_mentions_session_src_keeps_its_values() {
        let (_, _, body) = set(
            Endpoint::Set,
            r#"{"session_src":"A","session_dst":"B","payload":{"note":"session_src is added"}}"#,
        );
        assert_eq!(
            body,
            serde_json::json!({"note":"session_src is added","session_src":"A"})
        );
    }

    #[test]
    fn sender_cannot_forge_session_src() {
        let (_, _, body) = set(
            Endpoint::Set,
            r#"{"session_src":"A","session_dst":"B","payload":{"session_src":"forged"}}"#,
        );
        assert_eq!(body, serde_json::json!({"session_src":"A"}));
    }

    #[test]
    fn session_data_value_stands_in_for_a_missing_session_src() {
        let op = parse(
            Endpoint::Any,
            br#"{"type":"GET","SessionData":{"ID":"SYS_SESSION","Value":"S1"}}"#,
        )
        .unwrap();
        assert_eq!(
            op,
            Operation::Get {
                session: "S1".into(),
                ack_previous: true,
            }
        );
    }

    #[test]
    fn form_button_becomes_a_set_data_message() {
        let (src, dst, body) = set(
            Endpoint::Any,
            r#"{"RequestData":{"FormlistSelectDstUser":{"DstUserSession":"B","UserID":"7"},"FormlistExchangeData":{"f":"v"}},"SessionData":{"Value":"A"},"ServiceData":{}}"#,
        );
        assert_eq!((src.as_str(), dst.as_str()), ("A", "B"));
        assert_eq!(
            body,
            serde_json::json!({"msg-type":"net-message","method-id":"set-data","dst-object":"FormlistExchangeData","payload":{"f":"v"},"session_src":"A"})
        );
    }

    #[test]
    fn the_endpoint_decides_the_operation_on_short_paths() {
        assert_eq!(
            parse(Endpoint::Get, br#"{"session_src":"S"}"#).unwrap(),
            Operation::Get {
                session: "S".into(),
                ack_previous: true,
            }
        );
        assert_eq!(
            parse(Endpoint::Del, br#"{"type":"DEL","session_src":"S"}"#).unwrap(),
            Operation::Del {
                session: "S".into(),
                which: AckSelector::All,
            }
        );
    }

    #[test]
    fn bad_requests_are_named_precisely() {
        assert_eq!(error_kind(Endpoint::Any, "{not json"), "InvalidJson");
        assert_eq!(
            error_kind(Endpoint::Any, r#"{"type":"GET"} x"#),
            "InvalidJson"
        );
        assert_eq!(error_kind(Endpoint::Any, "[1,2]"), "InvalidField");
        assert_eq!(
            error_kind(Endpoint::Any, r#"{"session_src":"A"}"#),
            "MissingField"
        );
        assert_eq!(
            error_kind(Endpoint::Any, r#"{"type":"PUT","session_src":"A"}"#),
            "UnknownType"
        );
        assert_eq!(
            error_kind(Endpoint::Get, r#"{"session_src":7}"#),
            "InvalidField"
        );
        assert_eq!(
            error_kind(Endpoint::Get, r#"{"session_src":""}"#),
            "InvalidField"
        );
        assert_eq!(
            error_kind(Endpoint::Set, r#"{"session_src":"A","payload":{}}"#),
            "MissingField"
        );
        assert_eq!(
            error_kind(
                Endpoint::Set,
                r#"{"session_src":"A","session_dst":"B","payload":[1]}"#
            ),
            "InvalidField"
        );
        let err = parse(Endpoint::Get, br#"{"session_src":7}"#).unwrap_err();
        assert!(err.message.starts_with("session_src:"), "{}", err.message);
    }

    #[test]
    fn replies_have_the_x0_shape() {
        assert_eq!(messages_reply(&[]), r#"{"messages":null}"#);
        let batch = [
            Message {
                id: 7,
                body: r#"{"a":1}"#.into(),
            },
            Message {
                id: 9,
                body: r#"{"b":2}"#.into(),
            },
        ];
        assert_eq!(
            messages_reply(&batch),
            r#"{"messages":[{"a":1},{"b":2}],"ids":[7,9]}"#
        );
        assert_eq!(
            set_reply(5, 0, false),
            r#"{"messages":null,"status":"ok","id":5}"#
        );
        assert_eq!(
            set_reply(5, 2, true),
            r#"{"messages":null,"status":"ok","id":5,"dropped":2,"duplicate":true}"#
        );
        let error: serde_json::Value =
            serde_json::from_str(&X0Error::new("MissingField", "x \"y\"").to_json()).unwrap();
        assert_eq!(
            error,
            serde_json::json!({"error":true,"exception_id":"MissingField","exception":"x \"y\""})
        );
    }

    #[test]
    fn beyond_x0_fields_select_keys_and_acks() {
        let op = parse(
            Endpoint::Set,
            br#"{"session_src":"A","session_dst":"B","payload":{},"msg_id":"m-1"}"#,
        )
        .unwrap();
        assert!(matches!(op, Operation::Set { key: Some(ref k), .. } if k == "m-1"));
        assert_eq!(
            parse(Endpoint::Get, br#"{"session_src":"S","auto_ack":false}"#).unwrap(),
            Operation::Get {
                session: "S".into(),
                ack_previous: false,
            }
        );
        assert_eq!(
            parse(Endpoint::Del, br#"{"session_src":"S","ids":[3,4]}"#).unwrap(),
            Operation::Del {
                session: "S".into(),
                which: AckSelector::Ids(vec![3, 4]),
            }
        );
        assert_eq!(
            parse(Endpoint::Del, br#"{"session_src":"S","cursor":9}"#).unwrap(),
            Operation::Del {
                session: "S".into(),
                which: AckSelector::UpTo(9),
            }
        );
        assert_eq!(
            error_kind(Endpoint::Del, r#"{"session_src":"S","cursor":9,"ids":[1]}"#),
            "InvalidField"
        );
        assert_eq!(
            error_kind(Endpoint::Del, r#"{"session_src":"S","ids":["x"]}"#),
            "InvalidField"
        );
        assert_eq!(
            error_kind(
                Endpoint::Set,
                r#"{"session_src":"A","session_dst":"B","payload":{},"msg_id":""}"#
            ),
            "InvalidField"
        );
    }
}
