//! `palisade-bench relay`: a plain TCP relay, for the latency bench's `--relays`. Two of these
//! between the load generator and the app are the least that two extra hops can cost (no TLS,
//! no HTTP, one thread), so the benchmark can say how far the mesh is from that floor,
//! measured in the same run on the same machine. Not a product feature: it lives here, not in
//! the `palisade` CLI, and is hidden from `--help`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

#[derive(clap::Args)]
pub struct RelayArgs {
    /// Where to listen; port 0 picks one, printed as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where to relay each connection to.
    #[arg(long)]
    pub to: SocketAddr,
}

/// Relays on one thread until SIGINT or SIGTERM, or until the process that started it (the
/// bench) is gone: a relay never outlives its benchmark.
pub fn run(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        println!("listening on {}", listener.local_addr()?);
        tokio::select! {
            _ = relay(listener, args.to) => {}
            _ = shutdown() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn relay(listener: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut down, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
}

/// Resolves on SIGINT, SIGTERM, or when the parent process has exited.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let parent = std::os::unix::process::parent_id();
    let orphaned = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if std::os::unix::process::parent_id() != parent {
                return;
            }
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = orphaned => {}
    }
}
