//! Arbitrary bytes as a request body, query string and WebSocket frame: every
//! parser of client input in msghandler (msghandler::fuzzing says what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    msghandler::fuzzing::parse_every_request(data);
});
