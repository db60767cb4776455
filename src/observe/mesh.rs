//! The workloads of a mesh: those of a running local mesh, from `STATE_DIR/mesh.json`
//! (written by `palisade up` once the mesh is ready, removed when it stops), or those a
//! Prometheus server's series name ([`super::prometheus`]). The reports only need names and
//! identities ([`MeshView`]); only a local mesh has admin addresses to scrape ([`LocalMesh`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// One workload of `mesh.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    /// Its SPIFFE ID (`spiffeId`), what other proxies label its requests with.
    pub spiffe_id: Option<String>,
    /// Its proxy's admin address (`adminAddr`): `/metrics`.
    pub admin: Option<SocketAddr>,
}

/// The workloads of a mesh, by name and identity, in the order rows are printed: what the
/// reports need to name a workload and the workloads of an identity, wherever the names came
/// from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    pub workloads: Vec<Workload>,
}

/// The workloads of a local mesh, in the mesh file's order. It dereferences to its
/// [`MeshView`], so that what names workloads works the same on both.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalMesh {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    pub view: MeshView,
}

impl std::ops::Deref for LocalMesh {
    type Target = MeshView;

    fn deref(&self) -> &MeshView {
        &self.view
    }
}

impl LocalMesh {
    /// Reads `DIR/mesh.json`; a missing file is "no running mesh", in one sentence that says
    /// what to do.
    pub fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("mesh.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no running mesh: there is no {} (`palisade up` is not running with the state dir {}; start it, or give --state-dir)",
                path.display(),
                state_dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let doc: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Self::from_json(&doc, path)
    }

    /// The workloads of a `mesh.json` document.
    pub fn from_json(doc: &serde_json::Value, path: PathBuf) -> anyhow::Result<Self> {
        let Some(list) = doc["workloads"].as_array() else {
            bail!("{} has no `workloads` list", path.display());
        };
        let workloads = list
            .iter()
            .map(|w| Workload {
                name: w["name"].as_str().unwrap_or("?").to_string(),
                spiffe_id: w["spiffeId"].as_str().map(str::to_string),
                admin: w["adminAddr"].as_str().and_then(|a| a.parse().ok()),
            })
            .collect();
        Ok(LocalMesh {
            path,
            view: MeshView { workloads },
        })
    }
}

impl MeshView {
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The names of the workloads, comma-separated (for "no workload named X; the mesh has ...").
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.workloads.iter().map(|w| w.name.as_str()).collect();
        names.join(", ")
    }

    /// The workloads that hold `identity` (several when they share a service account).
    pub fn workloads_of(&self, identity: &str) -> Vec<&str> {
        self.workloads
            .iter()
            .filter(|w| w.spiffe_id.as_deref() == Some(identity))
            .map(|w| w.name.as_str())
            .collect()
    }

    /// What an identity is called in a row: its workload's name; the names, comma-separated,
    /// when several workloads share it; the identity itself when no workload of the mesh has
    /// it; `unknown` for a plaintext peer.
    pub fn display_name(&self, identity: &str) -> String {
        if identity == super::UNKNOWN {
            return identity.to_string();
        }
        let names = self.workloads_of(identity);
        if names.is_empty() {
            identity.to_string()
        } else {
            names.join(",")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_identities_and_admin_addresses() {
        let doc = serde_json::json!({
            "controlPlane": "127.0.0.1:8086",
            "workloads": [
                {"name": "web", "spiffeId": "spiffe://cluster.local/ns/demo/sa/web", "adminAddr": "127.0.0.1:14191"},
                {"name": "web2", "spiffeId": "spiffe://cluster.local/ns/demo/sa/web", "adminAddr": "127.0.0.1:14194"},
                {"name": "db", "spiffeId": "spiffe://cluster.local/ns/demo/sa/db"},
            ]
        });
        let m = LocalMesh::from_json(&doc, "mesh.json".into()).unwrap();
        assert_eq!(m.workloads.len(), 3);
        assert_eq!(
            m.workload("web").unwrap().admin,
            Some("127.0.0.1:14191".parse().unwrap())
        );
        assert_eq!(m.workload("db").unwrap().admin, None);
        assert_eq!(
            m.display_name("spiffe://cluster.local/ns/demo/sa/web"),
            "web,web2"
        );
        assert_eq!(m.display_name("spiffe://cluster.local/ns/demo/sa/db"), "db");
        assert_eq!(
            m.display_name("spiffe://other/ns/x/sa/y"),
            "spiffe://other/ns/x/sa/y"
        );
        assert_eq!(m.display_name("unknown"), "unknown");
        assert_eq!(m.names(), "web, web2, db");
        assert!(LocalMesh::from_json(&serde_json::json!({}), "m".into()).is_err());
    }

    #[test]
    fn a_missing_file_means_no_running_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let e = LocalMesh::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no running mesh"), "{e}");
        assert!(e.contains("palisade up"), "{e}");
    }
}
