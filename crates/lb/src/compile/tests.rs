//! Unit tier: manifests in, map entries out, no kernel and no cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshless_common::lb::{FLAG_AFFINITY, FLAG_MAGLEV, MAGLEV_DEFAULT_SIZE, PROTO_TCP, PROTO_UDP};

use super::{addr_bytes, backend_name, compile};
use crate::model::{
    Algorithm, CompileOptions, Compiled, DesiredService, FrontendKind, NodeContext,
};
use crate::{CompileError, ServiceRef};

const TCP: u8 = PROTO_TCP;
const UDP: u8 = PROTO_UDP;

/// Splits a multi-document manifest.
fn documents(yaml: &str) -> impl Iterator<Item = &str> {
    yaml.split("\n---\n").filter(|d| !d.trim().is_empty())
}

fn services(yaml: &str) -> Vec<Service> {
    documents(yaml)
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("bad Service: {e}\n{d}")))
        .collect()
}

fn slices(yaml: &str) -> Vec<EndpointSlice> {
    documents(yaml)
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("bad EndpointSlice: {e}\n{d}")))
        .collect()
}

/// node-a in zone-a, with one address of each family.
fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".to_owned(),
        node_ips: vec![
            "192.168.1.10".parse().expect("ip"),
            "fd00:1::10".parse().expect("ip"),
        ],
        zone: Some("zone-a".to_owned()),
    }
}

fn run(svc: &str, eps: &str) -> Compiled {
    compile(
        &node(),
        &services(svc),
        &slices(eps),
        &CompileOptions::default(),
    )
}

fn key(ip: &str, port: u16, protocol: u8) -> meshless_common::ServiceKey {
    let (addr, family) = addr_bytes(ip.parse().expect("ip"));
    meshless_common::ServiceKey {
        addr,
        port,
        protocol,
        family,
    }
}

/// Every frontend as `addr:port/proto kind`, for assertions and messages.
fn frontends(c: &Compiled) -> Vec<String> {
    c.services
        .iter()
        .map(|(k, d)| format!("{} {:?}", super::describe(k), d.kind))
        .collect()
}

fn at<'a>(c: &'a Compiled, ip: &str, port: u16, protocol: u8) -> &'a DesiredService {
    c.services.get(&key(ip, port, protocol)).unwrap_or_else(|| {
        panic!(
            "no frontend {ip}:{port}/{protocol}; have {:?}",
            frontends(c)
        )
    })
}

fn names(d: &DesiredService) -> Vec<String> {
    d.backends.iter().map(backend_name).collect()
}

/// Slots per backend name.
fn slot_counts(d: &DesiredService) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for &s in &d.slots {
        *counts
            .entry(backend_name(&d.backends[s as usize]))
            .or_insert(0) += 1;
    }
    counts
}

fn messages(c: &Compiled) -> Vec<String> {
    c.errors.iter().map(ToString::to_string).collect()
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: web-abc12
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  nodeName: node-a
  targetRef: {kind: Pod, name: web-0}
- addresses: [10.0.0.2]
  nodeName: node-b
  targetRef: {kind: Pod, name: web-1}
"#;

#[test]
fn cluster_ip_dual_stack() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: web-v4
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.2]
- addresses: [10.0.0.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: web-v6
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00::1"]
"#,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    assert_eq!(
        frontends(&c),
        [
            "10.96.0.10:80/TCP ClusterIp",
            "[fd00:96::10]:80/TCP ClusterIp"
        ]
    );

    let v4 = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(
        names(v4),
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "sorted by address"
    );
    assert_eq!(v4.slots, [0, 1]);
    assert_eq!(
        v4.service,
        ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into()
        }
    );
    assert_eq!(v4.service.to_string(), "shop/web:http");
    assert_eq!(v4.backends[0].addr[..4], [10, 0, 0, 1]);
    assert!(v4.backends[0].addr[4..].iter().all(|b| *b == 0));
    assert_eq!(v4.backends[0].family, meshless_common::family::IPV4);
    assert_eq!((v4.flags, v4.maglev_size, v4.affinity_timeout_s), (0, 0, 0));
    assert_eq!(v4.maglev, None);

    let v6 = at(&c, "fd00:96::10", 80, TCP);
    assert_eq!(
        names(v6),
        ["[fd00::1]:8080"],
        "only IPv6 endpoints behind an IPv6 VIP"
    );
    assert_eq!(v6.backends[0].family, meshless_common::family::IPV6);
}

