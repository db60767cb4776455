#![no_main]
//! `palisade_control_plane::fuzzing::csr_der`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_control_plane::fuzzing::csr_der(data);
});
