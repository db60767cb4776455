//! `palisade bench`: runs the benchmarks, which are their own binary, `palisade-bench`
//! (`benches/palisade-bench`), so that this CLI and the sidecar carry no load generator,
//! backend or report. Every argument, `--help` included, goes to it unchanged: the flags and
//! the JSON are that binary's, as the spec describes them.
//!
//! Where it is: next to this binary (`cargo build` and a release put them side by side), else
//! on PATH. Under `cargo run` (`CARGO` is set) a missing one is built first, with the profile
//! this binary was built with; otherwise the error says how to build it.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

/// The benchmarks' binary.
const BENCH_BIN: &str = "palisade-bench";

/// Read by `palisade-bench` (`--palisade-bin`): the `palisade` binary whose mesh it measures.
const PALISADE_BIN_ENV: &str = "PALISADE_BIN";

/// Read by `palisade-bench` (its `DISPLAY_NAME_ENV`): the name its usage and `--help` show,
/// the command the user typed rather than the binary that runs it.
const DISPLAY_NAME_ENV: &str = "PALISADE_BENCH_DISPLAY_NAME";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The benchmark's arguments: `[--rate RPS]... [--duration 30s] [--out FILE.json] ...` for
    /// the latency benchmark, `control-plane --proxies N ...` for the control plane's; see
    /// `palisade bench --help`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// Replaces this process with `palisade-bench ARGS` (same stdio, signals and exit code), or
/// fails with one sentence when there is none and it cannot be built.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the path of this binary")?;
    // Under cargo (`CARGO` is set) only this build's bench will do, built if missing: an
    // installed one on PATH would be another build. Not rebuilt when present: `cargo test`
    // runs this with its lock on the target directory held, so a nested build would wait
    // forever (and there the bench is built with everything else).
    let cargo = std::env::var_os("CARGO");
    let path = match cargo {
        Some(_) => None,
        None => std::env::var_os("PATH"),
    };
    let bench = match (locate(&exe, path.as_deref()), cargo) {
        (Some(b), _) => b,
        (None, Some(cargo)) => build(&cargo, &exe)?,
        (None, None) => bail!(
            "palisade bench runs the {BENCH_BIN} binary, which is neither next to {} nor on \
             PATH: build it with `cargo build --release --bin {BENCH_BIN}`",
            exe.display()
        ),
    };
    let mut cmd = std::process::Command::new(&bench);
    cmd.args(&args.args).env(DISPLAY_NAME_ENV, "palisade bench");
    // The mesh it measures is this binary's, wherever the bench was found, unless the user
    // named another.
    if std::env::var_os(PALISADE_BIN_ENV).is_none() {
        cmd.env(PALISADE_BIN_ENV, &exe);
    }
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", bench.display()))
}

/// `palisade-bench` next to `exe`, else the first on `path` (a PATH value).
fn locate(exe: &Path, path: Option<&OsStr>) -> Option<PathBuf> {
    let beside = exe.with_file_name(BENCH_BIN);
    if beside.is_file() {
        return Some(beside);
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(BENCH_BIN))
        .find(|p| p.is_file())
}

/// `cargo build` of the benchmarks into the directory of this binary, as `cargo run` would
/// have built them with it: same profile (a `release` directory is the release profile,
/// anything else the dev profile), same package (`CARGO_MANIFEST_DIR`, which `cargo run`
/// sets). Returns the binary it built.
fn build(cargo: &OsStr, exe: &Path) -> anyhow::Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let args = build_args(exe, manifest_dir.as_deref());
    eprintln!(
        "{BENCH_BIN} is not built yet: running cargo {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut build = std::process::Command::new(cargo);
    build.args(&args);
    // What `cargo run` set for this program, not for a cargo: build scripts (ring's) rerun on
    // a change of CARGO_MANIFEST_DIR or CARGO_PKG_NAME, so with them this build, and the next
    // plain one, would recompile the TLS stack. The user's CARGO_* settings stay.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            build.env_remove(name);
        }
    }
    let status = build.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo could not build {BENCH_BIN} ({status})");
    }
    let built = exe.with_file_name(BENCH_BIN);
    if !built.is_file() {
        bail!(
            "cargo built {BENCH_BIN}, but not next to {} (another target directory?): run \
             `cargo build --release --bin {BENCH_BIN}` there",
            exe.display()
        );
    }
    Ok(built)
}

/// The variables `cargo run` sets for the program it runs (the package's manifest and
/// metadata), as opposed to the CARGO_* settings of the user (CARGO_TARGET_DIR, CARGO_HOME,
/// CARGO_PROFILE_*, ...).
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
        )
}

fn build_args(exe: &Path, manifest_dir: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["build", "--bin", BENCH_BIN].map(OsString::from).into();
    let profile_dir = exe.parent().and_then(Path::file_name);
    if profile_dir == Some(OsStr::new("release")) {
        args.push("--release".into());
    }
    if let Some(dir) = manifest_dir {
        args.push("--manifest-path".into());
        args.push(dir.join("Cargo.toml").into());
    }
    args
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::Path;

    #[test]
    fn the_bench_next_to_this_binary_comes_before_the_one_on_path() {
        let here = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let exe = here.path().join("palisade");
        let path = std::env::join_paths([elsewhere.path()]).expect("PATH");
        assert_eq!(super::locate(&exe, Some(&path)), None);
        std::fs::write(elsewhere.path().join("palisade-bench"), "").expect("write");
        assert_eq!(
            super::locate(&exe, Some(&path)),
            Some(elsewhere.path().join("palisade-bench"))
        );
        std::fs::write(here.path().join("palisade-bench"), "").expect("write");
        assert_eq!(
            super::locate(&exe, Some(&path)),
            Some(here.path().join("palisade-bench"))
        );
        assert_eq!(
            super::locate(&exe, None),
            Some(here.path().join("palisade-bench"))
        );
    }

    #[test]
    fn the_nested_build_drops_what_cargo_run_set_and_keeps_the_users_settings() {
        for set in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
        ] {
            assert!(super::set_by_cargo_run(set), "{set}");
        }
        for kept in [
            "CARGO_TARGET_DIR",
            "CARGO_HOME",
            "CARGO_PROFILE_DEV_DEBUG",
            "PATH",
        ] {
            assert!(!super::set_by_cargo_run(kept), "{kept}");
        }
    }

    #[test]
    fn cargo_builds_it_with_the_profile_and_package_of_this_binary() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::build_args(Path::new("/t/debug/palisade"), None),
            os(&["build", "--bin", "palisade-bench"])
        );
        assert_eq!(
            super::build_args(Path::new("/t/release/palisade"), Some(Path::new("/src"))),
            os(&[
                "build",
                "--bin",
                "palisade-bench",
                "--release",
                "--manifest-path",
                "/src/Cargo.toml"
            ])
        );
    }
}
