//! One peer endpoint: mTLS dialling with the identity check, the pooled HTTP/2 connection
//! shared by every request to it, and dedicated HTTP/1.1 connections for upgrades.
//!
//! Errors are typed so the caller can tell what happened to the request: [`Attempt::NotSent`]
//! hands the request back untouched (it may go to another endpoint), while
//! [`Attempt::Failed`] means it left and its fate is unknown.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::Endpoint;
use crate::balance::InFlight;
use crate::errors::EndpointError;
use crate::http::{self as phttp, OutBody};
use crate::telemetry::Direction;
use crate::{Ctx, tls};

/// What became of one request sent to one endpoint.
pub(crate) enum Attempt {
    Response(Response<Incoming>),
    /// Failed before the request left: it comes back, untouched.
    NotSent(EndpointError, Box<Request<OutBody>>),
    /// Failed after the request left.
    Failed(EndpointError),
}

/// Sends a request on the endpoint's pooled HTTP/2 connection, redialing once if the pooled
/// connection turns out to be gone. `guard` is told when the request actually leaves.
pub(crate) async fn send_h2(
    ctx: &Ctx,
    ep: &Arc<Endpoint>,
    req: Request<OutBody>,
    guard: &mut InFlight<'_>,
) -> Attempt {
    let mut sender = match h2_sender(ctx, ep).await {
        Ok(s) => s,
        Err(e) => return Attempt::NotSent(e, Box::new(req)),
    };
    guard.sent();
    let req = match sender.try_send_request(req).await {
        Ok(rsp) => return Attempt::Response(rsp),
        Err(mut e) => match e.take_message() {
            // The pooled connection went away before the request was sent (the peer closed
            // it, or it idled out): the request is untouched, so send it on a fresh one.
            Some(req) => {
                tracing::debug!(endpoint = %ep.cfg.addr, error = %e.error(), "pooled connection closed; redialing");
                ep.h2.store(None);
                req
            }
            None => {
                return Attempt::Failed(EndpointError::Http {
                    addr: ep.cfg.addr,
                    source: e.into_error(),
                });
            }
        },
    };
    let mut sender = match h2_sender(ctx, ep).await {
        Ok(s) => s,
        Err(e) => return Attempt::NotSent(e, Box::new(req)),
    };
    guard.sent();
    match sender.send_request(req).await {
        Ok(rsp) => Attempt::Response(rsp),
        Err(source) => Attempt::Failed(EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        }),
    }
}

/// The endpoint's pooled HTTP/2 connection, dialed once and shared by every request.
async fn h2_sender(ctx: &Ctx, ep: &Arc<Endpoint>) -> Result<SendRequest<OutBody>, EndpointError> {
    if let Some(s) = ep.h2.load().as_ref()
        && !s.is_closed()
    {
        return Ok((**s).clone());
    }
    let _one_dialer = ep.connecting.lock().await;
    if let Some(s) = ep.h2.load().as_ref()
        && !s.is_closed()
    {
        return Ok((**s).clone());
    }
    let tls = dial(ctx, ep, tls::Alpn::H2).await?;
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(false)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(ctx.cfg.limits.max_header_bytes as u32);
    let (sender, conn) =
        b.handshake(TokioIo::new(tls))
            .await
            .map_err(|source| EndpointError::Http {
                addr: ep.cfg.addr,
                source,
            })?;
    let addr = ep.cfg.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %addr, error = %e, "h2 connection closed");
        }
    });
    let pooled = Arc::new(sender.clone());
    close_when_idle(ep, &pooled, ctx.cfg.timeouts.idle);
    ep.h2.store(Some(pooled));
    Ok(sender)
}

/// Drops the pooled connection once no request has used it for `idle` (checked every
/// `idle`, so it closes between one and two idle periods after its last request): hyper then
/// closes it when its streams are done. A connection that was replaced (redialled) or whose
/// endpoint left the config is no longer this task's concern. Idleness comes from the
/// endpoint's load (no request in flight, none answered for `idle`), so requests pay nothing
/// for it.
fn close_when_idle(
    ep: &Arc<Endpoint>,
    pooled: &Arc<SendRequest<OutBody>>,
    idle: std::time::Duration,
) {
    let ep = Arc::downgrade(ep);
    let pooled = Arc::downgrade(pooled);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(idle).await;
            let (Some(ep), Some(pooled)) = (ep.upgrade(), pooled.upgrade()) else {
                return;
            };
            let current = ep.h2.load();
            if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &pooled)) {
                return;
            }
            if ep.load.idle_for(std::time::Instant::now()) >= idle {
                tracing::debug!(endpoint = %ep.cfg.addr, ?idle, "closing an idle connection to a peer");
                ep.h2.store(None);
                return;
            }
        }
    });
}

/// TCP + mTLS to the endpoint's inbound port, checking its SPIFFE ID.
pub(crate) async fn dial(
    ctx: &Ctx,
    ep: &Endpoint,
    alpn: tls::Alpn,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, EndpointError> {
    let addr = ep.cfg.addr;
    let tcp = crate::tcp::connect(addr, ctx.cfg.timeouts.connect)
        .await
        .map_err(|source| EndpointError::Connect { addr, source })?;
    let connector = TlsConnector::from(ep.tls.get(alpn));
    let hs = tokio::time::timeout(
        ctx.cfg.timeouts.handshake,
        connector.connect(tls::server_name(), tcp),
    )
    .await;
    let stream = match hs {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            let reason = tls::io_error_reason(&source);
            ctx.metrics.handshake_error(Direction::outbound, reason);
            return Err(EndpointError::Tls {
                addr,
                reason,
                source,
            });
        }
        Err(_) => {
            ctx.metrics.handshake_error(Direction::outbound, "timeout");
            return Err(EndpointError::Tls {
                addr,
                reason: "timeout",
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
            });
        }
    };
    ctx.metrics
        .tls_connection(Direction::outbound, stream.get_ref().1);
    Ok(stream)
}

/// An HTTP/1.1 upgrade (WebSocket): a dedicated mTLS connection speaking HTTP/1.1, then the
/// two upgraded streams are spliced.
pub(crate) async fn forward_upgrade(
    ctx: &Arc<Ctx>,
    ep: &Endpoint,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, EndpointError> {
    let tls = dial(ctx, ep, tls::Alpn::Http1).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        })?;
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    req.headers_mut().remove(phttp::ORIG_PROTO);
    let mut rsp = sender
        .send_request(req)
        .await
        .map_err(|source| EndpointError::Http {
            addr: ep.cfg.addr,
            source,
        })?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut rsp);
        let metrics = ctx.metrics.clone();
        let idle = ctx.cfg.timeouts.tcp_idle;
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                let mut c = TokioIo::new(c);
                let mut s = TokioIo::new(s);
                let _ =
                    crate::tcp::splice(&metrics, Direction::outbound, &mut c, &mut s, idle).await;
            }
        });
    }
    Ok(rsp)
}
