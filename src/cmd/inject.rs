//! `palisade inject`: the injector webhook's function on YAML files, or on one AdmissionReview.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_certs::TrustDomain;
use palisade_control_plane::inject::{
    AllNamespaces, DEFAULT_CONTROL_PLANE, DEFAULT_IMAGE, InjectConfig, manifest, review,
};

/// What the injector adds: shared by `palisade inject` and, flattened, by the control plane's
/// webhook, so both inject the same sidecar.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectConfigArgs {
    /// Image of the injected containers (holds `palisade` and `palisade-proxy`).
    #[arg(long, env = "PALISADE_PROXY_IMAGE", default_value = DEFAULT_IMAGE)]
    pub proxy_image: String,
    /// The control plane's gRPC address as injected proxies dial it (PALISADE_CONTROL_PLANE).
    #[arg(long = "inject-control-plane", value_name = "HOST:PORT", default_value = DEFAULT_CONTROL_PLANE)]
    pub control_plane: String,
    /// Trust domain of the injected proxies' SPIFFE IDs.
    #[arg(
        long = "inject-trust-domain",
        value_name = "TD",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
}

impl InjectConfigArgs {
    pub fn to_config(&self) -> anyhow::Result<InjectConfig> {
        let trust_domain = TrustDomain::new(&self.trust_domain)
            .with_context(|| format!("--inject-trust-domain {:?}", self.trust_domain))?;
        if self.control_plane.trim().is_empty() {
            bail!("--inject-control-plane is empty");
        }
        if self.proxy_image.trim().is_empty() {
            bail!("--proxy-image is empty");
        }
        Ok(InjectConfig {
            image: self.proxy_image.clone(),
            control_plane: self.control_plane.clone(),
            trust_domain,
            ..InjectConfig::default()
        })
    }
}

#[derive(clap::Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to inject (one or more documents, `List`s too); stdin when absent or `-`.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Read an admission.k8s.io/v1 AdmissionReview (JSON) on stdin and write the webhook's
    /// response AdmissionReview on stdout.
    #[arg(long, conflicts_with = "file")]
    pub admission_review: bool,
    /// A label of the namespaces the pods go to (repeat). Without any, every namespace counts
    /// as labelled palisade.dev/inject=enabled: running this command is the opt-in. With
    /// some, only they count, as the webhook would see them.
    #[arg(long = "namespace-label", value_name = "KEY=VALUE")]
    pub namespace_labels: Vec<String>,
    #[command(flatten)]
    pub config: InjectConfigArgs,
}

fn namespaces(labels: &[String]) -> anyhow::Result<AllNamespaces> {
    if labels.is_empty() {
        return Ok(AllNamespaces::enabled());
    }
    let mut map = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--namespace-label {l:?} is not KEY=VALUE"))?;
        map.insert(k.to_string(), v.to_string());
    }
    Ok(AllNamespaces(map))
}

fn read_input(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            Ok(buf)
        }
    }
}

pub fn run(args: InjectArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.to_config()?;
    let namespaces = namespaces(&args.namespace_labels)?;
    let mut stdout = std::io::stdout().lock();
    if args.admission_review {
        let body = read_input(None)?;
        let answer = match review::review(&body, &cfg, &namespaces) {
            review::Reviewed::Answer { review, summary } => {
                eprintln!("{summary}");
                review
            }
            // AllNamespaces knows every namespace.
            review::Reviewed::NamespaceUnknown(m) => bail!("{m}"),
        };
        stdout.write_all(&answer.to_json())?;
        stdout.write_all(b"\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let input = read_input(args.file.as_ref())?;
    let text = String::from_utf8(input).context("the input is not UTF-8 text")?;
    let source = args
        .file
        .as_ref()
        .map_or_else(|| "stdin".to_string(), |p| p.display().to_string());
    let (out, reports) = manifest::inject_yaml(&text, &cfg, &namespaces)
        .with_context(|| format!("cannot inject {source}"))?;
    for r in &reports {
        eprintln!("{r}");
        for w in &r.warnings {
            eprintln!("  warning: {w}");
        }
    }
    stdout.write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
