//! One module per subcommand.

pub mod bench;
pub mod ca;
pub mod chaos;
pub mod check;
pub mod control_plane;
pub mod cost;
pub mod dashboard;
pub mod demo_app;
pub mod describe;
pub mod edges;
pub mod http_util;
pub mod init;
pub mod inject;
pub mod install;
pub mod policy;
pub mod prom;
pub mod proxy;
pub mod stat;
pub mod tap;
pub mod up;
pub mod what_if;

/// Logs go to stderr; `PALISADE_LOG` (or `RUST_LOG`) sets the filter, `PALISADE_LOG_FORMAT=json`
/// makes them structured for log collectors.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PALISADE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// How every binary ends: its exit code, or the error as one sentence on stderr and exit 1.
pub fn exit(result: anyhow::Result<std::process::ExitCode>) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_sentence(&e));
            std::process::ExitCode::from(1)
        }
    }
}

/// An error chain as one line: "outer: inner: root cause", without repeating a message that
/// an outer error already includes.
pub fn one_sentence(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// What every boolean flag and `PALISADE_*` variable accepts, in any case.
pub const BOOL_WORDS: [&str; 8] = ["1", "0", "true", "false", "yes", "no", "on", "off"];

/// `1/true/yes/on` and `0/false/no/off`, in any case; anything else is None.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// clap's value parser for boolean flags that can also come from a `PALISADE_*` variable: the
/// words of [`BOOL_WORDS`], listed in `--help`. A refusal is one line naming the variable when
/// the value came from it (what a Kubernetes user set), else the flag.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoolValue;

impl clap::builder::TypedValueParser for BoolValue {
    type Value = bool;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<bool, clap::Error> {
        let text = value.to_string_lossy();
        if let Some(b) = parse_bool(&text) {
            return Ok(b);
        }
        let flag = arg
            .and_then(|a| a.get_long())
            .map(|l| format!("--{l}"))
            .unwrap_or_else(|| "the flag".into());
        let env = arg.and_then(|a| a.get_env()).and_then(|e| {
            let v = std::env::var_os(e)?;
            (v == value).then(|| e.to_string_lossy().into_owned())
        });
        let what = match env {
            Some(var) => format!("{var}={text:?} (the variable of {flag})"),
            None => format!("{flag} {text:?}"),
        };
        Err(clap::Error::raw(
            clap::error::ErrorKind::InvalidValue,
            format!(
                "{what} is not a boolean: use one of {} (any case)\n",
                BOOL_WORDS.join(", ")
            ),
        ))
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            BOOL_WORDS.iter().map(clap::builder::PossibleValue::new),
        ))
    }
}

/// A remaining (or elapsed) time as people read it: `23h 59m`, `6d 4h`, `4m 10s`, `9s`. The
/// two largest units only; what is cut is rounded down, so "1h 0m" is never more than is left.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// A port that was free a moment ago, for a mesh file written before the mesh starts (the
/// end-to-end tests'; `palisade-bench` has its own copy). Picked below the kernel's ephemeral
/// range: a port from `bind(0)` would be back in that range once released, where the source
/// port of any outgoing connection (or another process's `bind(0)`) can take it before the
/// mesh binds it.
/// Consecutive calls return different ports; the start depends on the pid, so concurrent
/// processes start apart.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    let &(low, ephemeral_low) = RANGE.get_or_init(|| {
        let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        (
            10_000u32.min(ephemeral_low.saturating_sub(1000)),
            ephemeral_low,
        )
    });
    let span = ephemeral_low.saturating_sub(low).max(1);
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() % span * 7 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span.min(5000) {
        let port = low + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 below the ephemeral range ({low}..{ephemeral_low})")
}

/// Runs one of this CLI's small servers (the demo app) on one thread: binds
/// `listen`, hands the listener to `serve`, and returns when `serve` fails or at
/// [`shutdown_signal`].
pub fn serve_until_shutdown<F, Fut>(
    listen: std::net::SocketAddr,
    serve: F,
) -> anyhow::Result<std::process::ExitCode>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        tokio::select! {
            r = serve(listener) => r?,
            _ = shutdown_signal() => {}
        }
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// Resolves on SIGINT or SIGTERM, or when the parent that started us (`palisade up`) is
/// gone, so children never outlive the mesh.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    // Set by `up` for its children; any boolean word, so `PALISADE_WATCH_PARENT=0` is off. An
    // unreadable value keeps the old meaning of "set": on.
    let watch_parent = std::env::var("PALISADE_WATCH_PARENT")
        .ok()
        .map(|v| {
            parse_bool(&v).unwrap_or_else(|| {
                tracing::warn!(value = %v, "PALISADE_WATCH_PARENT is not a boolean (1/0/true/false/yes/no/on/off); treating it as on");
                true
            })
        })
        .unwrap_or(false);
    let parent = std::os::unix::process::parent_id();
    let orphaned = async move {
        if !watch_parent {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("parent process exited; shutting down");
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = orphaned => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(super::human_duration(86_399), "23h 59m");
        assert_eq!(super::human_duration(86_400 * 6 + 3600 * 4 + 59), "6d 4h");
        assert_eq!(super::human_duration(250), "4m 10s");
        assert_eq!(super::human_duration(9), "9s");
        assert_eq!(super::human_duration(3600), "1h 0m");
    }
}
