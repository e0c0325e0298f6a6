use serde::{Deserialize, Serialize};

/// Ties a reply to its request on one connection. Chosen by the client, unique among
/// its requests in flight on that connection.
pub type RequestId = u64;

/// Server-assigned message id: increases monotonically for the lifetime of a core.
pub type MessageId = u64;

/// What the connecting peer is. Only the HTTP front exists today; the operator CLI
/// joins as its own role so that the core can offer it a different set of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Handler,
}

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
    pub role: Role,
}

impl Hello {
    pub fn new(role: Role) -> Self {
        Hello {
            magic: crate::MAGIC,
            version: crate::PROTOCOL_VERSION,
            role,
        }
    }

    /// Why the server must refuse this peer, if it must.
    pub fn refusal(&self) -> Option<String> {
        if self.magic != crate::MAGIC {
            return Some("not a micromsg client (bad handshake magic)".into());
        }
        if self.version != crate::PROTOCOL_VERSION {
            return Some(format!(
                "protocol version mismatch: client speaks {}, server speaks {}",
                self.version,
                crate::PROTOCOL_VERSION
            ));
        }
        None
    }
}

/// The server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    Accepted { version: u32 },
    Refused { reason: String },
}

/// Every frame a client sends after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: RequestId,
    pub request: Request,
}

/// Every frame the server sends after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    pub id: RequestId,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Heartbeat; answered with [`Response::Pong`] without touching the broker.
    Ping,
    /// Queue `body` for session `dst`. Answered with [`Response::Published`].
    Publish {
        src: String,
        dst: String,
        body: String,
    },
    /// Long-poll for `session`: answered with [`Response::Messages`] as soon as the
    /// session has messages, or with none after `timeout_ms`.
    Poll { session: String, timeout_ms: u64 },
    /// Withdraw the parked poll that was sent with request id `poll` on this same
    /// connection (its browser went away). The poll is answered with no messages.
    CancelPoll { poll: RequestId },
    /// Acknowledge the batch that `session` was last given (the x0 `DEL`).
    Ack { session: String },
    /// Messages that were handed to this client for `session` but could not be passed
    /// on to the browser: the core puts them back at the head of the mailbox.
    Return {
        session: String,
        messages: Vec<Message>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    /// The JSON text delivered to the recipient, exactly as the front built it.
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Pong,
    /// The message was stored; `dropped` older messages were discarded to make room
    /// (only under the drop-oldest overflow policy).
    Published {
        id: MessageId,
        dropped: u32,
    },
    /// The answer to a poll; empty when the poll timed out or was withdrawn.
    Messages(Vec<Message>),
    /// The answer to an ack: how many messages it released.
    Acked {
        count: u32,
    },
    /// The request was carried out and has nothing to report.
    Done,
    Error(Error),
}

/// A refusal the client is meant to pass on to its own caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The recipient's mailbox is at its limit and the policy is to reject.
    MailboxFull,
    /// The message body is over the configured maximum payload size.
    PayloadTooLarge,
    /// The request was well-formed on the wire but cannot be carried out as asked.
    InvalidRequest,
}

impl ErrorKind {
    /// The stable name shown to clients (`exception_id` in x0 error bodies).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::MailboxFull => "MailboxFull",
            ErrorKind::PayloadTooLarge => "PayloadTooLarge",
            ErrorKind::InvalidRequest => "InvalidRequest",
        }
    }
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error(Error {
            kind,
            message: message.into(),
        })
    }
}