#[test]
fn node_port_load_balancer_and_external_ips() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.1]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress:
    - ip: 203.0.113.7
    - ip: 203.0.113.8
      ipMode: Proxy
    - hostname: lb.example.com
---
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: admin}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports: [{port: 9000, nodePort: 30900}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.9}]
"#,
        WEB_SLICE,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    // Node IPs only of the Service's family (IPv4 here); ipMode Proxy and
    // hostname-only ingress get none; a NodePort Service's stale status
    // gets none either.
    assert_eq!(
        frontends(&c),
        [
            "10.96.0.10:80/TCP ClusterIp",
            "10.96.0.11:9000/TCP ClusterIp",
            "192.168.1.10:30080/TCP NodePort",
            "192.168.1.10:30900/TCP NodePort",
            "198.51.100.1:80/TCP ExternalIp",
            "203.0.113.7:80/TCP LoadBalancer",
        ]
    );
    for (ip, port) in [
        ("10.96.0.10", 80),
        ("192.168.1.10", 30080),
        ("198.51.100.1", 80),
        ("203.0.113.7", 80),
    ] {
        let d = at(&c, ip, port, TCP);
        assert_eq!(names(d), ["10.0.0.1:8080", "10.0.0.2:8080"], "{ip}:{port}");
        assert_eq!(d.service.to_string(), "shop/web:http");
    }
    assert_eq!(
        at(&c, "10.96.0.11", 9000, TCP).service.to_string(),
        "shop/admin"
    );
}

#[test]
fn udp_and_tcp_on_the_same_port() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: kube-system, name: kube-dns}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
"#,
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: kube-system
  name: kube-dns-x
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 5353, protocol: TCP}
endpoints: [{addresses: [10.0.0.53]}]
"#,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    assert_eq!(names(at(&c, "10.96.0.10", 53, UDP)), ["10.0.0.53:53"]);
    assert_eq!(names(at(&c, "10.96.0.10", 53, TCP)), ["10.0.0.53:5353"]);
}

#[test]
fn sctp_port_is_an_error_and_other_ports_still_compile() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: telco, name: signalling}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80}
  - {name: sigtran, port: 2905, protocol: SCTP}
  - {name: rtp, port: 5004, protocol: UDP}
"#,
        "",
    );
    assert_eq!(
        frontends(&c),
        [
            "10.96.0.20:80/TCP ClusterIp",
            "10.96.0.20:5004/UDP ClusterIp"
        ]
    );
    assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));
    assert!(matches!(
        &c.errors[0],
        CompileError::UnsupportedProtocol { field, value, .. }
            if field == "spec.ports[1].protocol" && value == "SCTP"
    ));
    let msg = &messages(&c)[0];
    for part in [
        "telco/signalling",
        "spec.ports[1].protocol",
        "SCTP",
        "TCP or UDP",
    ] {
        assert!(msg.contains(part), "{msg:?} should mention {part:?}");
    }
    // No endpoints at all: the frontend exists and refuses (kube-proxy REJECT).
    assert!(at(&c, "10.96.0.20", 80, TCP).slots.is_empty());
}

#[test]
fn headless_and_external_name_services_are_skipped_silently() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: db, name: postgres}
spec:
  clusterIP: None
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {namespace: db, name: dual-headless}
spec:
  clusterIPs: [None]
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {namespace: db, name: upstream}
spec:
  type: ExternalName
  externalName: db.example.com
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {namespace: db, name: pending}
spec:
  ports: [{port: 5432}]
"#,
        "",
    );
    assert_eq!(c, Compiled::default());
}

#[test]
fn ready_endpoints_first_then_serving_terminating_never_unready() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#;
    let eps = |first_ready: &str| {
        format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {{ready: {first_ready}, serving: {first_ready}, terminating: false}}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.0.0.4]
  conditions: {{ready: false, serving: false, terminating: true}}
