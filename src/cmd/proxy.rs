//! `palisade proxy`: the sidecar, configured the way Kubernetes injects it (`PALISADE_*`
//! environment variables) or with flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::TypedValueParser as _;
use palisade_certs::SpiffeId;
use palisade_proxy::config::{CredentialSource, Limits, ProxyConfig, Timeouts, UpstreamListener};
use palisade_proxy::control_plane::ControlPlaneAddrs;

/// What `--help` says after the flags: the grammars the flags share, and the variables that
/// have no flag.
pub const PROXY_AFTER_HELP: &str = "\
Values: IP:PORT is an IPv4 or [IPv6] address with a port number 1-65535; DURATION is a number
with a unit (500ms, 3s, 90m, 1h30m; a bare number is refused); BOOL is 1, 0, true, false, yes,
no, on or off, in any case.

Variables without a flag:
  PALISADE_LOG         log filter, tracing's syntax (info, debug, palisade::access=info,...) [default: info]
  PALISADE_LOG_FORMAT  json for one JSON object per line; anything else is text [default: text]";

#[derive(clap::Args)]
#[command(after_help = PROXY_AFTER_HELP)]
pub struct ProxyArgs {
    /// The workload this proxy serves (its name in the mesh).
    #[arg(long, env = "PALISADE_WORKLOAD", value_name = "NAME")]
    pub workload: String,
    /// The workload's SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, env = "PALISADE_IDENTITY", value_name = "SPIFFE_ID")]
    pub identity: String,
    /// Where mTLS from other proxies arrives.
    #[arg(
        long,
        env = "PALISADE_INBOUND_ADDR",
        value_name = "IP:PORT",
        default_value = "0.0.0.0:4143"
    )]
    pub inbound: SocketAddr,
    /// Admin server: /metrics /ready /live /shutdown.
    #[arg(
        long,
        env = "PALISADE_ADMIN_ADDR",
        value_name = "IP:PORT",
        default_value = "0.0.0.0:4191"
    )]
    pub admin: SocketAddr,
    /// The app's plaintext address; omit when the workload only calls out.
    #[arg(long, env = "PALISADE_APP_ADDR", value_name = "IP:PORT")]
    pub app: Option<SocketAddr>,
    /// Explicit outbound listeners, `SERVICE.NAMESPACE:PORT=LISTEN_ADDR` (repeat, or comma-separate in the env var);
    /// `HOSTNAME:PORT=LISTEN_ADDR` for a name no mesh service matches (egress, resolved with DNS).
    #[arg(
        long = "upstream",
        env = "PALISADE_UPSTREAMS",
        value_name = "SVC.NS:PORT=IP:PORT",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,
    /// Transparent outbound listener (iptables REDIRECT target).
    #[arg(long, env = "PALISADE_OUTBOUND_ADDR", value_name = "IP:PORT")]
    pub outbound: Option<SocketAddr>,
    /// The control plane's gRPC address (identity + discovery): HOST:PORT, or several
    /// comma-separated. Names are resolved at each connection and may stand for several
    /// replicas; when one goes away the proxy connects to the next.
    #[arg(long, env = "PALISADE_CONTROL_PLANE", value_name = "HOST:PORT[,HOST:PORT...]", value_parser = ControlPlaneAddrs::parse)]
    pub control_plane: Option<ControlPlaneAddrs>,
    /// Bootstrap token for the Identity service.
    #[arg(
        long,
        env = "PALISADE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long, env = "PALISADE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust anchors (PEM) of the mesh.
    #[arg(long, env = "PALISADE_TRUST_BUNDLE", value_name = "FILE")]
    pub trust_bundle: PathBuf,
    /// Static mode: certificate chain (PEM) instead of the control plane.
    #[arg(long, env = "PALISADE_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Static mode: private key (PEM).
    #[arg(long, env = "PALISADE_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Static mode: services and endpoints from this YAML file instead of the control plane.
    #[arg(long, env = "PALISADE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Protocol detection timeout.
    #[arg(long, env = "PALISADE_DETECT_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = duration)]
    pub detect_timeout: Duration,
    /// Connect timeout to endpoints and the app.
    #[arg(long, env = "PALISADE_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "3s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "PALISADE_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Opaque TCP tunnels with no traffic either way for this long are closed.
    #[arg(long, env = "PALISADE_TCP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub tcp_idle_timeout: Duration,
    /// A pooled HTTP/2 connection to a peer proxy with no request for this long is closed.
    #[arg(long, env = "PALISADE_IDLE_TIMEOUT", value_name = "DURATION", default_value = "90s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// An HTTP/1.1 client that has not sent a whole request head this long after the
    /// connection became ready for one is disconnected (slowloris); the same timer closes a
    /// keep-alive connection idle for this long.
    #[arg(long, env = "PALISADE_HTTP_HEADER_TIMEOUT", value_name = "DURATION", default_value = "90s", value_parser = duration)]
    pub http_header_timeout: Duration,
    /// Maximum concurrent connections per proxy.
    #[arg(
        long,
        env = "PALISADE_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Services a transparent proxy resolves on demand and keeps; past it the least recently
    /// dialled are released (and looked up again when dialled).
    #[arg(
        long,
        env = "PALISADE_MAX_ON_DEMAND_SERVICES",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_on_demand_services: usize,
    /// Distinct inbound request shapes (caller, port, method, path, host, route) the proxy
    /// keeps per window for `palisade policy what-if`; 0 keeps none.
    #[arg(
        long,
        env = "PALISADE_TRAFFIC_SUMMARY_ENTRIES",
        value_name = "N",
        default_value_t = palisade_proxy::summary::DEFAULT_ENTRIES
    )]
    pub traffic_summary_entries: usize,
    /// How long a generation of the traffic summary lasts: it holds the last one to two.
    #[arg(long, env = "PALISADE_TRAFFIC_SUMMARY_WINDOW", value_name = "DURATION", default_value = "10m", value_parser = duration)]
    pub traffic_summary_window: Duration,
    /// HTTP/2 streams a client may open and reset before they are served; past it the
    /// connection gets GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
    #[arg(
        long,
        env = "PALISADE_H2_MAX_PENDING_RESETS",
        value_name = "N",
        default_value_t = 20
    )]
    pub h2_max_pending_resets: usize,
    /// HTTP/2 streams the proxy may reset because of a client's errors before it closes that
    /// client's connection.
    #[arg(
        long,
        env = "PALISADE_H2_MAX_LOCAL_ERROR_RESETS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub h2_max_local_error_resets: usize,
    /// Answer `POST /shutdown` on the admin port (loopback only, with the
    /// `palisade-admin-shutdown` header). Off by default: every container of a pod shares
    /// its loopback; `palisade up` stops its sidecars with SIGTERM instead. The flag alone
    /// means true.
    #[arg(long, env = "PALISADE_ADMIN_SHUTDOWN", value_name = "BOOL", value_parser = super::BoolValue,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub admin_shutdown: bool,
    /// The app's kubelet probes the injector pointed at the admin port: a JSON object of
    /// `/app-health/<container>/<livez|readyz|startupz>` → the original httpGet or tcpSocket
    /// probe, which the proxy runs against the app on loopback.
    #[arg(long, env = "PALISADE_APP_PROBES", value_name = "JSON",
          value_parser = |s: &str| palisade_api::app_probe::parse(s).map_err(|e| e.to_string()))]
    pub app_probes: Option<palisade_api::app_probe::AppProbes>,
    /// One log line per request (target `palisade::access`). The flag alone means true.
    #[arg(long, env = "PALISADE_ACCESS_LOG", value_name = "BOOL", value_parser = super::BoolValue,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub access_log: bool,
    /// Endpoint selection: peak-ewma (power of two choices over latency) or round-robin.
    #[arg(long, env = "PALISADE_BALANCER", value_name = "STRATEGY", default_value = "peak-ewma",
          value_parser = clap::builder::PossibleValuesParser::new([
              clap::builder::PossibleValue::new("peak-ewma"),
              clap::builder::PossibleValue::new("round-robin"),
              clap::builder::PossibleValue::new("p2c").hide(true),
          ])
              .try_map(|s| s.parse::<palisade_proxy::balance::Strategy>()))]
    pub balancer: palisade_proxy::balance::Strategy,
    /// The DNS server that resolves egress names (names no mesh service matches), instead of
    /// the name servers of /etc/resolv.conf.
    #[arg(long, env = "PALISADE_DNS_SERVER", value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,
    /// Where spans go: an OTLP/gRPC collector (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` wins
    /// when set). Unset: trace context is propagated, no span is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of this proxy's spans (default: the workload's name).
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,
    /// always_on, always_off, traceidratio, parentbased_always_on (default),
    /// parentbased_always_off or parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER")]
    pub otel_traces_sampler: Option<String>,
    /// The ratio of the *traceidratio samplers (0 to 1; default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "RATIO")]
    pub otel_traces_sampler_arg: Option<f64>,
    /// A request slower than this is always exported, sampled or not (a route or service
    /// can set its own).
    #[arg(long, env = "PALISADE_TRACE_SLOW", value_name = "DURATION", default_value = "1s",
          value_parser = duration)]
    pub trace_slow: Duration,
    /// Ordinary sampled spans exported per second per route (a route or service can set its
    /// own); failed and slow requests do not count against it. Unset: no budget.
    #[arg(
        long,
        env = "PALISADE_TRACE_SPAN_BUDGET",
        value_name = "SPANS_PER_SECOND"
    )]
    pub trace_span_budget: Option<u32>,
    /// Spans waiting for export; past it they are dropped (counted).
    #[arg(
        long,
        env = "OTEL_BSP_MAX_QUEUE_SIZE",
        value_name = "N",
        default_value_t = 2048
    )]
    pub otel_bsp_max_queue_size: usize,
    /// Most spans per export call.
    #[arg(
        long,
        env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        value_name = "N",
        default_value_t = 512
    )]
    pub otel_bsp_max_export_batch_size: usize,
    /// Longest wait, in milliseconds, before a partial batch is exported.
    #[arg(
        long,
        env = "OTEL_BSP_SCHEDULE_DELAY",
        value_name = "MS",
        default_value_t = 1000
    )]
    pub otel_bsp_schedule_delay: u64,
    /// Worker threads of the runtime (the sidecar needs few).
    #[arg(
        long,
        env = "PALISADE_WORKER_THREADS",
        value_name = "N",
        default_value_t = 1
    )]
    pub worker_threads: usize,
}

