//! The bench's N services as Kubernetes objects (v1 Service +
//! discovery.k8s.io/v1 EndpointSlice), for `meshless-agent --manifests DIR`,
//! and the same services in the shape the kube-proxy rule generators take.
//! One definition, so every path installs exactly the same services.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::kubeproxy;

/// Namespace of every bench service.
pub const NAMESPACE: &str = "bench";
/// The port clients connect to on the ClusterIP.
pub const SERVICE_PORT: u16 = 80;
/// Where the backends listen.
pub const TARGET_PORT: u16 = 8080;
/// Most services one bench can create: the ClusterIP range 198.19.0.0/16
/// minus its network address and the last address kept free.
pub const MAX_SERVICES: usize = 65_534;

/// ClusterIP of service `i`: 198.19.0.0 + 1 + i (inside the lab's service
/// range 198.19.0.0/16, see `meshless_lab::plan`).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    assert!(i < MAX_SERVICES, "service {i} is outside 198.19.0.0/16");
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    Ipv4Addr::from(base + 1 + u32::try_from(i).unwrap_or(u32::MAX))
}

/// Name of service `i`.
pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// Service `i` as kube-proxy's generators take it.
pub fn service_port(i: usize, backends: &[Ipv4Addr]) -> kubeproxy::ServicePort {
    kubeproxy::ServicePort {
        namespace: NAMESPACE.into(),
        name: service_name(i),
        // Unnamed, like the Service and EndpointSlice ports below.
        port_name: String::new(),
        cluster_ip: cluster_ip(i),
        port: SERVICE_PORT,
        endpoints: backends
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, TARGET_PORT))
            .collect(),
    }
}

/// Services `0..n` for the kube-proxy generators.
pub fn service_ports(n: usize, backends: &[Ipv4Addr]) -> Vec<kubeproxy::ServicePort> {
    (0..n).map(|i| service_port(i, backends)).collect()
}

/// The v1 Service for service `i`: ClusterIP, one unnamed TCP port 80 -> 8080.
pub fn service(i: usize) -> Service {
    let ip = cluster_ip(i).to_string();
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ip_families: Some(vec!["IPv4".into()]),
            ip_family_policy: Some("SingleStack".into()),
            ports: Some(vec![ServicePort {
                port: i32::from(SERVICE_PORT),
                target_port: Some(IntOrString::Int(i32::from(TARGET_PORT))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The EndpointSlice of service `i`: every backend ready, on `node`.
pub fn endpoint_slice(i: usize, backends: &[Ipv4Addr], node: &str) -> EndpointSlice {
    let name = service_name(i);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-bench")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(
                [("kubernetes.io/service-name".to_owned(), name)]
                    .into_iter()
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: backends
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                node_name: Some(node.to_owned()),
                ..Endpoint::default()
            })
            .collect(),
        // The name must equal the Service port's name: both empty.
        ports: Some(vec![EndpointPort {
            name: Some(String::new()),
            port: Some(i32::from(TARGET_PORT)),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Multi-document YAML with a Service and its EndpointSlice for services `0..n`.
pub fn yaml(n: usize, backends: &[Ipv4Addr], node: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(n * 900);
    for i in 0..n {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&service(i)).context("Service to YAML")?);
        out.push_str("---\n");
        out.push_str(
            &serde_yaml::to_string(&endpoint_slice(i, backends, node))
                .context("EndpointSlice to YAML")?,
        );
    }
    Ok(out)
}

/// Writes services `0..n` to `dir/services.yaml` atomically: a temporary
/// name the agent ignores (not `*.yaml`), then a rename, so the agent never
/// reads half a file.
pub fn write(dir: &Path, n: usize, backends: &[Ipv4Addr], node: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".services.yaml.tmp");
    let path = dir.join("services.yaml");
    std::fs::write(&tmp, yaml(n, backends, node)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKENDS: [Ipv4Addr; 2] = [
        Ipv4Addr::new(198, 18, 21, 10),
        Ipv4Addr::new(198, 18, 21, 11),
    ];

    #[test]
    fn cluster_ips_stay_in_the_service_range() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(cluster_ip(255), Ipv4Addr::new(198, 19, 1, 0));
        assert_eq!(cluster_ip(49_999), Ipv4Addr::new(198, 19, 195, 80));
        let last = cluster_ip(MAX_SERVICES - 1).octets();
        assert_eq!(last[..2], [198, 19]);
        assert_ne!(last, [198, 19, 255, 255]);
    }

    #[test]
    fn yaml_round_trips_as_kubernetes_objects() {
        let text = yaml(3, &BACKENDS, "lb1-n5").expect("yaml");
        let docs: Vec<serde_yaml::Value> = text
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).expect("a YAML document"))
            .collect();
        assert_eq!(docs.len(), 6, "{text}");
        let svc: Service = serde_yaml::from_value(docs[4].clone()).expect("Service");
        assert_eq!(docs[4]["apiVersion"], "v1");
        assert_eq!(docs[4]["kind"], "Service");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("198.19.0.3"));
        assert_eq!(spec.cluster_ips, Some(vec!["198.19.0.3".to_owned()]));
        assert_eq!(spec.ip_families, Some(vec!["IPv4".to_owned()]));
        let port = &spec.ports.expect("ports")[0];
        assert_eq!((port.port, port.name.as_deref()), (80, None));
        assert_eq!(port.target_port, Some(IntOrString::Int(8080)));

        assert_eq!(docs[5]["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(docs[5]["kind"], "EndpointSlice");
        let slice: EndpointSlice = serde_yaml::from_value(docs[5].clone()).expect("slice");
        assert_eq!(
            slice.metadata.labels.expect("labels")["kubernetes.io/service-name"],
            "svc-2"
        );
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints.len(), 2);
        for (ep, ip) in slice.endpoints.iter().zip(BACKENDS) {
            assert_eq!(ep.addresses, vec![ip.to_string()]);
            assert_eq!(ep.conditions.as_ref().and_then(|c| c.ready), Some(true));
            assert_eq!(ep.node_name.as_deref(), Some("lb1-n5"));
        }
        let ports = slice.ports.expect("ports");
        assert_eq!(ports[0].name.as_deref(), Some(""));
        assert_eq!(ports[0].port, Some(8080));
    }

    #[test]
    fn manifests_and_rules_describe_the_same_services() {
        let sp = service_port(7, &BACKENDS);
        let svc = service(7);
        assert_eq!(sp.name, svc.metadata.name.clone().expect("name"));
        let spec = svc.spec.expect("spec");
        assert_eq!(Some(sp.cluster_ip.to_string()), spec.cluster_ip);
        assert_eq!(i32::from(sp.port), spec.ports.expect("ports")[0].port);
        assert!(sp.endpoints.iter().all(|e| e.port() == TARGET_PORT));
    }
}
