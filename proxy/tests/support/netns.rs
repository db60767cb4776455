//! Tests that need a network of their own re-execute themselves inside a network namespace
//! made for them (addresses and traffic control without touching the machine's), and skip,
//! saying why, where the machine cannot (no root, no `ip`).

use std::process::{Command, ExitStatus};

/// Runs `ip` with `args`; an error names the command.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

/// Runs `tc` with `args` (inside the namespace the test runs in).
pub fn tc(args: &[&str]) -> Result<(), String> {
    run("tc", args)
}

/// Runs `iptables` with `args` (inside the namespace the test runs in).
pub fn iptables(args: &[&str]) -> Result<(), String> {
    run("iptables", args)
}

fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Deletes the namespace when dropped, however the test ended.
struct Del(String);

impl Drop for Del {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs the test named `test` of this binary again, inside a new network namespace in which
/// loopback is up and every `setup` line has been run as `ip -n <ns> <line>`, with the
/// variable `env` set to `value` (the test looks for it to know it is the inner run). The
/// error says why the machine cannot (not root, no `ip`).
pub fn rerun_in_netns(
    test: &str,
    env: &str,
    value: &str,
    setup: &[&[&str]],
) -> Result<ExitStatus, String> {
    if !is_root() {
        return Err("not root: cannot create a network namespace".into());
    }
    let ns = format!("palisade-test-{}", std::process::id());
    ip(&["netns", "add", &ns])?;
    let _del = Del(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    for line in setup {
        let mut args = vec!["-n", ns.as_str()];
        args.extend_from_slice(line);
        ip(&args)?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, value)
        .status()
        .map_err(|e| format!("cannot run the test in the namespace: {e}"))
}
