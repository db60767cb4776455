//! Incremental config (`Discovery.Deltas`): what a proxy holds, assembled from a full snapshot
//! and the deltas after it.
//!
//! A proxy's services are kept in key order (name, namespace, port) — the order the control
//! plane sends a full snapshot in — so the assembled config encodes exactly like a full snapshot
//! of the same version and [`crate::config_digest`] agrees on both sides.

use std::cmp::Ordering;

use crate::v1;

/// Why a delta was not applied. The proxy refuses it on the stream and the control plane
/// answers with a full snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("a delta on top of version {base}, but version {held} is held")]
    VersionGap { base: u64, held: u64 },
    #[error("a full snapshot without its inbound config")]
    NoInbound,
    #[error("version {version} is older than its base {base}")]
    NotNewer { version: u64, base: u64 },
}

/// The ordering key of a service.
pub fn key_of(s: &v1::Service) -> v1::ServiceKey {
    v1::ServiceKey {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        port: s.port,
    }
}

/// What a proxy's services are ordered and told apart by: the order a full snapshot carries
/// them in.
pub fn sort_key(s: &v1::Service) -> (&str, &str, u32) {
    (s.name.as_str(), s.namespace.as_str(), s.port)
}

/// Orders a service against a key without building the service's key.
fn cmp_key(s: &v1::Service, k: &v1::ServiceKey) -> Ordering {
    sort_key(s).cmp(&(k.name.as_str(), k.namespace.as_str(), k.port))
}

/// The config assembled so far from one stream. Empty (version 0) until the first snapshot.
#[derive(Debug, Default, Clone)]
pub struct View {
    config: v1::ProxyConfig,
}

impl View {
    /// The version held; 0 before the first snapshot.
    pub fn version(&self) -> u64 {
        self.config.version
    }

    /// The config held, as a full snapshot of [`Self::version`] would carry it.
    pub fn config(&self) -> &v1::ProxyConfig {
        &self.config
    }

    /// Applies `delta`, whole or not at all.
    pub fn apply(&mut self, delta: v1::ConfigDelta) -> Result<(), DeltaError> {
        if delta.base_version == 0 {
            let inbound = delta.inbound.ok_or(DeltaError::NoInbound)?;
            let mut services = delta.services;
            services.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
            services.dedup_by(|a, b| sort_key(a) == sort_key(b));
            self.config = v1::ProxyConfig {
                version: delta.version,
                inbound: Some(inbound),
                services,
                trust_bundle_der: delta.trust_bundle.map(|b| b.der).unwrap_or_default(),
            };
            return Ok(());
        }
        if delta.base_version != self.config.version {
            return Err(DeltaError::VersionGap {
                base: delta.base_version,
                held: self.config.version,
            });
        }
        // Equal versions: an answer to lookups within the same generation of the mesh.
        if delta.version < delta.base_version {
            return Err(DeltaError::NotNewer {
                version: delta.version,
                base: delta.base_version,
            });
        }
        let services = &mut self.config.services;
        for gone in &delta.removed_services {
            if let Ok(i) = services.binary_search_by(|s| cmp_key(s, gone)) {
                services.remove(i);
            }
        }
        for s in delta.services {
            match services.binary_search_by(|x| sort_key(x).cmp(&sort_key(&s))) {
                Ok(i) => services[i] = s,
                Err(i) => services.insert(i, s),
            }
        }
        if let Some(inbound) = delta.inbound {
            self.config.inbound = Some(inbound);
        }
        if let Some(bundle) = delta.trust_bundle {
            self.config.trust_bundle_der = bundle.der;
        }
        self.config.version = delta.version;
        Ok(())
    }
}

