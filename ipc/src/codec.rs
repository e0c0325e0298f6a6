//! Length-prefixed bincode frames.
//!
//! The length prefix is handled by `tokio_util`'s [`LengthDelimitedCodec`] (4-byte
//! big-endian, maximum enforced on the prefix before any buffer is reserved); this
//! module only adds the bincode body and typed errors.

use std::io;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::MAX_FRAME_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame is over the limit of {max} bytes")]
    FrameTooLarge { max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// bincode's own allocation limit equals the frame limit, so a garbage length
/// inside a frame (a string claiming 2^60 bytes) is refused instead of allocated.
type BincodeConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_LEN>,
>;

fn bincode_config() -> BincodeConfig {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Decodes frames of type `In` and encodes frames of type `Out`. A client uses
/// `FrameCodec<ServerFrame, ClientFrame>`, the server the reverse.
pub struct FrameCodec<In, Out> {
    lengths: LengthDelimitedCodec,
    max: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    pub fn with_max_frame_len(max: usize) -> Self {
        let lengths = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max)
            .new_codec();
        FrameCodec {
            lengths,
            max,
            _types: PhantomData,
        }
    }

    /// Changes the largest frame accepted from now on: the core reads a handshake
    /// with a small limit, so that a stranger cannot make it buffer 16 MiB before
    /// saying who it is, and raises it once the peer is known.
    pub fn set_max_frame_len(&mut self, max: usize) {
        self.lengths.set_max_frame_length(max);
        self.max = max;
    }

    /// The same framing state for other frame types: used after the handshake,
    /// when the connection switches from [`crate::Hello`] to request frames.
    pub fn retype<In2, Out2>(self) -> FrameCodec<In2, Out2> {
        FrameCodec {
            lengths: self.lengths,
            max: self.max,
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// LengthDelimitedCodec reports an oversized prefix as an io::Error wrapping its
    /// own error type; callers want to tell that case apart from a broken socket.
    fn io_error(&self, e: io::Error) -> CodecError {
        let too_large = e
            .get_ref()
            .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
        if too_large {
            CodecError::FrameTooLarge { max: self.max }
        } else {
            CodecError::Io(e)
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let Some(body) = self.lengths.decode(src).map_err(|e| self.io_error(e))? else {
            return Ok(None);
        };
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Malformed(format!(
                "connection closed inside a frame ({} bytes of it received)",
                src.len()
            ))),
        }
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the frame body",
            body.len() - used
        )));
    }
    Ok(value)
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let body = bincode::serde::encode_to_vec(&item, bincode_config())
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        if body.len() > self.max {
            return Err(CodecError::FrameTooLarge { max: self.max });
        }
        self.lengths.encode(Bytes::from(body), dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn client_codec() -> FrameCodec<ServerFrame, ClientFrame> {
        FrameCodec::new()
    }
    fn server_codec() -> FrameCodec<ClientFrame, ServerFrame> {
        FrameCodec::new()
    }

    fn publish(id: RequestId) -> ClientFrame {
        ClientFrame {
            id,
            request: Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: r#"{"x":"ü","session_src":"a"}"#.into(),
                key: Some("k1".into()),
            },
        }
    }

    #[test]
    fn frames_round_trip_back_to_back_in_one_buffer() {
        let mut buf = BytesMut::new();
        let mut client = client_codec();
        client.encode(publish(1), &mut buf).unwrap();
        client
            .encode(
                ClientFrame {
                    id: 2,
                    request: Request::Poll {
                        session: "b".into(),
                        timeout_ms: 10_000,
                        ack_previous: true,
                        max: 0,
                    },
                },
                &mut buf,
            )
            .unwrap();
        let mut server = server_codec();
        assert_eq!(server.decode(&mut buf).unwrap(), Some(publish(1)));
        let second = server.decode(&mut buf).unwrap().unwrap();
        assert_eq!(second.id, 2);
        assert!(matches!(
            second.request,
            Request::Poll {
                timeout_ms: 10_000,
                ..
            }
        ));
        assert_eq!(server.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn length_prefix_is_four_bytes_big_endian() {
        let mut buf = BytesMut::new();
        client_codec().encode(publish(7), &mut buf).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
    }

    #[test]
    fn truncated_frame_waits_for_more_then_decodes() {
        let mut whole = BytesMut::new();
        client_codec().encode(publish(3), &mut whole).unwrap();
        let mut server = server_codec();
        let mut partial = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            partial.extend_from_slice(&[*byte]);
            let got = server.decode(&mut partial).unwrap();
            if i + 1 < whole.len() {
                assert_eq!(got, None, "decoded early at byte {i}");
            } else {
                assert_eq!(got, Some(publish(3)));
            }
        }
    }

    #[test]
    fn truncated_frame_at_eof_is_a_clear_error() {
        let mut whole = BytesMut::new();
        client_codec().encode(publish(3), &mut whole).unwrap();
        let mut cut = BytesMut::from(&whole[..whole.len() - 2]);
        let err = server_codec().decode_eof(&mut cut).unwrap_err();
        assert!(
            err.to_string().contains("connection closed inside a frame"),
            "{err}"
        );
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        let before = buf.capacity();
        let err = server_codec().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { .. }), "{err}");
        // Nothing was reserved for the claimed 4 GiB.
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn oversized_outgoing_frame_is_refused() {
        let mut codec: FrameCodec<ServerFrame, ClientFrame> = FrameCodec::with_max_frame_len(64);
        let big = ClientFrame {
            id: 1,
            request: Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: "x".repeat(100),
                key: None,
            },
        };
        let mut buf = BytesMut::new();
        let err = codec.encode(big, &mut buf).unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { max: 64 }));
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_body_is_a_clear_error_not_a_panic() {
        let mut server = server_codec();
        for garbage in [
            &[0xff_u8; 9][..],
            &[0x00],
            b"GET / HTTP/1.1\r\n\r\n",
            &[0x01, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(&(garbage.len() as u32).to_be_bytes());
            buf.extend_from_slice(garbage);
            let err = server.decode(&mut buf).unwrap_err();
            assert!(
                matches!(err, CodecError::Malformed(_)),
                "{garbage:?}: {err}"
            );
        }
    }

    #[test]
    fn huge_string_length_inside_a_small_frame_is_refused() {
        // id=1, variant Publish, then a string length of ~2^62 in varint form.
        let body = [0x01, 0x01, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x40];
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        let err = server_codec().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_after_a_valid_body_are_refused() {
        let mut buf = BytesMut::new();
        client_codec()
            .encode(
                ClientFrame {
                    id: 9,
                    request: Request::Ping,
                },
                &mut buf,
            )
            .unwrap();
        // Grow the frame by one byte and fix up its length.
        buf.extend_from_slice(&[0]);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        let err = server_codec().decode(&mut buf).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn handshake_refuses_other_versions_and_magic() {
        assert_eq!(Hello::new(Role::Handler).refusal(), None);
        let old = Hello {
            version: PROTOCOL_VERSION + 1,
            ..Hello::new(Role::Handler)
        };
        assert!(old.refusal().unwrap().contains("version mismatch"));
        let stranger = Hello {
            magic: *b"HTTP",
            ..Hello::new(Role::Handler)
        };
        assert!(stranger.refusal().unwrap().contains("magic"));
    }

    #[tokio::test]
    async fn replies_travel_out_of_order_over_a_real_unix_socket() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_util::codec::Framed;

        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut client = Framed::new(a, client_codec());
        let mut server = Framed::new(b, server_codec());
        client.send(publish(1)).await.unwrap();
        client.send(publish(2)).await.unwrap();
        let first = server.next().await.unwrap().unwrap();
        let second = server.next().await.unwrap().unwrap();
        for frame in [second, first] {
            server
                .send(ServerFrame {
                    id: frame.id,
                    response: Response::Done,
                })
                .await
                .unwrap();
        }
        assert_eq!(client.next().await.unwrap().unwrap().id, 2);
        assert_eq!(client.next().await.unwrap().unwrap().id, 1);
    }
}
