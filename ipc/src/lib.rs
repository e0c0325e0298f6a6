//! The wire contract between `msghandler` (the HTTP front) and `msgserver` (the core).
//!
//! Everything that crosses the Unix socket is defined here, once, and both binaries
//! use it: the frame codec ([`codec`]), the handshake ([`Hello`], [`Welcome`]) and
//! the request/response types ([`Request`], [`Response`]).
//!
//! It also holds the socket type both ends carry frames over ([`link`]), but no I/O
//! policy (no connecting, no retries, no timers), and knows nothing about HTTP or
//! JSON: message bodies are opaque UTF-8 text to it.
//!
//! # Framing
//!
//! Each frame is a 4-byte big-endian length followed by a bincode body. Frames over
//! [`MAX_FRAME_LEN`] are refused from their length prefix alone, before anything is
//! allocated. The first frame each way is the handshake; after that the client sends
//! [`ClientFrame`]s and the server [`ServerFrame`]s, each request tagged with an id so
//! that many are in flight on one connection and replies come back in any order.

pub mod codec;
pub mod fuzzing;
pub mod link;
mod messages;
pub mod paths;

pub use codec::{CodecError, FrameCodec};
pub use messages::*;

/// Bumped whenever a type in this crate changes shape on the wire. Both sides refuse
/// a peer with another version instead of misreading its frames.
pub const PROTOCOL_VERSION: u32 = 8;

/// First bytes of every handshake, so that something that is not micromsg at all
/// (a stray client, a different program on a reused socket path) is told so plainly.
pub const MAGIC: [u8; 4] = *b"uMSG";

/// Largest frame either side accepts or sends. Large enough for a full mailbox
/// batch at the default limits, small enough that a garbage length prefix cannot
/// make a peer allocate much.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