- addresses: [10.0.0.5]
  conditions: {{ready: false, serving: false, terminating: false}}
"#
        )
    };
    // Two ready endpoints (one with no conditions at all): only they count.
    let c = run(svc, &eps("true"));
    assert_eq!(
        names(at(&c, "10.96.0.10", 80, TCP)),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );

    // No ready endpoint: connections drain to the serving, terminating one.
    let no_ready = eps("false").replace("- addresses: [10.0.0.2]\n", "");
    let c = run(svc, &no_ready);
    assert_eq!(names(at(&c, "10.96.0.10", 80, TCP)), ["10.0.0.3:8080"]);

    // Nothing ready or serving: no backend, the datapath refuses.
    let nothing = no_ready.replace(
        "conditions: {ready: false, serving: true, terminating: true}",
        "conditions: {ready: false, serving: false, terminating: true}",
    );
    let c = run(svc, &nothing);
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert!(d.backends.is_empty() && d.slots.is_empty(), "{d:?}");
}

#[test]
fn internal_traffic_policy_local() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: remote-only}
spec:
  clusterIP: 10.96.0.11
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
"#,
        &format!(
            "{WEB_SLICE}\n---\n{}",
            WEB_SLICE
                .replace("name: web-abc12", "name: remote-only-1")
                .replace("service-name: web}", "service-name: remote-only}")
                .replace("nodeName: node-a", "nodeName: node-c")
        ),
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    assert_eq!(
        names(at(&c, "10.96.0.10", 80, TCP)),
        ["10.0.0.1:8080"],
        "node-a only"
    );
    let remote = at(&c, "10.96.0.11", 80, TCP);
    assert!(
        remote.slots.is_empty(),
        "no local endpoint: refuse, {remote:?}"
    );
}

#[test]
fn external_traffic_policy_local_applies_to_external_frontends_only() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.7}]}
"#,
        WEB_SLICE,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    assert_eq!(
        names(at(&c, "10.96.0.10", 80, TCP)),
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "cluster traffic still uses every endpoint"
    );
    for (ip, port) in [
        ("192.168.1.10", 30080),
        ("203.0.113.7", 80),
        ("198.51.100.1", 80),
    ] {
        assert_eq!(
            names(at(&c, ip, port, TCP)),
            ["10.0.0.1:8080"],
            "{ip}:{port}"
        );
    }

    // On a node without endpoints the external frontends refuse.
    let mut elsewhere = node();
    elsewhere.node_name = "node-z".into();
    let c = compile(
        &elsewhere,
        &c_services(),
        &slices(WEB_SLICE),
        &CompileOptions::default(),
    );
    assert!(at(&c, "192.168.1.10", 30080, TCP).slots.is_empty());
    assert_eq!(at(&c, "10.96.0.10", 80, TCP).slots.len(), 2);

    fn c_services() -> Vec<Service> {
        services(
            r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
        )
    }
}

#[test]
fn prefer_close_picks_node_then_zone_then_all() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80}]
"#;
    let eps = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a, zone: zone-a}
- {addresses: [10.0.0.2], nodeName: node-b, zone: zone-a}
- {addresses: [10.0.0.3], nodeName: node-c, zone: zone-b}
"#;
    let backends = |n: NodeContext| {
        let c = compile(&n, &services(svc), &slices(eps), &CompileOptions::default());
        names(at(&c, "10.96.0.10", 80, TCP))
    };
    assert_eq!(backends(node()), ["10.0.0.1:8080"], "this node's endpoint");
    let mut n = node();
    n.node_name = "node-d".into();
    assert_eq!(
        backends(n.clone()),
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "this zone's"
    );
    n.zone = Some("zone-b".into());
    assert_eq!(backends(n.clone()), ["10.0.0.3:8080"]);
    n.zone = Some("zone-z".into());
    assert_eq!(backends(n.clone()).len(), 3, "nothing close: everything");
    n.zone = None;
    assert_eq!(backends(n).len(), 3, "zone unknown: everything");

    // Without PreferClose, all three everywhere.
    let c = run(
        &svc.replace("  trafficDistribution: PreferClose\n", ""),
        eps,
    );
    assert_eq!(at(&c, "10.96.0.10", 80, TCP).backends.len(), 3);
}

