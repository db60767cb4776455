//! Egress: connections from the app to names no mesh service matches, proxied without mTLS.
//!
//! Two ways in:
//!
//! - **An egress upstream** (local mode): an upstream listener whose key (`host:port`) is no
//!   service of the config and does not name a mesh namespace ([`is_egress_key`]). The proxy
//!   checks the EgressPolicy against `host`, resolves it ([`dns`]), dials the addresses in
//!   order and splices bytes: TLS passes through (the app talks TLS to the real server), HTTP
//!   and anything else go as they are.
//! - **A redirected connection to a non-mesh destination** (transparent mode,
//!   `Target::Passthrough`): the app resolved the name already and the proxy connects to the
//!   original destination. When an EgressPolicy selects the workload, the proxy first reads
//!   the hostname the connection names ([`peek`]: TLS SNI, HTTP/1 Host) and checks it; a name
//!   allowed by a rule must resolve to the destination's address, so a forged SNI or Host
//!   cannot borrow another name's permission. Without a policy nothing is read (no detection
//!   delay) and the connection is counted as `tcp`.
//!
//! A refused destination (policy, NXDOMAIN, DNS failure, no address answering) resets the
//! app's connection and is counted as the proxy's other errors are
//! ([`crate::errors::rescue_tcp`]); every connection is counted in
//! `palisade_egress_connections_total{decision, protocol}`.

pub mod dns;
pub mod peek;
pub mod policy;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;

pub use policy::{Decision, EgressPolicy};

use crate::Ctx;
use crate::errors::{EndpointError, ProxyError};
use crate::io::PrefixedIo;
use crate::telemetry::Direction;

/// At most this many resolved addresses are dialled, each within the connect timeout, so a
/// long answer cannot hold the app's connection for minutes.
const MAX_DIALS: usize = 4;

/// A hostname in the form policies compare: lower case, no trailing dot, a valid DNS name (not
/// an IP address). None when `raw` is no such name.
pub fn normalize_host(raw: &str) -> Option<String> {
    let host = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    palisade_api::policy::egress::hostname_problem(&host)
        .is_none()
        .then_some(host)
}

/// The destination of an egress upstream listener, from its key `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub host: Arc<str>,
    pub port: u16,
    /// The key named an absolute name (`example.demo.:443`): egress whatever its last label.
    absolute: bool,
}

impl Dest {
    /// None when the key cannot be an egress destination (no port, no valid hostname).
    pub fn from_key(key: &str) -> Option<Dest> {
        let (host, port) = key.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        Some(Dest {
            host: normalize_host(host)?.into(),
            port,
            absolute: host.ends_with('.'),
        })
    }
}

/// Whether an upstream listener's connection goes out as egress: the proxy has a config, the
/// key is no service of it (mesh services first: a key the table knows is never egress), and
/// its host is not `name.namespace` of the workload's own namespace or of a service's in the
/// config. The control plane refuses such an upstream when it names no service (a typo); here
/// it keeps a service that left the config from leaking out as plaintext DNS egress.
pub(crate) fn is_egress_key(ctx: &Ctx, key: &str, dest: &Dest) -> bool {
    if !ctx.config_ready() {
        return false;
    }
    let table = ctx.outbound.load();
    if table.get(key).is_some() {
        return false;
    }
    if dest.absolute {
        return true;
    }
    let Some((_, ns)) = dest
        .host
        .split_once('.')
        .filter(|(_, ns)| !ns.contains('.'))
    else {
        return true;
    };
    if ctx.cfg.identity.namespace() == Some(ns) {
        return false;
    }
    !ctx.snapshot.load().services.keys().any(|k| {
        k.split(':')
            .next()
            .and_then(|h| h.split_once('.'))
            .is_some_and(|(_, n)| n == ns)
    })
}

/// Serves one app connection to an egress upstream.
pub(crate) async fn upstream(ctx: Arc<Ctx>, mut tcp: TcpStream, dest: &Dest) {
    let (detected, prefix) = match crate::detect::detect(&mut tcp, ctx.cfg.timeouts.detect).await {
        Ok(x) => x,
        Err(_) => return,
    };
    let protocol = peek::protocol_label(detected);
    let mut io = PrefixedIo::new(prefix, tcp);
    let policy = ctx.snapshot.load().inbound.egress.clone();
    if let Some(p) = &policy
        && !p.decide(Some(&dest.host)).allow
    {
        deny(
            &ctx,
            io.get_ref(),
            p,
            Some(&dest.host),
            protocol,
            ProxyError::EgressDenied,
        );
        return;
    }
    ctx.metrics.egress("allow", protocol);
    let result = match ctx.dns.lookup(&dest.host, &ctx.metrics).await {
        Ok(ips) => dial(&ctx, &ips, dest.port).await,
        Err(dns::DnsError::NotFound(_)) => Err(ProxyError::EgressNotFound),
        Err(e @ dns::DnsError::Failed { .. }) => Err(ProxyError::EgressDns(e.to_string())),
    };
    match result {
        Ok(mut up) => splice(&ctx, &mut io, &mut up).await,
        Err(e) => {
            tracing::debug!(host = %dest.host, port = dest.port, error = %e, "egress connection failed");
            crate::errors::rescue_tcp(&ctx.metrics, Direction::outbound, io.get_ref(), &e);
        }
    }
}

