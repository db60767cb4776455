#![no_main]
//! `palisade_certs::fuzzing::duration`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_certs::fuzzing::duration(data);
});