#[test]
fn weights_expand_into_slots() {
    let svc = |weights: &str| {
        WEB.replace(
            "metadata: {namespace: shop, name: web}",
            &format!(
                "metadata:\n  namespace: shop\n  name: web\n  annotations:\n    \
                 meshless.dev/backend-weights: \"{weights}\""
            ),
        )
    };
    let counts = |weights: &str| {
        let c = run(&svc(weights), WEB_SLICE);
        assert!(c.errors.is_empty(), "{weights}: {:?}", messages(&c));
        slot_counts(at(&c, "10.96.0.10", 80, TCP))
    };
    let expect = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, k)| (n.to_string(), *k)).collect()
    };

    // Pod names; 3:1 stays 3:1 slots.
    assert_eq!(
        counts("web-0=3,web-1=1"),
        expect(&[("10.0.0.1:8080", 3), ("10.0.0.2:8080", 1)])
    );
    // Reduced by the gcd, addresses as keys, unnamed endpoints default to 1.
    assert_eq!(
        counts("10.0.0.1=600, 10.0.0.2=200"),
        expect(&[("10.0.0.1:8080", 3), ("10.0.0.2:8080", 1)])
    );
    assert_eq!(
        counts("web-1=2"),
        expect(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 2)])
    );
    // Weight 0 drains a pod: not a backend at all.
    let c = run(&svc("web-0=0"), WEB_SLICE);
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(
        (names(d), d.slots.clone()),
        (vec!["10.0.0.2:8080".to_owned()], vec![0])
    );
}

#[test]
fn bad_weights_annotation_is_an_error_and_weights_fall_back_to_one() {
    let c = run(
        &WEB.replace(
            "metadata: {namespace: shop, name: web}",
            "metadata:\n  namespace: shop\n  name: web\n  annotations:\n    \
             meshless.dev/backend-weights: \"web-0=3,web-1=heavy\"",
        ),
        WEB_SLICE,
    );
    assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));
    let msg = &messages(&c)[0];
    for part in [
        "shop/web",
        r#"metadata.annotations["meshless.dev/backend-weights"]"#,
        "\"heavy\"",
        "weight 1",
        "kubectl annotate service -n shop web",
    ] {
        assert!(msg.contains(part), "{msg:?} should mention {part:?}");
    }
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(
        d.slots,
        [0, 1],
        "equal weights while the annotation is broken"
    );
}

fn maglev_web(extra: &str) -> String {
    WEB.replace(
        "metadata: {namespace: shop, name: web}",
        &format!(
            "metadata:\n  namespace: shop\n  name: web\n  annotations:\n    \
             meshless.dev/lb-algorithm: maglev\n{extra}"
        ),
    )
}

