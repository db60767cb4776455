//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/palisade.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Ordered maps: encoding is deterministic, so config digests compare across processes.
        .btree_map(".")
        // Small initial stream buffers (src/codec.rs): memory per Discovery stream.
        .codec_path("crate::codec::SmallBuffers")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
