#![no_main]
//! `palisade_control_plane::fuzzing::mesh_yaml`: see its documentation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = palisade_control_plane::fuzzing::mesh_yaml(data);
});
