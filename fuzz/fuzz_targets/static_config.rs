#![no_main]
//! `palisade_proxy::fuzzing::static_config`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_proxy::fuzzing::static_config(data);
});
