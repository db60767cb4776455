#![no_main]
//! `palisade_proxy::fuzzing::detect_and_peek`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_proxy::fuzzing::detect_and_peek(data);
});
