//! What `up` checks before it starts anything, so that a mistake is reported in the terminal
//! and a second `up` never touches a mesh that is already running: the state directory's
//! lock, the mesh file's ports, and the policies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::bail;
use palisade_control_plane::mesh::{Mesh, Workload};
use palisade_control_plane::{Model, ModelError};

/// Held for as long as `up` runs: `STATE_DIR/up.lock`, locked, holding our pid.
pub(super) struct StateLock {
    _file: File,
}

/// Locks the state directory, or says which `up` holds it.
pub(super) fn lock_state(state: &Path, shown: &Path) -> anyhow::Result<StateLock> {
    let path = state.join("up.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            if pid.is_empty() {
                bail!("a mesh is already running from {}", shown.display());
            }
            bail!(
                "a mesh is already running from {} (pid {pid}); stop it first, or use another --state-dir",
                shown.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("cannot lock {}: {e}", path.display())
        }
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    Ok(StateLock { _file: file })
}

/// Every loopback port `w` will listen on, with the mesh-file field that names it.
pub(super) fn workload_ports(i: usize, w: &Workload) -> Vec<(String, u16)> {
    let mut v = Vec::new();
    if let Some(p) = w.app_port
        && w.command.is_some()
    {
        v.push((format!("workloads[{i}].appPort"), p));
    }
    v.push((format!("workloads[{i}].inboundPort"), w.inbound_port));
    v.push((format!("workloads[{i}].adminPort"), w.admin_port));
    for (j, u) in w.upstreams.iter().enumerate() {
        v.push((
            format!("workloads[{i}].upstreams[{j}].localPort"),
            u.local_port,
        ));
    }
    v
}

/// Fails, naming the field, if something already listens on one of `ports`. An app port
/// without a `command` belongs to an app started by someone else: it is expected to be taken.
pub(super) fn check_ports(ports: &[(String, u16)]) -> anyhow::Result<()> {
    for (field, port) in ports {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", *port)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                bail!("{field} {port} is in use by another process");
            }
            bail!("{field} {port}: cannot listen on 127.0.0.1:{port}: {e}");
        }
    }
    Ok(())
}

pub(super) fn mesh_ports(mesh: &Mesh) -> Vec<(String, u16)> {
    let mut v = vec![("controlPlane.port".to_string(), mesh.control_plane.port)];
    for (i, w) in mesh.workloads.iter().enumerate() {
        v.extend(workload_ports(i, w));
    }
    v
}

/// Loads the policies the way the control plane will, so that a broken one is reported here,
/// each error on its own line, before any process starts.
pub(super) fn load_model(mesh: Mesh) -> anyhow::Result<Model> {
    match Model::load(mesh, 1) {
        Ok(m) => Ok(m),
        Err(ModelError::Policies(errors)) => {
            let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
            bail!(
                "the policies are invalid; nothing was started:\n{}",
                lines.join("\n")
            )
        }
        Err(e) => Err(e.into()),
    }
}
