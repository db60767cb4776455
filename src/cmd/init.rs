//! `palisade init`: the iptables rules of a meshed pod (the injected init container).
//!
//! Two nat chains, as Linkerd's proxy-init and Istio's istio-iptables set up:
//! - `PALISADE_INBOUND` (from PREROUTING): TCP arriving at the pod goes to the proxy's inbound
//!   port, except the admin port (probes, scrapes) and the skipped ports.
//! - `PALISADE_OUTPUT` (from OUTPUT): TCP the pod sends goes to the proxy's outbound port,
//!   except the proxy's own traffic (its UID), loopback, and the skipped ports.
//!
//! The proxy recovers each connection's original destination with `SO_ORIGINAL_DST`.
//! Running it twice gives the same rules: the chains are flushed and refilled, and the jumps
//! to them are added only when missing.

use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

/// The UID the proxy runs as, excluded from outbound redirection (Linkerd uses 2102 too).
pub const DEFAULT_PROXY_UID: u32 = 2102;
const INBOUND_CHAIN: &str = "PALISADE_INBOUND";
const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";

#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// The proxy's UID: its own connections are never redirected.
    #[arg(long, env = "PALISADE_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected (the proxy's inbound listener).
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// Where outbound TCP is redirected (the proxy's transparent listener).
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// The proxy's admin port: never redirected, so probes and scrapes reach it.
    #[arg(long, env = "PALISADE_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// Inbound ports not redirected: comma-separated ports or ranges (`25,8000-8100`).
    #[arg(long, env = "PALISADE_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound destination ports not redirected: comma-separated ports or ranges.
    #[arg(long, env = "PALISADE_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: String,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// The iptables program.
    #[arg(long, env = "PALISADE_IPTABLES", default_value = "iptables")]
    pub iptables: String,
}

/// `25,8000-8100` → `["25", "8000:8100"]` (iptables' range syntax), each checked.
fn port_list(field: &str, s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let port = |p: &str| -> anyhow::Result<u16> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{field}: {p:?} is not a port number 1–65535"),
            }
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    bail!("{field}: range {part:?} ends before it starts");
                }
                out.push(format!("{a}:{b}"));
            }
            None => out.push(port(part)?.to_string()),
        }
    }
    Ok(out)
}

/// One iptables rule as its arguments (after `-t nat`).
type Rule = Vec<String>;

fn rule(args: &[&str]) -> Rule {
    args.iter().map(|s| s.to_string()).collect()
}

/// The rules, in order, as iptables arguments for the nat table (without the program and
/// `-t nat`). The jumps from PREROUTING and OUTPUT come last and are added once.
pub fn rules(a: &InitArgs) -> anyhow::Result<(Vec<Rule>, Vec<Rule>)> {
    let skip_in = port_list("--skip-inbound-ports", &a.skip_inbound_ports)?;
    let skip_out = port_list("--skip-outbound-ports", &a.skip_outbound_ports)?;
    let (inbound, outbound, admin, uid) = (
        a.inbound_port.to_string(),
        a.outbound_port.to_string(),
        a.admin_port.to_string(),
        a.proxy_uid.to_string(),
    );
    // `-A CHAIN -p tcp --dport PORT -j RETURN`: leave this port alone.
    let leave = |chain: &str, port: &str| {
        rule(&["-A", chain, "-p", "tcp", "--dport", port, "-j", "RETURN"])
    };
    let redirect = |chain: &str, to: &str| {
        rule(&["-A", chain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", to])
    };
    let mut chain = vec![leave(INBOUND_CHAIN, &admin)];
    chain.extend(skip_in.iter().map(|p| leave(INBOUND_CHAIN, p)));
    chain.push(redirect(INBOUND_CHAIN, &inbound));
    chain.push(rule(&[
        "-A",
        OUTPUT_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]));
    chain.push(rule(&["-A", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"]));
    chain.extend(skip_out.iter().map(|p| leave(OUTPUT_CHAIN, p)));
    chain.push(redirect(OUTPUT_CHAIN, &outbound));
    let jumps = vec![
        rule(&["PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]),
        rule(&["OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
    ];
    Ok((chain, jumps))
}

fn iptables(program: &str, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new(program)
        .arg("-w")
        .arg("-t")
        .arg("nat")
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is iptables installed?)"))
}

fn must(program: &str, args: &[String]) -> anyhow::Result<()> {
    let out = iptables(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} -t nat {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn run(a: InitArgs) -> anyhow::Result<ExitCode> {
    let (chain, jumps) = rules(&a)?;
    if a.dry_run {
        for c in [INBOUND_CHAIN, OUTPUT_CHAIN] {
            println!("iptables -t nat -N {c}");
            println!("iptables -t nat -F {c}");
        }
        for r in &chain {
            println!("iptables -t nat {}", r.join(" "));
        }
        for j in &jumps {
            println!("iptables -t nat -A {}", j.join(" "));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let p = a.iptables.as_str();
    for c in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        // Create it unless it exists, then empty it: reruns converge on the same rules.
        let exists = iptables(p, &[String::from("-L"), c.to_string(), "-n".into()])?
            .status
            .success();
        if !exists {
            must(p, &["-N".into(), c.to_string()])?;
        }
        must(p, &["-F".into(), c.to_string()])?;
    }
    for r in &chain {
        must(p, r)?;
    }
    for j in &jumps {
        let mut check = vec![String::from("-C")];
        check.extend(j.iter().cloned());
        if !iptables(p, &check)?.status.success() {
            let mut add = vec![String::from("-A")];
            add.extend(j.iter().cloned());
            must(p, &add)?;
        }
    }
    println!(
        "iptables rules installed: inbound TCP -> :{}, outbound TCP -> :{} (uid {} and :{} exempt)",
        a.inbound_port, a.outbound_port, a.proxy_uid, a.admin_port
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> InitArgs {
        InitArgs {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: "25, 8000-8100".into(),
            skip_outbound_ports: "5432".into(),
            dry_run: true,
            iptables: "iptables".into(),
        }
    }

    #[test]
    fn rules_exempt_admin_proxy_loopback_and_skipped_ports() {
        let (chain, jumps) = rules(&args()).expect("rules");
        let text: Vec<String> = chain.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-A PALISADE_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A PALISADE_INBOUND -p tcp --dport 25 -j RETURN",
                "-A PALISADE_INBOUND -p tcp --dport 8000:8100 -j RETURN",
                "-A PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                "-A PALISADE_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A PALISADE_OUTPUT -o lo -j RETURN",
                "-A PALISADE_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
            ]
        );
        assert_eq!(jumps.len(), 2);
    }

    #[test]
    fn bad_port_lists_are_refused() {
        for bad in ["0", "x", "70000", "9-3", "1-"] {
            let a = InitArgs {
                skip_inbound_ports: bad.into(),
                ..args()
            };
            let e = rules(&a).expect_err(bad).to_string();
            assert!(e.contains("--skip-inbound-ports"), "{e}");
        }
    }
}
