//! What one proxy gets at one generation, and what changed for it between two: the inbound
//! config built for its workload, and the generation's shared services it receives.

use std::sync::Arc;

use palisade_api::v1;

use crate::pieces::SharedService;

/// One proxy's config at one generation, its services shared with every proxy that gets them.
#[derive(Debug)]
pub struct ProxyParts {
    pub version: u64,
    pub inbound: v1::Inbound,
    pub services: Vec<Arc<SharedService>>,
}

impl ProxyParts {
    /// Whether the proxy would hear nothing new (the version aside).
    pub fn same_as(&self, other: &ProxyParts) -> bool {
        self.inbound == other.inbound
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| a.digest == b.digest)
    }

    /// The message to send, with the CA's current roots.
    pub fn config(&self, trust_bundle_der: Vec<Vec<u8>>) -> v1::ProxyConfig {
        v1::ProxyConfig {
            version: self.version,
            inbound: Some(self.inbound.clone()),
            services: self.services.iter().map(|s| s.msg.clone()).collect(),
            trust_bundle_der,
        }
    }

    /// The first message of a `Deltas` stream, and the answer to a proxy that refused a delta.
    pub fn snapshot(&self, trust_bundle_der: Vec<Vec<u8>>) -> v1::ConfigDelta {
        v1::ConfigDelta {
            version: self.version,
            base_version: 0,
            inbound: Some(self.inbound.clone()),
            services: self.services.iter().map(|s| s.msg.clone()).collect(),
            removed_services: Vec::new(),
            trust_bundle: Some(v1::TrustBundle {
                der: trust_bundle_der,
            }),
            lookups: Vec::new(),
            on_demand: false,
        }
    }

    /// A delta from `base` to `self` when nothing the proxy holds differs (the generation
    /// aside): what carries answers to lookups that added no service.
    pub fn unchanged_from(&self, base: &ProxyParts) -> v1::ConfigDelta {
        v1::ConfigDelta {
            version: self.version,
            base_version: base.version,
            ..Default::default()
        }
    }

    /// What a proxy holding `base` needs to hold `self`: the inbound config if it differs, the
    /// services added or changed, the keys of those gone; `None` when nothing changed. Both
    /// service lists are in key order, so this is one merge walk comparing digests, never
    /// messages.
    pub fn delta_from(&self, base: &ProxyParts) -> Option<v1::ConfigDelta> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let mut services = Vec::new();
        let mut removed_services = Vec::new();
        let (mut old, mut new) = (
            base.services.iter().peekable(),
            self.services.iter().peekable(),
        );
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Less,
                (None, Some(_)) => Greater,
                (Some(o), Some(n)) => o.key().cmp(&n.key()),
            };
            match order {
                // In the base only: gone.
                Less => {
                    if let Some(o) = old.next() {
                        removed_services.push(palisade_api::delta::key_of(&o.msg));
                    }
                }
                // New only: added.
                Greater => {
                    if let Some(n) = new.next() {
                        services.push(n.msg.clone());
                    }
                }
                Equal => {
                    if let (Some(o), Some(n)) = (old.next(), new.next())
                        && o.digest != n.digest
                    {
                        services.push(n.msg.clone());
                    }
                }
            }
        }
        let inbound = (self.inbound != base.inbound).then(|| self.inbound.clone());
        if inbound.is_none() && services.is_empty() && removed_services.is_empty() {
            return None;
        }
        Some(v1::ConfigDelta {
            version: self.version,
            base_version: base.version,
            inbound,
            services,
            removed_services,
            trust_bundle: None,
            lookups: Vec::new(),
            on_demand: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Mesh;
    use crate::model::Model;
    use palisade_api::delta::View;
    use proptest::prelude::*;

    const BUNDLE: &[u8] = b"root";

    /// A mesh of up to six workloads (`w0` always, transparent; `c` always, declaring one
    /// upstream) and up to five services, from what the strategy chose.
    #[derive(Clone, Debug)]
    struct Shape {
        /// Per workload w1..w5: present, and its `app` label.
        workloads: [(bool, u8); 5],
        /// Per service s0..s4: present, its selector's `app`, its port, and whether it is HTTP.
        services: [(bool, u8, u8, bool); 5],
        deny_by_default: bool,
        w0_app: u8,
        /// Per service s1..s5: in namespace `other` instead of `demo`.
        other_ns: [bool; 5],
        /// The order the mesh file lists s1..s5 in (the pieces are in key order whatever it is).
        order: Vec<usize>,
    }

    fn shape() -> impl Strategy<Value = Shape> {
        (
            proptest::array::uniform5((any::<bool>(), 0u8..3)),
            proptest::array::uniform5((any::<bool>(), 0u8..3, 0u8..2, any::<bool>())),
            any::<bool>(),
            0u8..3,
            proptest::array::uniform5(any::<bool>()),
            Just((0..5).collect::<Vec<usize>>()).prop_shuffle(),
        )
            .prop_map(
                |(workloads, services, deny_by_default, w0_app, other_ns, order)| Shape {
                    workloads,
                    services,
                    deny_by_default,
                    w0_app,
                    other_ns,
                    order,
                },
            )
    }

    fn mesh(s: &Shape) -> Mesh {
        let app = |a: u8| ["a", "b", "c"][usize::from(a)];
        let mut text = format!(
            "defaultPolicy: {}\nworkloads:\n  - {{ name: w0, namespace: demo, labels: {{ app: {} }}, inboundPort: 2000, adminPort: 2001 }}\n  - {{ name: c, namespace: demo, labels: {{ app: c }}, inboundPort: 2002, adminPort: 2003, upstreams: [ {{ service: s0.demo, port: 80, localPort: 2004 }}, {{ service: a0.other, port: 80, localPort: 2005 }} ] }}\n",
            if s.deny_by_default { "deny" } else { "allow" },
            app(s.w0_app)
        );
        for (i, (present, a)) in s.workloads.iter().enumerate() {
            if *present {
                let port = 3000 + 2 * i;
                text += &format!(
                    "  - {{ name: w{}, namespace: demo, labels: {{ app: {} }}, inboundPort: {port}, adminPort: {} }}\n",
                    i + 1,
                    app(*a),
                    port + 1
                );
            }
        }
        text += "services:\n  - { name: s0, namespace: demo, port: 80, selector: { app: a } }\n";
        for &i in &s.order {
            let (present, a, port, http) = &s.services[i];
            if *present {
                text += &format!(
                    "  - {{ name: s{}, namespace: {}, port: {}, selector: {{ app: {} }}, protocol: {} }}\n",
                    i + 1,
                    if s.other_ns[i] { "other" } else { "demo" },
                    80 + u16::from(*port),
                    app(*a),
                    if *http { "http" } else { "detect" }
                );
            }
        }
        // Listed last, named first: key order is not the file's.
        text += "  - { name: a0, namespace: other, port: 80, selector: { app: a } }\n";
        crate::mesh::parse(&text, std::path::Path::new("mesh.yaml")).expect("a valid mesh")
    }

    fn parts(model: &Model, name: &str) -> ProxyParts {
        let w = model.mesh.workload(name).expect("workload");
        model.parts_of(w)
    }

    /// The parts of `name` as a proxy that resolves on demand and wants `wanted`: (service
    /// index 0..=5 for s0..s5 or 6 for a0, in namespace `other`, port 81).
    fn on_demand(model: &Model, name: &str, wanted: &[(u8, bool, bool)]) -> ProxyParts {
        let w = model.mesh.workload(name).expect("workload");
        let wanted: crate::pieces::Wanted = wanted
            .iter()
            .map(|&(i, other, high)| {
                let name = if i == 6 {
                    "a0".to_string()
                } else {
                    format!("s{i}")
                };
                let ns = if other { "other" } else { "demo" };
                (name, ns.to_string(), if high { 81 } else { 80 })
            })
            .collect();
        model.parts_on_demand(w, &wanted)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// After any sequence of changes, a proxy that applied the deltas holds exactly the
        /// full snapshot of the last generation (same encoding, so the same config digest);
        /// a lost delta is noticed as a version gap and a full snapshot repairs it.
        #[test]
        fn deltas_assemble_the_full_snapshot(
            shapes in proptest::collection::vec(shape(), 1..8),
            lost in proptest::collection::vec(any::<bool>(), 8),
            wanted in proptest::collection::vec(
                proptest::collection::vec((0u8..7, any::<bool>(), any::<bool>()), 0..4), 8),
        ) {
            // w0 receiving the whole mesh, c its upstreams, and c resolving on demand (its
            // upstreams and the services it looked up, a set that changes with each step).
            for proxy in ["w0", "c", "c on demand"] {
                let parts = |model: &Model, i: usize| match proxy {
                    "c on demand" => on_demand(model, "c", &wanted[i]),
                    _ => parts(model, proxy),
                };
                let first = parts(&Model::from_parts(mesh(&shapes[0]), [], 1), 0);
                let mut view = View::default();
                view.apply(first.snapshot(vec![BUNDLE.to_vec()])).expect("snapshot");
                let mut last = first;
                for (i, s) in shapes.iter().enumerate().skip(1) {
                    let next = parts(&Model::from_parts(mesh(s), [], i as u64 + 1), i);
                    let delta = next.delta_from(&last);
                    prop_assert_eq!(delta.is_none(), next.same_as(&last));
                    if let Some(delta) = delta {
                        prop_assert!(delta.trust_bundle.is_none());
                        if lost[i] {
                            // This one never arrives; the one after it does not fit.
                            last = next;
                            continue;
                        }
                        if let Err(e) = view.apply(delta) {
                            let gap = matches!(e, palisade_api::delta::DeltaError::VersionGap { .. });
                            prop_assert!(gap, "{}", e);
                            view.apply(next.snapshot(vec![BUNDLE.to_vec()])).expect("resync");
                        }
                    }
                    last = next;
                    if view.version() == last.version {
                        let full = last.config(vec![BUNDLE.to_vec()]);
                        prop_assert_eq!(view.config(), &full);
                        prop_assert_eq!(
                            palisade_api::config_digest(view.config()),
                            palisade_api::config_digest(&full)
                        );
                    }
                }
            }
        }
    }

    /// w1 (app a) and w2 (app b), w0 of app c; s1 selects b on port 80, s2 selects c on 81.
    fn small() -> Shape {
        Shape {
            workloads: [(true, 0), (true, 1), (false, 0), (false, 0), (false, 0)],
            services: [
                (true, 1, 0, false),
                (true, 2, 1, false),
                (false, 0, 0, false),
                (false, 0, 0, false),
                (false, 0, 0, false),
            ],
            deny_by_default: false,
            w0_app: 2,
            other_ns: [false; 5],
            order: vec![0, 1, 2, 3, 4],
        }
    }

    #[test]
    fn a_delta_names_only_what_changed() {
        let mut s = small();
        let before = parts(&Model::from_parts(mesh(&s), [], 1), "w0");
        // w2 leaves s1's selector; s2 goes away; s3 appears.
        s.workloads[1].1 = 2;
        s.services[1].0 = false;
        s.services[2] = (true, 0, 0, false);
        let after = parts(&Model::from_parts(mesh(&s), [], 2), "w0");
        let d = after.delta_from(&before).expect("a change");
        let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s3"], "changed, then added; s0 unchanged");
        let gone: Vec<&str> = d.removed_services.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(gone, ["s2"]);
        assert!(d.inbound.is_none(), "the inbound config did not change");
        assert_eq!((d.version, d.base_version), (2, 1));
        s.deny_by_default = true;
        let denied = parts(&Model::from_parts(mesh(&s), [], 3), "w0");
        let d = denied.delta_from(&after).expect("a change");
        assert!(d.inbound.is_some() && d.services.is_empty() && d.removed_services.is_empty());
        assert!(denied.delta_from(&denied).is_none());
    }

    #[test]
    fn a_proxy_on_demand_gets_its_upstreams_and_what_it_looked_up() {
        let s = small();
        let model = Model::from_parts(mesh(&s), [], 1);
        let keys = |p: &ProxyParts| -> Vec<String> {
            p.services
                .iter()
                .map(|s| format!("{}.{}:{}", s.msg.name, s.msg.namespace, s.msg.port))
                .collect()
        };
        // Upstreams s0.demo:80 and a0.other:80; nothing looked up yet.
        let none = on_demand(&model, "c", &[]);
        assert_eq!(keys(&none), ["a0.other:80", "s0.demo:80"]);
        // s2.demo:81 looked up (and s5, which does not exist, and s0 again).
        let more = on_demand(
            &model,
            "c",
            &[(2, false, true), (5, false, false), (0, false, false)],
        );
        assert_eq!(keys(&more), ["a0.other:80", "s0.demo:80", "s2.demo:81"]);
        let d = more.delta_from(&none).expect("s2 joined");
        assert_eq!(d.services.len(), 1);
        // Released again: a delta that removes it.
        let d = none.delta_from(&more).expect("s2 left");
        assert_eq!(d.removed_services.len(), 1);
        assert_eq!(d.removed_services[0].name, "s2");
        // w0 declares nothing: on demand, it starts empty (not the whole mesh).
        assert!(on_demand(&model, "w0", &[]).services.is_empty());
        assert_eq!(parts(&model, "w0").services.len(), 4);
        // Lookups by address: s1 is served by w2 (inbound port 3002).
        let pieces = model.pieces();
        let found = pieces
            .lookup("127.0.0.1:3002".parse().unwrap())
            .expect("an endpoint");
        assert_eq!(found.msg.name, "s1");
        assert!(pieces.lookup("127.0.0.1:3003".parse().unwrap()).is_none());
    }
}
