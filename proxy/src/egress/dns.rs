//! The proxy's DNS resolver for egress names, built once per proxy with hickory-resolver.
//!
//! Name servers come from /etc/resolv.conf (what the app's own lookups use), or from
//! `--dns-server` / `PALISADE_DNS_SERVER`. Hickory's response cache is the only cache: it
//! keeps an answer for its TTL and a negative answer (NXDOMAIN, or a name without an address)
//! for the negative TTL of the zone's SOA (RFC 2308), bounded in entries, so a busy app
//! neither hammers its name server nor keeps a stale address past its TTL.
//!
//! Names are looked up as absolute names (a trailing dot): the search list of resolv.conf is
//! not applied, so `api.github.com` can never become `api.github.com.corp.example` behind
//! the back of an egress policy that allowed `api.github.com`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;

use crate::telemetry::Metrics;

/// Cached responses (one per name and record type). Egress names of one workload are few; the
/// bound keeps a hostile app that dials random names from growing the proxy.
const CACHE_ENTRIES: u64 = 4096;
/// The longest a negative answer is kept, whatever the SOA says (RFC 2308 §5 suggests one to
/// three hours); positive answers keep hickory's bound (one day).
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3 * 3600);
/// One query's timeout, and the whole lookup's (both record types, retries included), so an
/// unreachable name server costs the app's connection seconds, not minutes.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// NXDOMAIN, or a name with no A or AAAA record.
    #[error("{0}: no such name, or no address")]
    NotFound(String),
    #[error("{host}: {message}")]
    Failed { host: String, message: String },
}

/// The resolver, or why there is none (an unreadable resolv.conf must not stop a proxy whose
/// mesh traffic needs no DNS: egress lookups fail instead, counted). Built on the first
/// egress lookup: a proxy that never looks a name up carries no resolver, cache or name-server
/// state (a sidecar's memory is most of what it costs).
pub struct Dns {
    server: Option<SocketAddr>,
    resolver: std::sync::OnceLock<Result<TokioResolver, String>>,
}

impl Dns {
    pub fn new(server: Option<SocketAddr>) -> Self {
        Dns {
            server,
            resolver: std::sync::OnceLock::new(),
        }
    }

    fn resolver(&self) -> &Result<TokioResolver, String> {
        self.resolver.get_or_init(|| {
            build(self.server).inspect_err(|e| {
                tracing::warn!(error = %e, "no DNS resolver: egress names will not resolve");
            })
        })
    }

    /// The addresses of `host` (lower case, no trailing dot), IPv4 first, counted in
    /// `palisade_dns_lookups_total` by result (cache hits included: the metric counts what
    /// the proxy asked, not what went on the wire).
    pub async fn lookup(&self, host: &str, metrics: &Metrics) -> Result<Vec<IpAddr>, DnsError> {
        let r = self.lookup_uncounted(host).await;
        metrics.dns_lookup(match &r {
            Ok(_) => "ok",
            Err(DnsError::NotFound(_)) => "nxdomain",
            Err(DnsError::Failed { .. }) => "error",
        });
        r
    }

    async fn lookup_uncounted(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let failed = |message: String| DnsError::Failed {
            host: host.to_string(),
            message,
        };
        let resolver = self.resolver().as_ref().map_err(|e| failed(e.clone()))?;
        let mut name = Name::from_ascii(host).map_err(|e| failed(e.to_string()))?;
        name.set_fqdn(true);
        match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(name)).await {
            Err(_) => Err(failed("timed out".into())),
            Ok(Err(e)) if e.is_no_records_found() => Err(DnsError::NotFound(host.to_string())),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Ok(Ok(ips)) => {
                let ips: Vec<IpAddr> = ips.iter().collect();
                if ips.is_empty() {
                    Err(DnsError::NotFound(host.to_string()))
                } else {
                    Ok(ips)
                }
            }
        }
    }
}

fn build(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let (config, mut opts) = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            (
                ResolverConfig::from_name_servers(vec![ns]),
                ResolverOpts::default(),
            )
        }
        None => hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("/etc/resolv.conf: {e}"))?,
    };
    opts.cache_size = CACHE_ENTRIES;
    // Both families at once, IPv4 first in the answer: the order addresses are dialled in.
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Honour the zone's TTLs (positive and SOA-negative) as they are, within sane bounds:
    // no floor that would keep an answer past its TTL.
    opts.positive_min_ttl = None;
    opts.negative_min_ttl = None;
    opts.negative_max_ttl = Some(MAX_NEGATIVE_TTL);
    opts.timeout = QUERY_TIMEOUT;
    hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())
}
