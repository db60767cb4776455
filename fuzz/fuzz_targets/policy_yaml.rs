#![no_main]
//! `palisade_api::fuzzing::policy_yaml`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_api::fuzzing::policy_yaml(data);
});
