//! Arbitrary bytes as a stream on the core's socket: every frame decoder of both
//! sides, the handshake included (ipc::fuzzing says what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ipc::fuzzing::decode_every_frame_type(data);
});
