//! A real proxy's settings as a pod's would be: its certificate and its config from the
//! control plane, every listener on a free loopback port, everything else default.

use std::path::PathBuf;

use palisade_certs::SpiffeId;
use palisade_proxy::ProxyConfig;
use palisade_proxy::config::{CredentialSource, Limits, Timeouts};
use palisade_proxy::control_plane::ControlPlaneAddrs;

/// `workload` with `identity`, bootstrapping with `token` (read again from `token_file` if
/// given, as a projected token is) and trusting the roots in `bundle`.
pub fn on_control_plane(
    workload: &str,
    identity: SpiffeId,
    addrs: ControlPlaneAddrs,
    token: &str,
    token_file: Option<PathBuf>,
    bundle: PathBuf,
) -> ProxyConfig {
    ProxyConfig {
        workload: workload.into(),
        identity: identity.clone(),
        credentials: CredentialSource::ControlPlane {
            addrs,
            token: token.into(),
            token_file,
            bundle,
            identity,
        },
        inbound_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        app_addr: None,
        upstreams: Vec::new(),
        transparent_addr: None,
        static_config: None,
        timeouts: Timeouts::default(),
        limits: Limits::default(),
        access_log: false,
        tracing: Default::default(),
        admin_shutdown: false,
        app_probes: Default::default(),
        dns_server: None,
        balancer: Default::default(),
    }
}