#[test]
fn maglev_annotation_builds_a_weighted_table() {
    let c = run(
        &maglev_web(
            "    meshless.dev/maglev-table-size: \"1009\"\n    \
             meshless.dev/backend-weights: web-0=3,web-1=1\n",
        ),
        WEB_SLICE,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(d.flags, FLAG_MAGLEV);
    assert_eq!(d.maglev_size, 1009);
    let table = d.maglev.as_ref().expect("a Maglev table");
    assert_eq!(table.len(), 1009);
    let heavy = table.iter().filter(|&&e| e == 0).count();
    let light = table.iter().filter(|&&e| e == 1).count();
    assert_eq!(heavy + light, 1009, "entries index the two backends");
    // 3:1 of 1009 is 756.75 : 252.25.
    assert!((750..=763).contains(&heavy), "weight 3 got {heavy} of 1009");
    assert_eq!(slot_counts(d).values().copied().collect::<Vec<_>>(), [3, 1]);

    // Default size, and the cluster default algorithm.
    let c = run(&maglev_web(""), WEB_SLICE);
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(d.maglev_size, MAGLEV_DEFAULT_SIZE);
    assert_eq!(
        d.maglev.as_ref().map(Vec::len),
        Some(MAGLEV_DEFAULT_SIZE as usize)
    );
    let opts = CompileOptions {
        default_algorithm: Algorithm::Maglev,
        default_maglev_size: 101,
    };
    let c = compile(&node(), &services(WEB), &slices(WEB_SLICE), &opts);
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!((d.flags, d.maglev_size), (FLAG_MAGLEV, 101));

    // No backends: Maglev flag, empty table, no slots.
    let c = run(&maglev_web(""), "");
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(
        (d.slots.len(), d.maglev.as_ref().map(Vec::len)),
        (0, Some(0))
    );
}

#[test]
fn bad_maglev_annotations_fall_back_to_defaults() {
    let c = run(
        &maglev_web("    meshless.dev/maglev-table-size: \"16384\"\n"),
        WEB_SLICE,
    );
    assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));
    let msg = &messages(&c)[0];
    assert!(
        msg.contains(r#"metadata.annotations["meshless.dev/maglev-table-size"]"#),
        "{msg}"
    );
    assert!(msg.contains("prime"), "{msg}");
    assert_eq!(
        at(&c, "10.96.0.10", 80, TCP).maglev_size,
        MAGLEV_DEFAULT_SIZE
    );

    // Too large to allocate is refused like any other bad size.
    let c = run(
        &maglev_web("    meshless.dev/maglev-table-size: \"4294967291\"\n"),
        WEB_SLICE,
    );
    assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));

    let c = run(
        &maglev_web("").replace("lb-algorithm: maglev", "lb-algorithm: round-robin"),
        WEB_SLICE,
    );
    assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));
    assert!(messages(&c)[0].contains("\"random\" or \"maglev\""));
    let d = at(&c, "10.96.0.10", 80, TCP);
    assert_eq!(
        (d.flags, d.maglev.is_none()),
        (0, true),
        "cluster default (Random)"
    );
}

#[test]
fn maglev_table_is_the_same_on_every_node() {
    let svc = services(&maglev_web(""));
    let mut eps = slices(WEB_SLICE);
    let a = compile(&node(), &svc, &eps, &CompileOptions::default());
    // Another node, which happens to list the slices' endpoints differently.
    let other = NodeContext {
        node_name: "node-b".into(),
        node_ips: vec!["192.168.1.11".parse().expect("ip")],
        zone: Some("zone-b".into()),
    };
    eps[0].endpoints.reverse();
    let b = compile(&other, &svc, &eps, &CompileOptions::default());
    let (da, db) = (at(&a, "10.96.0.10", 80, TCP), at(&b, "10.96.0.10", 80, TCP));
    assert_eq!(da.backends, db.backends);
    assert_eq!(da.maglev, db.maglev);
}

#[test]
fn output_does_not_depend_on_input_order() {
    let svc = format!(
        "{WEB}\n---\n{}\n---\n{}",
        WEB.replace("name: web}", "name: api}")
            .replace("10.96.0.10", "10.96.0.12"),
        maglev_web("")
            .replace("name: web\n", "name: cart\n")
            .replace("10.96.0.10", "10.96.0.13"),
    );
    let eps = format!(
        "{WEB_SLICE}\n---\n{}",
        WEB_SLICE
            .replace("name: web-abc12", "name: web-zzz99")
            .replace("10.0.0.", "10.0.1.")
    );
    let (mut s, mut e) = (services(&svc), slices(&eps));
    let a = compile(&node(), &s, &e, &CompileOptions::default());
    s.reverse();
    e.reverse();
    for slice in &mut e {
        slice.endpoints.reverse();
    }
    let b = compile(&node(), &s, &e, &CompileOptions::default());
    assert_eq!(a, b);
    assert_eq!(a.services.len(), 3);
    assert_eq!(
        at(&a, "10.96.0.10", 80, TCP).backends.len(),
        4,
        "two slices merged"
    );
}