/// Serves one redirected connection whose original destination `dst` is no mesh destination.
pub(crate) async fn transparent(ctx: Arc<Ctx>, mut tcp: TcpStream, dst: SocketAddr) {
    let policy = ctx.snapshot.load().inbound.egress.clone();
    let Some(policy) = policy else {
        // No policy: nothing to decide, so nothing is read (no detection delay for a
        // server-speaks-first protocol), as before egress policies.
        ctx.metrics.egress("allow", "tcp");
        connect_and_splice(&ctx, PrefixedIo::new(bytes::Bytes::new(), tcp), dst).await;
        return;
    };
    let sniffed = match peek::sniff(&mut tcp, ctx.cfg.timeouts.detect).await {
        Ok(s) => s,
        Err(_) => return,
    };
    let io = PrefixedIo::new(sniffed.prefix, tcp);
    let host = sniffed.host.as_deref();
    let decision = policy.decide(host);
    if !decision.allow {
        deny(
            &ctx,
            io.get_ref(),
            &policy,
            host,
            sniffed.protocol,
            ProxyError::EgressDenied,
        );
        return;
    }
    // Allowed by a rule for this name: the name must be where the connection goes. (Allowed
    // by the default, there is nothing to borrow: a connection naming nothing gets the same.)
    if let (Some(host), Some(_)) = (host, decision.rule) {
        let refused = match ctx.dns.lookup(host, &ctx.metrics).await {
            Ok(ips) if ips.contains(&dst.ip()) => None,
            Ok(_) => Some(ProxyError::EgressAddressMismatch),
            Err(dns::DnsError::NotFound(_)) => Some(ProxyError::EgressNotFound),
            Err(e @ dns::DnsError::Failed { .. }) => Some(ProxyError::EgressDns(e.to_string())),
        };
        if let Some(e) = refused {
            deny(&ctx, io.get_ref(), &policy, Some(host), sniffed.protocol, e);
            return;
        }
    }
    ctx.metrics.egress("allow", sniffed.protocol);
    connect_and_splice(&ctx, io, dst).await;
}

/// Counts and logs a refused egress connection (once, at info: an operator wants to see what
/// the app tried), then resets it.
fn deny(
    ctx: &Ctx,
    tcp: &TcpStream,
    policy: &EgressPolicy,
    host: Option<&str>,
    protocol: &'static str,
    e: ProxyError,
) {
    ctx.metrics.egress("deny", protocol);
    tracing::info!(
        host = host.unwrap_or("(none)"),
        policy = policy.name(),
        protocol,
        reason = e.reason(),
        "egress connection refused"
    );
    crate::errors::rescue_tcp(&ctx.metrics, Direction::outbound, tcp, &e);
}

async fn connect_and_splice(ctx: &Ctx, mut io: PrefixedIo<TcpStream>, dst: SocketAddr) {
    match crate::tcp::connect(dst, ctx.cfg.timeouts.connect).await {
        Ok(mut up) => splice(ctx, &mut io, &mut up).await,
        Err(source) => {
            let e = ProxyError::from(EndpointError::Connect { addr: dst, source });
            crate::errors::rescue_tcp(&ctx.metrics, Direction::outbound, io.get_ref(), &e);
        }
    }
}

/// The first address that accepts, in the resolver's order (IPv4 first).
async fn dial(ctx: &Ctx, ips: &[IpAddr], port: u16) -> Result<TcpStream, ProxyError> {
    let mut last = ProxyError::EgressNotFound;
    for ip in ips.iter().take(MAX_DIALS) {
        let addr = SocketAddr::new(*ip, port);
        match crate::tcp::connect(addr, ctx.cfg.timeouts.connect).await {
            Ok(tcp) => return Ok(tcp),
            Err(source) => {
                tracing::debug!(%addr, error = %source, "egress address did not answer");
                last = EndpointError::Connect { addr, source }.into();
            }
        }
    }
    Err(last)
}

async fn splice(ctx: &Ctx, io: &mut PrefixedIo<TcpStream>, up: &mut TcpStream) {
    let _ = crate::tcp::splice(
        &ctx.metrics,
        Direction::outbound,
        io,
        up,
        ctx.cfg.timeouts.tcp_idle,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_hosts_are_read_as_policies_compare_them() {
        assert_eq!(
            normalize_host("Api.GitHub.com."),
            Some("api.github.com".into())
        );
        assert_eq!(normalize_host("10.0.0.1"), None);
        assert_eq!(normalize_host("a b.test"), None);
        assert_eq!(normalize_host(""), None);
        let d = Dest::from_key("Example.COM:443").expect("a destination");
        assert_eq!((&*d.host, d.port, d.absolute), ("example.com", 443, false));
        let d = Dest::from_key("example.demo.:80").expect("a destination");
        assert_eq!((&*d.host, d.absolute), ("example.demo", true));
        assert_eq!(Dest::from_key("example.com"), None);
        assert_eq!(Dest::from_key("example.com:0"), None);
        assert_eq!(Dest::from_key("10.1.2.3:80"), None);
    }
}
