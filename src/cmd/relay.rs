//! A plain TCP relay, for `palisade bench --relays`: two of these between the load generator and
//! the app are the least that two extra hops can cost (no TLS, no HTTP, one thread), so the
//! benchmark can say how far the mesh is from that floor, measured in the same run on the same
//! machine. Not a product feature, hence hidden from `--help`.

use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RelayArgs {
    /// Where to listen; port 0 picks one, printed as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where to relay each connection to.
    #[arg(long)]
    pub to: SocketAddr,
}

pub fn run(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let to = args.to;
    super::serve_until_shutdown(args.listen, |listener| async move {
        println!("listening on {}", listener.local_addr()?);
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                // Out of file descriptors, say: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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
    })
}
