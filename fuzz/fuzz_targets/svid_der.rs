#![no_main]
//! `palisade_certs::fuzzing::svid_der`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_certs::fuzzing::svid_der(data);
});
