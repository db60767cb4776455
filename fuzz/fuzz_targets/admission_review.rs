#![no_main]
//! `palisade_control_plane::fuzzing::admission_review`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_control_plane::fuzzing::admission_review(data);
});
