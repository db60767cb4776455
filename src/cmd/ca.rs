//! `palisade ca …` and `palisade cert …`: offline CA operations on PEM files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_certs::{Ca, SpiffeId, TrustDomain};

#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Write a new trust anchor (root) and issuer (intermediate), keys included, into DIR.
    Init {
        /// The trust domain the CA signs for: SPIFFE IDs `spiffe://<TRUST_DOMAIN>/...`.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Directory to write root-cert.pem, root-key.pem, issuer-cert.pem and issuer-key.pem
        /// to (created 0700; keys 0600; existing files are never overwritten). Keep it out of
        /// version control: it holds private keys.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Issuer certificate lifetime (the root lives 10 years).
        #[arg(long, default_value = "8760h")]
        issuer_ttl: String,
    },
    /// Issue a leaf X509-SVID: cert.pem (leaf then chain) and key.pem into DIR.
    Issue {
        /// The CA directory written by `palisade ca init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The identity to certify, `spiffe://<trust-domain>/<path>`, in the CA's trust domain.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// Certificate lifetime (`30s`, `90m`, `24h`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Directory to write cert.pem (leaf then chain) and key.pem to (created if missing; the
        /// key 0600). Keep it out of version control: it holds a private key.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(clap::Subcommand)]
pub enum CertCommand {
    /// Print a certificate's SPIFFE ID, validity, issuer and X509-SVID conformance.
    Inspect {
        /// The certificate to read: PEM (the first certificate of a chain) or DER.
        file: PathBuf,
    },
}

fn duration(s: &str, what: &str) -> anyhow::Result<std::time::Duration> {
    palisade_certs::parse_duration(s).with_context(|| format!("invalid {what}"))
}

pub fn run_ca(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            issuer_ttl,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("invalid trust domain {trust_domain:?}"))?;
            let ttl = duration(&issuer_ttl, "--issuer-ttl")?;
            let ca = Ca::generate(&td, Some(ttl))?;
            ca.save(&out)?;
            println!(
                "wrote trust anchor and issuer for {td} to {}",
                out.display()
            );
        }
        CaCommand::Issue {
            ca,
            spiffe_id,
            ttl,
            out,
        } => {
            let id = SpiffeId::parse(&spiffe_id)
                .with_context(|| format!("invalid SPIFFE ID {spiffe_id:?}"))?;
            let ttl = duration(&ttl, "--ttl")?;
            let ca = Ca::load(&ca)
                .with_context(|| format!("cannot load the CA from {}", ca.display()))?;
            let svid = ca.issue(&id, ttl)?;
            svid.write(&out)?;
            println!(
                "issued {id} valid until {} to {}",
                rfc3339(svid.not_after),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub fn run_cert(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    let CertCommand::Inspect { file } = cmd;
    let data = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = if data.starts_with(b"-----") {
        CertificateDer::pem_slice_iter(&data)
            .next()
            .and_then(|r| r.ok())
            .with_context(|| format!("{} holds no PEM certificate", file.display()))?
    } else {
        CertificateDer::from(data)
    };
    let info = palisade_certs::verify::inspect(&der)
        .with_context(|| format!("{} is not an X.509 certificate", file.display()))?;
    let id = info
        .spiffe_id
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "(none)".into());
    println!("SPIFFE ID:  {id}");
    println!(
        "Subject:    {}",
        if info.subject.is_empty() {
            "(empty)"
        } else {
            &info.subject
        }
    );
    println!("Issuer:     {}", info.issuer);
    println!("Serial:     {}", info.serial);
    println!("Not before: {}", rfc3339(info.not_before));
    println!("Not after:  {}", rfc3339(info.not_after));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let left = |secs: i64| super::human_duration(secs.unsigned_abs());
    let state = if now < info.not_before {
        format!("not yet valid (starts in {})", left(info.not_before - now))
    } else if now > info.not_after {
        format!("expired {} ago", left(now - info.not_after))
    } else {
        format!("valid, expires in {}", left(info.not_after - now))
    };
    println!("Validity:   {state}");
    println!("CA:         {}", if info.is_ca { "yes" } else { "no" });
    match &info.svid_conformance {
        Ok(()) if info.is_ca => println!("X509-SVID:  conforms (signing certificate)"),
        Ok(()) => println!("X509-SVID:  conforms (leaf)"),
        Err(reason) => println!("X509-SVID:  does not conform: {reason}"),
    }
    Ok(ExitCode::SUCCESS)
}