#[test]
fn duplicate_frontend_goes_to_the_first_service_by_name() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {namespace: team-b, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {namespace: team-a, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: other, port: 81}]
"#;
    for reverse in [false, true] {
        let mut s = services(svc);
        if reverse {
            s.reverse();
        }
        let c = compile(&node(), &s, &[], &CompileOptions::default());
        assert_eq!(at(&c, "10.96.0.10", 80, TCP).service.namespace, "team-a");
        assert_eq!(at(&c, "10.96.0.10", 81, TCP).service.namespace, "team-a");
        assert_eq!(c.errors.len(), 1, "{:?}", messages(&c));
        let msg = &messages(&c)[0];
        for part in ["10.96.0.10:80/TCP", "team-a/web:http", "team-b/web:http"] {
            assert!(msg.contains(part), "{msg:?} should mention {part:?}");
        }
    }
}

#[test]
fn client_ip_affinity() {
    let with = |affinity: &str| {
        let c = run(
            &WEB.replace("  ports:", &format!("{affinity}  ports:")),
            WEB_SLICE,
        );
        let d = at(&c, "10.96.0.10", 80, TCP).clone();
        (d.flags, d.affinity_timeout_s, messages(&c))
    };
    assert_eq!(
        with("  sessionAffinity: ClientIP\n"),
        (FLAG_AFFINITY, 10_800, vec![]),
        "Kubernetes' default timeout"
    );
    assert_eq!(
        with(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
        ),
        (FLAG_AFFINITY, 60, vec![])
    );
    assert_eq!(with("  sessionAffinity: None\n"), (0, 0, vec![]));
    let (flags, timeout, errors) = with(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
    );
    assert_eq!((flags, timeout), (FLAG_AFFINITY, 10_800));
    assert!(
        errors.len() == 1
            && errors[0].contains("spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
        "{errors:?}"
    );
    // Affinity and Maglev together.
    let c = run(
        &maglev_web("").replace("  ports:", "  sessionAffinity: ClientIP\n  ports:"),
        WEB_SLICE,
    );
    assert_eq!(
        at(&c, "10.96.0.10", 80, TCP).flags,
        FLAG_MAGLEV | FLAG_AFFINITY
    );
}

#[test]
fn slices_join_by_label_namespace_family_and_port_name() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {port: 81}]
"#,
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: a-main
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {port: 8081}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: b-overlap
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: "", port: 8081}]
endpoints: [{addresses: [10.0.0.2]}, {addresses: [10.0.0.3]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: other
  name: web-elsewhere
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: c-unlabelled
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: d-fqdn
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [web.example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: shop
  name: e-other-port
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: metrics, port: 9090}]
endpoints: [{addresses: [10.9.0.3]}]
"#,
    );
    assert!(c.errors.is_empty(), "{:?}", messages(&c));
    assert_eq!(
        names(at(&c, "10.96.0.10", 80, TCP)),
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
        "deduplicated across slices"
    );
    assert_eq!(
        names(at(&c, "10.96.0.10", 81, TCP)),
        ["10.0.0.1:8081", "10.0.0.2:8081", "10.0.0.3:8081"],
        "unnamed ports match (absent and empty names alike)"
    );
}

#[test]
fn bad_fields_are_reported_and_confined_to_their_object() {
    let c = run(
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: broken}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.300, 10.96.0.31]
  externalIPs: [not-an-ip, "fd00::1"]
  ports:
  - {name: a, port: 70000}
  - {name: b, port: 82, nodePort: -1}
