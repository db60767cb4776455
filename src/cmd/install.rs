//! `palisade install`: prints the Kubernetes manifests (namespace, CRDs, RBAC, the control
//! plane, the mesh CA and the injector webhook) for `kubectl apply -f -`.
//!
//! With `--ca DIR` the output is the same every time for the same CA and image, which is what
//! keeps identities across upgrades; `deploy/kubernetes/` is this output (tests/install.rs).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_certs::{Ca, TrustDomain};
use palisade_control_plane::k8s::manifests::{self, InstallOptions};

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Use this CA, a directory as `palisade ca init --out DIR` writes it (root-cert.pem,
    /// issuer-cert.pem, issuer-key.pem; the root key is not needed), instead of generating
    /// one. Pass the same one on every upgrade: the mesh's identities stay valid.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["trust_domain", "issuer_ttl", "no_identity"])]
    pub ca: Option<PathBuf>,
    /// Trust domain of a generated CA.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of a generated issuer (the root lives 10 years).
    #[arg(long, default_value = "8760h")]
    pub issuer_ttl: String,
    /// The control plane's image.
    #[arg(long, default_value = manifests::DEFAULT_IMAGE)]
    pub image: String,
    /// Leave out the documents that carry the mesh CA (the Secret palisade-identity, the
    /// ConfigMap palisade-trust-bundle, the webhook configuration): what
    /// deploy/kubernetes/palisade.yaml holds.
    #[arg(long, conflicts_with_all = ["trust_domain", "issuer_ttl"])]
    pub no_identity: bool,
}

pub fn run(args: InstallArgs) -> anyhow::Result<ExitCode> {
    if args.image.trim().is_empty() {
        bail!("--image is empty");
    }
    let opts = InstallOptions { image: args.image };
    let mut out = manifests::render_static(&opts)?;
    if !args.no_identity {
        let ca = match &args.ca {
            Some(dir) => Ca::load(dir)
                .with_context(|| format!("cannot load the CA from {}", dir.display()))?,
            None => {
                let td = TrustDomain::new(&args.trust_domain)
                    .with_context(|| format!("invalid trust domain {:?}", args.trust_domain))?;
                let ttl = palisade_certs::parse_duration(&args.issuer_ttl)
                    .context("invalid --issuer-ttl")?;
                let ca = Ca::generate(&td, Some(ttl))?;
                eprintln!(
                    "palisade install: generated a new mesh CA for trust domain {td} (its root key \
                     is not kept). Installing this output again replaces it and invalidates every \
                     identity of the mesh: upgrade with `--ca DIR` (docs/kubernetes.md, \"Upgrade\")."
                );
                ca
            }
        };
        out.push_str(&manifests::render_identity(&ca)?);
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to standard output")?;
    Ok(ExitCode::SUCCESS)
}
