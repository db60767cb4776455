//! One module per subcommand.

pub mod ca;
pub mod up;

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
        .with_writer(std::io::stderr);
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
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