status:
  loadBalancer: {ingress: [{ip: 203.0.113.999}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#,
        &format!(
            "{WEB_SLICE}\n---\n{}",
            WEB_SLICE
                .replace("name: web-abc12", "name: web-bad")
                .replace("10.0.0.2]", "10.0.0.x]")
                .replace("10.0.0.1]", "\"fd00::1\"]")
        ),
    );
    let msgs = messages(&c);
    for field in [
        "spec.clusterIPs[0]",
        "spec.externalIPs[0]",
        "spec.externalIPs[1]",
        "status.loadBalancer.ingress[0].ip",
        "spec.ports[0].port",
        "spec.ports[1].nodePort",
        "endpoints[0].addresses[0]",
        "endpoints[1].addresses[0]",
    ] {
        assert!(
            msgs.iter().any(|m| m.contains(field)),
            "no error names {field}: {msgs:#?}"
        );
    }
    assert_eq!(msgs.len(), 8, "{msgs:#?}");
    assert!(
        msgs[0].starts_with("EndpointSlice shop/web-bad: endpoints[0]"),
        "{}",
        msgs[0]
    );
    // The valid parts still compile, and the other Service is untouched.
    assert_eq!(
        frontends(&c),
        ["10.96.0.10:80/TCP ClusterIp", "10.96.0.31:82/TCP ClusterIp"]
    );
    assert_eq!(
        names(at(&c, "10.96.0.10", 80, TCP)),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
}

/// xorshift64*: a fixed-seed generator so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn garbage(&mut self) -> String {
        const PIECES: &[&str] = &[
            "web-0",
            "web-1",
            "10.0.0.1",
            "fd00::1",
            "=",
            "==",
            ",",
            ",,",
            " ",
            "\t",
            "\n",
            "0",
            "1",
            "3",
            "1000",
            "1001",
            "-1",
            "+5",
            "4294967296",
            "99999999999999999999",
            "1e3",
            "0x10",
            "16381",
            "16384",
            "2",
            "maglev",
            "random",
            "MAGLEV",
            "\u{0}",
            "é",
            "漢",
            "\u{202e}",
            "🙂",
            "%",
            "\"",
            "'",
            "[",
            "]",
            "{",
            "}",
        ];
        let len = if self.below(50) == 0 {
            5_000
        } else {
            self.below(12)
        };
        (0..len).map(|_| PIECES[self.below(PIECES.len())]).collect()
    }
}

#[test]
fn garbage_annotations_never_panic_and_never_drop_the_service() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = services(WEB);
    let eps = slices(WEB_SLICE);
    let opts = CompileOptions {
        default_algorithm: Algorithm::Random,
        // Keep the loop fast when garbage happens to select Maglev.
        default_maglev_size: 101,
    };
    for round in 0..400 {
        let mut svc = base.clone();
        let annotations = svc[0].metadata.annotations.get_or_insert_default();
        for key in [
            crate::BACKEND_WEIGHTS,
            crate::LB_ALGORITHM,
            crate::MAGLEV_TABLE_SIZE,
        ] {
            if rng.below(4) > 0 {
                annotations.insert(key.to_owned(), rng.garbage());
            }
        }
        let snapshot = annotations.clone();
        let c = compile(&node(), &svc, &eps, &opts);
        let d = c
            .services
            .get(&key("10.96.0.10", 80, TCP))
            .unwrap_or_else(|| panic!("round {round}: service dropped for {snapshot:?}"));
        assert!(
            d.slots.len() <= 2_000,
            "round {round}: {} slots",
            d.slots.len()
        );
        assert!(
            c.errors
                .iter()
                .all(|e| matches!(e, CompileError::InvalidAnnotation { .. })),
            "round {round}: {:?}",
            messages(&c)
        );
        for m in messages(&c) {
            assert!(
                m.len() < 1_000,
                "round {round}: error message of {} bytes",
                m.len()
            );
        }
    }
    // The parsers on their own, many more times.
    for _ in 0..20_000 {
        let g = rng.garbage();
        let _ = crate::weights::Weights::parse(&g);
        let mut a = BTreeMap::new();
        a.insert(crate::LB_ALGORITHM.to_owned(), g.clone());
        a.insert(crate::MAGLEV_TABLE_SIZE.to_owned(), g);
        let _ = crate::annotations::parse("ns", "n", Some(&a), &opts, &mut Vec::new());
    }
}

#[test]
fn frontend_kinds_are_reported() {
    let c = run(
        &WEB.replace("  clusterIP:", "  type: NodePort\n  clusterIP:")
            .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}"),
        WEB_SLICE,
    );
    assert_eq!(at(&c, "10.96.0.10", 80, TCP).kind, FrontendKind::ClusterIp);
    assert_eq!(
        at(&c, "192.168.1.10", 30080, TCP).kind,
        FrontendKind::NodePort
    );
}
