//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`) and of the corpus replay test
//! (`tests/fuzz_corpus.rs`), shared so that they cannot drift apart. Each takes raw bytes,
//! runs the real parser, asserts what must hold of whatever it returns, and says whether the
//! input was accepted. A panic is a bug. Not an API: hidden from the docs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use palisade_certs::ca::{MAX_LEAF_TTL, MIN_LEAF_TTL};
use palisade_certs::{Ca, CaError, SpiffeId, TrustBundle, TrustDomain, verify_svid};
use rustls_pki_types::UnixTime;
use x509_parser::prelude::FromDer;

use crate::identity::IdentityService;
use crate::inject::review::{AllNamespaces, Reviewed};
use crate::inject::{InjectConfig, review};

/// The mesh file (`palisade up`, `authz explain`, the control plane's live reload).
pub fn mesh_yaml(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let path = Path::new("/fuzz/mesh.yaml");
    let mesh = match crate::mesh::parse(text, path) {
        Ok(m) => m,
        Err(e) => {
            assert!(e.to_string().starts_with("/fuzz/mesh.yaml: "), "{e}");
            return false;
        }
    };
    assert!((MIN_LEAF_TTL..=MAX_LEAF_TTL).contains(&mesh.certificate_lifetime));
    // Names, identities and the loopback ports every workload listens on are its own.
    let mut names = HashSet::new();
    let mut ports = HashSet::from([mesh.control_plane.port]);
    for w in &mesh.workloads {
        assert!(names.insert(w.name.as_str()), "workload {} twice", w.name);
        let id = w.spiffe_id(&mesh).expect("an accepted workload has an ID");
        assert_eq!(id.trust_domain_str(), mesh.trust_domain.as_str());
        assert!(mesh.workloads_with_id(&id).any(|x| x.name == w.name));
        let own = [Some(w.inbound_port), Some(w.admin_port), w.app_port]
            .into_iter()
            .flatten()
            .chain(w.upstreams.iter().map(|u| u.local_port));
        for p in own {
            assert!(p != 0 && ports.insert(p), "port {p} twice");
        }
    }
    let mut services = HashSet::new();
    for s in &mesh.services {
        assert!(
            services.insert(s.qualified_name()),
            "{} twice",
            s.qualified_name()
        );
        assert_eq!(mesh.service(&s.name, &s.namespace), Some(s));
    }
    true
}

/// An AdmissionReview as the API server posts it to the injector webhook (and as
/// `palisade inject --admission-review` reads it).
pub fn admission_review(data: &[u8]) -> bool {
    let cfg = InjectConfig::default();
    let review = match review(data, &cfg, &AllNamespaces::enabled()) {
        Reviewed::Answer { review, summary } => {
            assert!(!summary.is_empty());
            review
        }
        Reviewed::NamespaceUnknown(m) => panic!("every namespace is known here: {m}"),
    };
    assert_eq!(review.kind, "AdmissionReview");
    assert!(matches!(
        review.api_version.as_str(),
        "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
    ));
    // The answer always parses back, and echoes the request's uid whenever it had one.
    let body = review.to_json();
    let back: crate::inject::review::ReviewResponse =
        serde_json::from_slice(&body).expect("the answer is an AdmissionReview");
    assert_eq!(&back, &*review);
    let request: Option<serde_json::Value> = serde_json::from_slice(data).ok();
    if let Some(uid) = request
        .as_ref()
        .and_then(|v| v.pointer("/request/uid"))
        .and_then(|u| u.as_str())
    {
        assert_eq!(review.response.uid, uid);
    }
    if !review.response.allowed {
        let status = review.response.status.as_ref().expect("a refusal says why");
        assert!(status.code.is_some_and(|c| c >= 400), "{status:?}");
        assert!(review.response.patch.is_none());
        return false;
    }
    // A patch applies to the pod it was computed for, and leaves a pod.
    if let Some(patch) = review.patch() {
        let patch = patch.expect("the patch decodes");
        let mut pod = request
            .as_ref()
            .and_then(|v| v.pointer("/request/object"))
            .cloned()
            .expect("a patch comes with a pod");
        json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");
        // The request's kind is what the webhook goes by (the API server sends an object of
        // that kind); an object's own `apiVersion`/`kind` are not what is tested here.
        if let Some(map) = pod.as_object_mut() {
            map.insert("apiVersion".into(), "v1".into());
            map.insert("kind".into(), "Pod".into());
        }
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(pod).expect("the patched pod is a pod");
        let spec = pod.spec.expect("a patched pod has a spec");
        assert!(
            spec.init_containers
                .iter()
                .flatten()
                .any(|c| c.restart_policy.as_deref() == Some("Always")),
            "the proxy runs as a native sidecar"
        );
    }
    true
}

fn fuzz_ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        Ca::generate(&TrustDomain::cluster_local(), None).expect("a CA for the fuzz target")
    })
}

/// A CSR as a workload sends it to the identity service (`Certify`): the URI SANs it asks for
/// are read (to refuse asking for someone else), then the CA signs its key for the caller's ID.
pub fn csr_der(data: &[u8]) -> bool {
    let _ = IdentityService::requested_uris(data);
    let ca = fuzz_ca();
    let td = TrustDomain::cluster_local();
    let id = SpiffeId::for_workload(&td, "demo", "web").expect("a valid ID");
    let svid = match ca.sign_csr(data, &id, Duration::from_secs(3600)) {
        Ok(svid) => svid,
        Err(e) => {
            assert!(
                matches!(e, CaError::BadCsr | CaError::UnsupportedKey),
                "{e}"
            );
            return false;
        }
    };
    // Whatever the CSR said, the certificate is a valid SVID for the caller's ID only...
    assert_eq!(svid.id, id);
    let bundle = TrustBundle::with_roots(&td, [ca.root_der().clone()]).expect("the CA's root");
    assert_eq!(
        verify_svid(&svid.chain, &bundle, Some(&td), UnixTime::now()),
        Ok(id)
    );
    // ...over the key the CSR holds.
    let der = if data.starts_with(b"-----BEGIN") {
        None
    } else {
        Some(data)
    };
    if let Some((_, csr)) = der.and_then(|d| {
        x509_parser::certification_request::X509CertificationRequest::from_der(d).ok()
    }) {
        let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf()).expect("the leaf parses");
        assert_eq!(
            leaf.public_key().raw,
            csr.certification_request_info.subject_pki.raw
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        assert!(!csr_der(b"\x30\x03\x02\x01\x00"));
        assert!(!mesh_yaml(b"workloads: 7\n"));
        assert!(!admission_review(b"{"));
        assert!(mesh_yaml(b"workloads: []\n"));
    }
}