/// One delta as it arrived on a [`Subscription`].
#[derive(Debug)]
pub struct Arrived {
    pub version: u64,
    /// Its encoded size (what it cost on the wire).
    pub encoded_len: usize,
    /// Whether it applied to the view held. When it did not, the subscription has already
    /// asked the control plane for a full snapshot.
    pub applied: Result<(), DeltaError>,
    /// The answers to lookups it carried.
    pub lookups: Vec<v1::Lookup>,
    /// A full snapshot (the first message of a stream, or a resync).
    pub snapshot: bool,
    /// Whether it changed what is held (a delta that only answers lookups does not).
    pub changed: bool,
    /// In a snapshot: the control plane resolves this stream's lookups.
    pub on_demand: bool,
}

/// How a proxy opens its stream.
#[derive(Debug, Clone, Default)]
pub struct Hello {
    pub workload: String,
    /// The version held before (0: nothing).
    pub known_version: u64,
    /// Resolve outbound services on demand ([`Lookups`]) instead of receiving the whole mesh.
    pub on_demand: bool,
    /// Services resolved on demand over an earlier stream, to keep.
    pub services: Vec<v1::ServiceKey>,
}

/// A proxy's end of a `Discovery.Deltas` stream: the hello, each delta applied to the view
/// held, and the replies (a refusal that asks for a resync when a delta does not fit).
pub struct Subscription {
    replies: tokio::sync::mpsc::Sender<v1::DeltaRequest>,
    stream: tonic::Streaming<v1::ConfigDelta>,
    view: View,
}

/// Asks for services on a [`Subscription`]'s stream, from any task.
#[derive(Clone, Debug)]
pub struct Lookups {
    replies: tokio::sync::mpsc::Sender<v1::DeltaRequest>,
}

impl Lookups {
    /// Asks the control plane to resolve `destinations` (`ip:port`) and to drop `releases`;
    /// false when the stream is gone. The answers arrive as [`Arrived::lookups`].
    pub async fn send(&self, destinations: Vec<String>, releases: Vec<v1::ServiceKey>) -> bool {
        let msg = v1::DeltaRequest {
            lookups: destinations,
            releases,
            ..Default::default()
        };
        self.replies.send(msg).await.is_ok()
    }
}

impl Subscription {
    /// Opens the stream for `workload`, which held `known_version` before (0: nothing). A
    /// control plane of an earlier release answers `UNIMPLEMENTED`.
    pub async fn open(
        channel: tonic::transport::Channel,
        workload: String,
        known_version: u64,
    ) -> Result<Self, tonic::Status> {
        Self::open_with(
            channel,
            Hello {
                workload,
                known_version,
                ..Default::default()
            },
        )
        .await
    }

