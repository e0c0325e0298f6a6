//! The body of the `ipc_frame` fuzz target (`fuzz/`), here so that the inputs kept
//! under `fuzz/regressions/ipc_frame/` replay in the ordinary test run, without a
//! nightly toolchain, through exactly the code the fuzzer ran. Not an API.

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::{ClientFrame, FrameCodec, Hello, ServerFrame, Welcome};

/// Feeds `bytes` as a byte stream to the decoder of every frame type either side
/// reads: the core reads [`Hello`] then [`ClientFrame`]s, the handler [`Welcome`]
/// then [`ServerFrame`]s. Panics (the fuzzer's finding) if a decoder panics, or if
/// a frame it accepts does not survive being encoded and decoded again.
pub fn decode_every_frame_type(bytes: &[u8]) {
    decode_stream::<Hello>(bytes);
    decode_stream::<Welcome>(bytes);
    decode_stream::<ClientFrame>(bytes);
    decode_stream::<ServerFrame>(bytes);
    // The handshake as it happens: the first frame is a Hello, the rest requests.
    let mut buf = BytesMut::from(bytes);
    let mut codec = FrameCodec::<Hello, Welcome>::new();
    if let Ok(Some(_)) = codec.decode(&mut buf) {
        let mut codec = codec.retype::<ClientFrame, ServerFrame>();
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            round_trip(frame);
        }
    }
}

fn decode_stream<In>(bytes: &[u8])
where
    In: DeserializeOwned + Serialize + Clone + PartialEq + std::fmt::Debug,
{
    // Whole, and split in two as a socket might deliver it.
    for split in [bytes.len(), bytes.len() / 2] {
        let mut codec = FrameCodec::<In, ()>::new();
        let mut buf = BytesMut::from(&bytes[..split]);
        let mut rest = &bytes[split..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => round_trip(frame),
                Ok(None) if !rest.is_empty() => {
                    buf.extend_from_slice(rest);
                    rest = &[];
                }
                Ok(None) => {
                    let _ = codec.decode_eof(&mut buf);
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// A decoded frame encodes to a frame that decodes to the same value.
fn round_trip<T>(frame: T)
where
    T: DeserializeOwned + Serialize + Clone + PartialEq + std::fmt::Debug,
{
    let mut buf = BytesMut::new();
    FrameCodec::<T, T>::new()
        .encode(frame.clone(), &mut buf)
        .expect("a decoded frame encodes");
    let again = FrameCodec::<T, T>::new()
        .decode(&mut buf)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is whole");
    assert_eq!(again, frame, "a frame changed in a round trip");
}

#[cfg(test)]
mod tests {
    /// Every input kept for the fuzz target (the seeds and any crash found, fixed)
    /// still goes through, on the stable toolchain.
    #[test]
    fn every_kept_fuzz_input_decodes_without_a_panic() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/ipc_frame");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/ipc_frame") {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            super::decode_every_frame_type(&bytes);
            count += 1;
        }
        assert!(count > 0, "no inputs in {}", dir.display());
    }
}