/// clap's value parser for every duration flag of the CLI: one grammar and one overflow-safe
/// parser for the mesh file and the command line.
pub fn duration(s: &str) -> Result<Duration, String> {
    palisade_certs::parse_duration(s).map_err(|e| e.to_string())
}

fn build_config(a: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let identity = SpiffeId::parse(&a.identity)
        .with_context(|| format!("--identity {:?} is not a valid SPIFFE ID", a.identity))?;
    let credentials = match (&a.cert, &a.key, a.control_plane.clone()) {
        (Some(cert), Some(key), _) => CredentialSource::Files {
            cert: cert.clone(),
            key: key.clone(),
            bundle: a.trust_bundle.clone(),
        },
        (_, _, Some(addrs)) => {
            let token = match (&a.token, &a.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read token file {}", f.display()))?
                    .trim()
                    .to_string(),
                (None, None) => bail!("--control-plane needs --token or --token-file"),
            };
            CredentialSource::ControlPlane {
                addrs,
                token,
                token_file: a.token.is_none().then(|| a.token_file.clone()).flatten(),
                bundle: a.trust_bundle.clone(),
                identity: identity.clone(),
            }
        }
        _ => bail!("give either --cert and --key (static mode) or --control-plane"),
    };
    if a.control_plane.is_none() && a.config.is_none() {
        bail!("static mode needs --config with the services to route to");
    }
    let mut upstreams = Vec::new();
    for u in &a.upstreams {
        if u.trim().is_empty() {
            continue;
        }
        let (service, listen) = u
            .split_once('=')
            .with_context(|| format!("upstream {u:?} is not SERVICE.NAMESPACE:PORT=ADDR"))?;
        let listen = listen
            .parse()
            .with_context(|| format!("upstream {u:?}: {listen:?} is not ip:port"))?;
        upstreams.push(UpstreamListener {
            service: service.to_string(),
            listen,
        });
    }
    Ok(ProxyConfig {
        workload: a.workload.clone(),
        identity,
        credentials,
        inbound_addr: a.inbound,
        admin_addr: a.admin,
        app_addr: a.app,
        upstreams,
        transparent_addr: a.outbound,
        static_config: a.config.clone(),
        timeouts: Timeouts {
            connect: a.connect_timeout,
            detect: a.detect_timeout,
            drain: a.drain_timeout,
            tcp_idle: a.tcp_idle_timeout,
            idle: a.idle_timeout,
            header_read: a.http_header_timeout,
            ..Timeouts::default()
        },
        limits: Limits {
            max_connections: a.max_connections,
            max_on_demand_services: a.max_on_demand_services,
            traffic_summary_entries: a.traffic_summary_entries,
            traffic_summary_window: a.traffic_summary_window,
            h2_max_pending_resets: a.h2_max_pending_resets,
            h2_max_local_error_resets: Some(a.h2_max_local_error_resets),
            ..Limits::default()
        },
        access_log: a.access_log,
        tracing: trace_config(a)?,
        admin_shutdown: a.admin_shutdown,
        app_probes: std::sync::Arc::new(a.app_probes.clone().unwrap_or_default()),
        balancer: a.balancer,
        dns_server: a.dns_server,
    })
}