    /// Opens the stream as `hello` says.
    pub async fn open_with(
        channel: tonic::transport::Channel,
        hello: Hello,
    ) -> Result<Self, tonic::Status> {
        let (replies, requests) = tokio::sync::mpsc::channel::<v1::DeltaRequest>(16);
        let hello = v1::DeltaRequest {
            workload: hello.workload,
            version: hello.known_version,
            on_demand: hello.on_demand,
            services: hello.services,
            ..Default::default()
        };
        replies
            .send(hello)
            .await
            .map_err(|_| tonic::Status::internal("request stream closed"))?;
        let requests = futures_util::stream::unfold(requests, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        });
        let stream = v1::discovery_client::DiscoveryClient::new(channel)
            .deltas(requests)
            .await?
            .into_inner();
        Ok(Self {
            replies,
            stream,
            view: View::default(),
        })
    }

    /// The next delta, applied to the view held; `None` when the control plane ended the
    /// stream.
    pub async fn next(&mut self) -> Result<Option<Arrived>, tonic::Status> {
        use prost::Message;
        let Some(mut delta) = self.stream.message().await? else {
            return Ok(None);
        };
        let (version, encoded_len) = (delta.version, delta.encoded_len());
        let lookups = std::mem::take(&mut delta.lookups);
        let snapshot = delta.base_version == 0;
        let changed = snapshot
            || delta.inbound.is_some()
            || delta.trust_bundle.is_some()
            || !delta.services.is_empty()
            || !delta.removed_services.is_empty();
        let on_demand = delta.on_demand;
        let applied = self.view.apply(delta);
        if let Err(e) = &applied {
            self.reply(version, e.to_string(), true).await;
        }
        Ok(Some(Arrived {
            version,
            encoded_len,
            applied,
            lookups,
            snapshot,
            changed,
            on_demand,
        }))
    }

    /// A handle that asks for services on this stream.
    pub fn lookups(&self) -> Lookups {
        Lookups {
            replies: self.replies.clone(),
        }
    }

    /// The config held: every delta applied so far.
    pub fn config(&self) -> &v1::ProxyConfig {
        self.view.config()
    }

    /// Acknowledges `version`; false when the stream is gone.
    pub async fn ack(&self, version: u64) -> bool {
        self.reply(version, String::new(), false).await
    }

    /// Refuses `version`, which applied but cannot be served (it does not compile): no resync,
    /// the same content again would not compile either. False when the stream is gone.
    pub async fn refuse(&self, version: u64, error: String) -> bool {
        self.reply(version, error, false).await
    }

    async fn reply(&self, version: u64, error: String, resync: bool) -> bool {
        let reply = v1::DeltaRequest {
            version,
            error,
            resync,
            ..Default::default()
        };
        self.replies.send(reply).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: u32, endpoints: &[&str]) -> v1::Service {
        v1::Service {
            name: name.into(),
            namespace: "ns".into(),
            port,
            endpoints: endpoints
                .iter()
                .map(|a| v1::Endpoint {
                    address: (*a).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn full(version: u64, services: Vec<v1::Service>) -> v1::ConfigDelta {
        v1::ConfigDelta {
            version,
            inbound: Some(v1::Inbound::default()),
            services,
            trust_bundle: Some(v1::TrustBundle {
                der: vec![b"root".to_vec()],
            }),
            ..Default::default()
        }
    }

    fn names(v: &View) -> Vec<(String, u32, usize)> {
        v.config()
            .services
            .iter()
            .map(|s| (s.name.clone(), s.port, s.endpoints.len()))
            .collect()
    }

    #[test]
    fn a_snapshot_then_deltas_add_change_and_remove_in_key_order() {
        let mut v = View::default();
        v.apply(full(3, vec![svc("b", 1, &["x"]), svc("a", 2, &[])]))
            .unwrap();
        assert_eq!(names(&v), [("a".into(), 2, 0), ("b".into(), 1, 1)]);
        assert_eq!(v.config().trust_bundle_der, [b"root".to_vec()]);
        v.apply(v1::ConfigDelta {
            version: 5,
            base_version: 3,
            services: vec![svc("c", 1, &[]), svc("b", 1, &["x", "y"])],
            removed_services: vec![key_of(&svc("a", 2, &[]))],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&v), [("b".into(), 1, 2), ("c".into(), 1, 0)]);
        assert_eq!(v.version(), 5);
        assert!(v.config().inbound.is_some(), "an absent inbound is kept");
        assert_eq!(
            v.config().trust_bundle_der,
            [b"root".to_vec()],
            "an absent bundle is kept"
        );
    }

    #[test]
    fn a_gap_or_a_snapshot_without_inbound_changes_nothing() {
        let mut v = View::default();
        v.apply(full(3, vec![svc("a", 1, &[])])).unwrap();
        let before = v.config().clone();
        let gap = v1::ConfigDelta {
            version: 9,
            base_version: 4,
            removed_services: vec![key_of(&svc("a", 1, &[]))],
            ..Default::default()
        };
        assert_eq!(
            v.apply(gap),
            Err(DeltaError::VersionGap { base: 4, held: 3 })
        );
        let mut no_inbound = full(10, vec![]);
        no_inbound.inbound = None;
        assert_eq!(v.apply(no_inbound), Err(DeltaError::NoInbound));
        let backwards = v1::ConfigDelta {
            version: 2,
            base_version: 3,
            ..Default::default()
        };
        assert!(matches!(
            v.apply(backwards),
            Err(DeltaError::NotNewer { .. })
        ));
        assert_eq!(v.config(), &before);
    }
}
