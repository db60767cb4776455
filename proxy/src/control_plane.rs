//! Where the control plane is: one or more `HOST:PORT`, each resolved again at every connection
//! attempt, so a name may stand for several replicas (a headless Service's DNS name gives one
//! address per control-plane pod) and a replica that goes away is replaced by the next one.
//!
//! Every connection (Certify at bootstrap, renewals, the Discovery stream) tries the address
//! that worked last first, then the others in order; a dead replica costs one refused
//! connection (or [`palisade_api::client::CONNECT_TIMEOUT`] when nothing answers at all)
//! before the next is tried. Both replicas of a cluster's control plane sign with the same
//! issuer, so a proxy's certificate and config are good whichever one it reaches.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

/// The control plane's gRPC addresses, as given (`10.96.0.10:8086`,
/// `palisade-control-plane.palisade-system.svc:8086`, or several separated by commas).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneAddrs {
    entries: Vec<String>,
}

impl ControlPlaneAddrs {
    /// `HOST:PORT[,HOST:PORT...]`; a host may be a name, an IPv4 address or a bracketed IPv6
    /// address. Names are not resolved here.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for e in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((host, port)) = e.rsplit_once(':') else {
                return Err(format!("{e:?} is not HOST:PORT"));
            };
            if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
                return Err(format!(
                    "{e:?} is not HOST:PORT (an IPv6 address goes in brackets)"
                ));
            }
            match port.parse::<u16>() {
                Ok(p) if p != 0 => {}
                _ => return Err(format!("{e:?}: the port must be a number 1–65535")),
            }
            entries.push(e.to_string());
        }
        if entries.is_empty() {
            return Err("no control-plane address".into());
        }
        Ok(Self { entries })
    }

    /// `addr` alone.
    pub fn one(addr: SocketAddr) -> Self {
        Self {
            entries: vec![addr.to_string()],
        }
    }

    /// The entries as given.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Every address the entries stand for now, in order, without repeats; a name that does
    /// not resolve is skipped (and named in the error if nothing resolves).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let mut out = Vec::new();
        let mut failures = Vec::new();
        for e in &self.entries {
            match tokio::net::lookup_host(e.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(err) => failures.push(format!("{e}: {err}")),
            }
        }
        if out.is_empty() {
            return Err(format!(
                "the control-plane address resolves to nothing ({})",
                failures.join("; ")
            ));
        }
        Ok(out)
    }
}

impl From<SocketAddr> for ControlPlaneAddrs {
    fn from(addr: SocketAddr) -> Self {
        Self::one(addr)
    }
}

impl fmt::Display for ControlPlaneAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entries.join(","))
    }
}

/// Connects to whichever replica answers, remembering which one did.
#[derive(Debug)]
pub(crate) struct Dialer {
    addrs: ControlPlaneAddrs,
    state: Mutex<Preference>,
}

#[derive(Debug, Default)]
struct Preference {
    /// The replica that answered last: tried first.
    last_good: Option<SocketAddr>,
    /// The replica whose stream broke last: tried last.
    broken: Option<SocketAddr>,
}

impl Dialer {
    pub(crate) fn new(addrs: ControlPlaneAddrs) -> Self {
        Self {
            addrs,
            state: Mutex::new(Preference::default()),
        }
    }

    pub(crate) fn addrs(&self) -> &ControlPlaneAddrs {
        &self.addrs
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Preference> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The order to try `addrs` in: the one that answered last first, the one whose stream
    /// broke last at the end, the rest as resolved.
    fn order(&self, mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let p = self.state();
        if let Some(b) = p.broken
            && let Some(i) = addrs.iter().position(|a| *a == b)
        {
            addrs[i..].rotate_left(1);
        }
        if let Some(g) = p.last_good
            && p.broken != Some(g)
            && let Some(i) = addrs.iter().position(|a| *a == g)
        {
            addrs[..=i].rotate_right(1);
        }
        addrs
    }

    /// A channel to the first replica that completes the mTLS handshake, in [`Self::order`].
    /// The error names every address tried.
    pub(crate) async fn connect(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(Channel, SocketAddr), String> {
        let addrs = self.order(self.addrs.resolve().await?);
        let mut errors = Vec::new();
        for addr in addrs {
            match palisade_api::client::connect(addr, tls.clone()).await {
                Ok(ch) => {
                    let mut p = self.state();
                    if p.last_good.is_some_and(|l| l != addr) {
                        tracing::info!(%addr, "connected to another control-plane replica");
                    }
                    p.last_good = Some(addr);
                    if p.broken == Some(addr) {
                        p.broken = None;
                    }
                    return Ok((ch, addr));
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "control-plane replica unreachable; trying the next");
                    errors.push(e.to_string());
                }
            }
        }
        Err(errors.join("; "))
    }

    /// An established stream to `addr` broke: the next connection tries the other replicas
    /// first, so a proxy does not insist on a dying replica that still accepts connections.
    pub(crate) fn failed(&self, addr: SocketAddr) {
        self.state().broken = Some(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_addresses_and_lists() {
        let a =
            ControlPlaneAddrs::parse("palisade-control-plane.palisade-system.svc:8086").unwrap();
        assert_eq!(
            a.entries(),
            ["palisade-control-plane.palisade-system.svc:8086"]
        );
        let a = ControlPlaneAddrs::parse("10.0.0.1:8086, [::1]:8086,").unwrap();
        assert_eq!(a.entries(), ["10.0.0.1:8086", "[::1]:8086"]);
        assert_eq!(a.to_string(), "10.0.0.1:8086,[::1]:8086");
        for bad in ["", ",", "host", "host:0", "host:x", ":8086", "::1:8086"] {
            assert!(ControlPlaneAddrs::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_replica_that_answered_goes_first_and_a_broken_one_last() {
        let [a, b, c]: [SocketAddr; 3] =
            ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"].map(|s| s.parse().unwrap());
        let d = Dialer::new(ControlPlaneAddrs::one(a));
        assert_eq!(d.order(vec![a, b, c]), [a, b, c]);
        d.state().last_good = Some(c);
        assert_eq!(d.order(vec![a, b, c]), [c, a, b]);
        d.failed(c);
        assert_eq!(d.order(vec![a, b, c]), [a, b, c]);
        d.failed(a);
        assert_eq!(d.order(vec![a, b, c]), [c, b, a]);
    }

    #[tokio::test]
    async fn resolves_every_entry_in_order_without_repeats() {
        let a = ControlPlaneAddrs::parse("127.0.0.1:2,localhost:1,127.0.0.1:2").unwrap();
        let got = a.resolve().await.unwrap();
        assert_eq!(got[0], "127.0.0.1:2".parse().unwrap());
        assert!(got.iter().all(|x| x.port() == 1 || x.port() == 2));
        assert_eq!(got.iter().filter(|x| x.port() == 2).count(), 1);
    }
}