/// The span settings, from the flags and the standard `OTEL_*` variables.
fn trace_config(a: &ProxyArgs) -> anyhow::Result<palisade_proxy::trace::TraceConfig> {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .or_else(|| a.otlp_endpoint.clone())
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty() && !disabled)
        .map(|e| {
            if e.contains("://") {
                e
            } else {
                format!("http://{e}")
            }
        });
    if let Some(e) = &endpoint {
        e.parse::<http::Uri>()
            .with_context(|| format!("OTLP endpoint {e:?} is not a URL"))?;
    }
    if let Some(r) = a.otel_traces_sampler_arg
        && !(0.0..=1.0).contains(&r)
    {
        bail!("OTEL_TRACES_SAMPLER_ARG {r} is not a ratio between 0 and 1");
    }
    let sampler = palisade_proxy::trace::Sampler::from_otel(
        a.otel_traces_sampler.as_deref(),
        a.otel_traces_sampler_arg,
    )?;
    Ok(palisade_proxy::trace::TraceConfig {
        otlp_endpoint: endpoint,
        service_name: a
            .otel_service_name
            .clone()
            .unwrap_or_else(|| a.workload.clone()),
        sampler,
        slow: a.trace_slow,
        span_budget: a.trace_span_budget.filter(|n| *n > 0),
        queue: a.otel_bsp_max_queue_size.max(1),
        batch_size: a.otel_bsp_max_export_batch_size.max(1),
        batch_delay: Duration::from_millis(a.otel_bsp_schedule_delay),
    })
}

pub fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let cfg = build_config(&args)?;
    // One thread by default: a sidecar shares the pod's CPU with its app, and a single-threaded
    // runtime wakes fewer threads per request.
    let rt = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        palisade_proxy::run(cfg, super::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
