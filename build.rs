//! Link options for the release sidecar: most of a proxy's resident memory is the pages of its
//! own binary, so the link lays out the binary for fewer of them (docs/benchmarks.md, "The
//! sidecar's resident set").
//!
//! - `link/symbol-order.txt` lists, hottest first, every function a proxy ran under callgrind
//!   (`link/generate-symbol-order.sh`). lld puts them together at the start of `.text`. The
//!   kernel maps a binary's pages in 64 KiB blocks around each one touched (fault-around), and
//!   with the ~3 MB of code that runs spread over 10 MB of text, nearly every block was mapped.
//!   A name the list has and the build no longer has is skipped, so a stale list costs only
//!   memory, never a failed link.
//! - `-z pack-relative-relocs` (DT_RELR) shrinks the ~20,000 relative relocations of a
//!   position-independent binary from 470 KB, all read at every start, to a few KB. It needs a
//!   glibc of 2.36 or later to run, so it is only asked for when the glibc building is one.
//!
//! Both need lld, the linker rustc uses by default for x86_64 Linux (since 1.90); with another
//! linker (one configured for the target, or lld switched off) nothing is added.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=link/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=PALISADE_NO_LINK_LAYOUT");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let default_lld = var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("HOST") == var("TARGET")
        && env::var_os("RUSTC_LINKER").is_none()
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if !release || !default_lld || env::var_os("PALISADE_NO_LINK_LAYOUT").is_some() {
        return;
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/symbol-order.txt");
    let mut args = vec!["-Wl,--no-warn-symbol-ordering".to_string()];
    if order.is_file() {
        args.push(format!("-Wl,--symbol-ordering-file={}", order.display()));
    }
    if glibc_at_least(2, 36) {
        args.push("-Wl,-z,pack-relative-relocs".to_string());
    }
    for bin in ["palisade", "palisade-proxy"] {
        for a in &args {
            println!("cargo:rustc-link-arg-bin={bin}={a}");
        }
    }
}

/// The glibc this build runs on (and, building for the host, links against).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: gnu_get_libc_version takes nothing and returns a pointer to a static,
    // NUL-terminated string owned by glibc.
    let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let mut parts = version
        .to_str()
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_at_least(_: u32, _: u32) -> bool {
    false
}
