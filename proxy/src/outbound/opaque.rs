//! Opaque TCP to a mesh service: pick an endpoint, mTLS with the opaque ALPN, copy bytes until
//! both sides are done or the tunnel idles out. A connection that cannot be made goes to
//! another endpoint (no byte has left yet); when none can, the app's connection is reset and
//! the reason counted (the TCP form of the rescue layer, [`crate::errors::rescue_tcp`]).

use std::sync::Arc;

use tokio::net::TcpStream;

use super::endpoint;
use crate::errors::ProxyError;
use crate::io::PrefixedIo;
use crate::telemetry::{ConnLabels, Direction};
use crate::{Ctx, tls};

pub(super) async fn opaque(ctx: Arc<Ctx>, mut io: PrefixedIo<TcpStream>, service: &str) {
    if let Err(e) = tunnel(&ctx, &mut io, service).await {
        crate::errors::rescue_tcp(&ctx.metrics, Direction::outbound, io.get_ref(), &e);
    }
}

/// The tunnel, or why none could be made (no byte of the app's has left then).
async fn tunnel(
    ctx: &Ctx,
    io: &mut PrefixedIo<TcpStream>,
    service: &str,
) -> Result<(), ProxyError> {
    let svc = ctx
        .outbound
        .load()
        .get(service)
        .cloned()
        .ok_or(ProxyError::UnknownService)?;
    let mut tried = None;
    let mut last = ProxyError::NoEndpoints;
    for _ in 0..2 {
        let picked = match &tried {
            None => svc.balancer.pick(),
            Some(t) => svc.balancer.pick_other(t),
        };
        let Some(ep) = picked.cloned() else {
            break;
        };
        let guard = ep.load.start();
        match endpoint::dial(ctx, &ep, tls::Alpn::Opaque).await {
            Ok(mut tls) => {
                guard.connected();
                ctx.metrics
                    .tcp_connections
                    .get_or_create(&ConnLabels {
                        direction: Direction::outbound,
                        src_identity: ctx.own_label.clone(),
                        dst_identity: ep.identity.clone(),
                    })
                    .inc();
                let _ = crate::tcp::splice(
                    &ctx.metrics,
                    Direction::outbound,
                    io,
                    &mut tls,
                    ctx.cfg.timeouts.tcp_idle,
                )
                .await;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(service, endpoint = %ep.cfg.addr, error = %e, "opaque connection failed");
                if let Some(backoff) = guard.failure(e.failure()) {
                    ctx.metrics.endpoint_ejected(&ep.identity);
                    tracing::warn!(service, endpoint = %ep.cfg.addr, backoff_ms = backoff.as_millis() as u64, "endpoint ejected after failures");
                }
                last = e.into();
                if svc.balancer.endpoints().len() < 2 {
                    break;
                }
                tried = Some(ep);
            }
        }
    }
    Err(last)
}
