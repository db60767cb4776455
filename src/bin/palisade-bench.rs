//! `palisade-bench`: the benchmarks, as their own binary so that the `palisade` CLI and the
//! `palisade-proxy` sidecar carry none of their code (load generator, backend, report).
//! `palisade bench ARGS` runs this. All of it lives in `benches/palisade-bench`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    palisade_bench::main()
}
