//! Services and EndpointSlices to frontends and backend sets.

mod endpoints;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshless_common::lb::{FLAG_AFFINITY, FLAG_MAGLEV, MAX_SLOTS_PER_SET, PROTO_TCP, PROTO_UDP};
use meshless_common::{Backend, ServiceKey, family};

use crate::annotations::{self, DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S, Settings};
use crate::error::CompileError;
use crate::maglev::maglev_table;
use crate::model::{
    Algorithm, CompileOptions, Compiled, DesiredService, FrontendKind, NodeContext, ServiceRef,
};
use crate::weights;
use endpoints::{Candidate, DEFAULT_NAMESPACE, Scope, SliceIndex, family_of};

/// Compiles every Service port into one [`DesiredService`] per frontend.
///
/// Deterministic: inputs are sorted first (Services by namespace/name,
/// slices by namespace/name), so the order of `services` and `slices` does
/// not matter, and when two Service ports claim the same frontend the one
/// whose namespace/name sorts first keeps it.
pub fn compile(
    node: &NodeContext,
    services: &[Service],
    slices: &[EndpointSlice],
    opts: &CompileOptions,
) -> Compiled {
    let mut errors = Vec::new();
    let index = SliceIndex::build(slices, &mut errors);

    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| {
        let m = &s.metadata;
        (m.namespace.as_deref(), m.name.as_deref(), m.uid.as_deref())
    });

    let mut out = BTreeMap::new();
    for service in sorted {
        compile_service(node, service, &index, opts, &mut out, &mut errors);
    }
    Compiled {
        services: out,
        errors,
    }
}

/// Where a frontend listens, before the port is known.
#[derive(Debug, Clone, Copy)]
struct Address {
    kind: FrontendKind,
    ip: IpAddr,
}

/// A backend set shared by every frontend of a port with the same family
/// and scope.
#[derive(Debug, Clone)]
struct BackendSet {
    backends: Vec<Backend>,
    slots: Vec<u32>,
    maglev: Option<Vec<u32>>,
}

/// What applies to every port of one Service.
#[derive(Debug)]
struct ServiceContext<'a> {
    namespace: &'a str,
    name: &'a str,
    object: String,
    settings: Settings,
    flags: u32,
    affinity_timeout_s: u32,
    internal_local: bool,
    external_local: bool,
    prefer_close: bool,
}

fn compile_service(
    node: &NodeContext,
    service: &Service,
    index: &SliceIndex,
    opts: &CompileOptions,
    out: &mut BTreeMap<ServiceKey, DesiredService>,
    errors: &mut Vec<CompileError>,
) {
    let namespace = service
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let Some(name) = service.metadata.name.as_deref() else {
        errors.push(CompileError::MissingName {
            kind: "Service",
            namespace: namespace.to_owned(),
        });
        return;
    };
    let Some(spec) = service.spec.as_ref() else {
        return;
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return;
    }
    let object = format!("{namespace}/{name}");

    let Some(addresses) = addresses(&object, service, spec, type_, node, errors) else {
        // Headless, or no cluster IP allocated yet: nothing to balance.
        return;
    };

    let settings = annotations::parse(
        namespace,
        name,
        service.metadata.annotations.as_ref(),
        opts,
        errors,
    );
    let affinity_timeout_s = affinity(&object, spec, errors);
    let mut flags = 0;
    if settings.algorithm == Algorithm::Maglev {
        flags |= FLAG_MAGLEV;
    }
    if affinity_timeout_s > 0 {
        flags |= FLAG_AFFINITY;
    }
    let ctx = ServiceContext {
        namespace,
        name,
        object,
        settings,
        flags,
        affinity_timeout_s,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        prefer_close: spec.traffic_distribution.as_deref() == Some("PreferClose"),
    };

    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        compile_port(
            &ctx, i, port, node_ports, &addresses, index, node, out, errors,
        );
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename the arguments"
)]
fn compile_port(
    ctx: &ServiceContext<'_>,
    i: usize,
    port: &ServicePort,
    node_ports: bool,
    addresses: &[Address],
    index: &SliceIndex,
    node: &NodeContext,
    out: &mut BTreeMap<ServiceKey, DesiredService>,
    errors: &mut Vec<CompileError>,
) {
    let service = ServiceRef {
        namespace: ctx.namespace.to_owned(),
        name: ctx.name.to_owned(),
        port_name: port.name.clone().unwrap_or_default(),
    };
    let protocol = match port.protocol.as_deref() {
        None | Some("TCP") => PROTO_TCP,
        Some("UDP") => PROTO_UDP,
        Some(other) => {
            errors.push(CompileError::UnsupportedProtocol {
                service: ctx.object.clone(),
                field: format!("spec.ports[{i}].protocol"),
                value: other.to_owned(),
            });
            return;
        }
    };
    let Some(number) = port_number(port.port) else {
        errors.push(CompileError::invalid_field(
            "Service",
            &ctx.object,
            format!("spec.ports[{i}].port"),
            &port.port.to_string(),
            "which is outside 1..=65535",
            "this port gets no frontend",
        ));
        return;
    };
    let node_port = match port.node_port {
        Some(n) if node_ports => {
            let valid = port_number(n);
            if valid.is_none() {
                errors.push(CompileError::invalid_field(
                    "Service",
                    &ctx.object,
                    format!("spec.ports[{i}].nodePort"),
                    &n.to_string(),
                    "which is outside 1..=65535",
                    "this port gets no NodePort frontend",
                ));
            }
            valid
        }
        // Not allocated (yet), or allocateLoadBalancerNodePorts: false.
        _ => None,
    };

    let mut sets: BTreeMap<(u8, Scope), BackendSet> = BTreeMap::new();
    for address in addresses {
        let frontend_port = match address.kind {
            FrontendKind::NodePort => match node_port {
                Some(p) => p,
                None => continue,
            },
            _ => number,
        };
        let local = match address.kind {
            FrontendKind::ClusterIp => ctx.internal_local,
            _ => ctx.external_local,
        };
        let scope = if local { Scope::Local } else { Scope::Cluster };
        let family = family_of(address.ip);
        let set = sets.entry((family, scope)).or_insert_with(|| {
            let candidates = index.candidates(ctx.namespace, ctx.name, &service.port_name, family);
            let selected = endpoints::select(&candidates, scope, ctx.prefer_close, node);
            backend_set(ctx, &service, family, scope, &selected, errors)
        });

        let (addr, family) = addr_bytes(address.ip);
        let key = ServiceKey {
            addr,
            port: frontend_port,
            protocol,
            family,
        };
        let desired = DesiredService {
            service: service.clone(),
            kind: address.kind,
            backends: set.backends.clone(),
            slots: set.slots.clone(),
            maglev: set.maglev.clone(),
            flags: ctx.flags,
            maglev_size: if ctx.settings.algorithm == Algorithm::Maglev {
                ctx.settings.maglev_size
            } else {
                0
            },
            affinity_timeout_s: ctx.affinity_timeout_s,
        };
        match out.entry(key) {
            Entry::Vacant(v) => {
                v.insert(desired);
            }
            Entry::Occupied(o) => errors.push(CompileError::DuplicateFrontend {
                frontend: describe(&key),
                kept: o.get().service.clone(),
                dropped: service.clone(),
            }),
        }
    }
}

/// Every address the Service listens on, or `None` when it is headless or
/// has no cluster IP yet (kube-proxy skips those Services entirely).
fn addresses(
    object: &str,
    service: &Service,
    spec: &ServiceSpec,
    type_: &str,
    node: &NodeContext,
    errors: &mut Vec<CompileError>,
) -> Option<Vec<Address>> {
    let cluster: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip.as_str()))
            .collect(),
    };
    if cluster
        .first()
        .is_none_or(|(_, ip)| ip.is_empty() || *ip == "None")
    {
        return None;
    }

    let mut out = Vec::new();
    let mut parse =
        |kind: FrontendKind, field: String, value: &str, out: &mut Vec<Address>| match value
            .parse::<IpAddr>()
        {
            Ok(ip) => out.push(Address { kind, ip }),
            Err(_) => errors.push(CompileError::invalid_field(
                "Service",
                object,
                field,
                value,
                "which is not an IP address",
                "this address gets no frontend",
            )),
        };
    for (field, ip) in &cluster {
        parse(FrontendKind::ClusterIp, field.clone(), ip, &mut out);
    }
    let families: Vec<u8> = out.iter().map(|a| family_of(a.ip)).collect();

    if matches!(type_, "NodePort" | "LoadBalancer") {
        for &ip in &node.node_ips {
            if families.contains(&family_of(ip)) {
                out.push(Address {
                    kind: FrontendKind::NodePort,
                    ip,
                });
            }
        }
    }
    // (address, field) of the addresses that need a family check.
    let mut external: Vec<(Address, String)> = Vec::new();
    let mut parse_external = |kind: FrontendKind, field: String, value: &str| {
        let mut parsed = Vec::new();
        parse(kind, field.clone(), value, &mut parsed);
        external.extend(parsed.into_iter().map(|a| (a, field.clone())));
    };
    if type_ == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer sends traffic to the node
            // address (or pod), never to this IP, so kube-proxy does not
            // capture it; doing so would bypass the load balancer's proxy.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = ing.ip.as_deref() {
                let field = format!("status.loadBalancer.ingress[{i}].ip");
                parse_external(FrontendKind::LoadBalancer, field, ip);
            }
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        parse_external(
            FrontendKind::ExternalIp,
            format!("spec.externalIPs[{i}]"),
            ip,
        );
    }

    for (address, field) in external {
        if families.contains(&family_of(address.ip)) {
            out.push(address);
        } else {
            errors.push(CompileError::invalid_field(
                "Service",
                object,
                field,
                &address.ip.to_string(),
                "whose IP family the Service does not have (see spec.ipFamilies), \
                 so it has no endpoints",
                "this address gets no frontend",
            ));
        }
    }
    Some(out)
}

/// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
fn affinity(object: &str, spec: &ServiceSpec, errors: &mut Vec<CompileError>) -> u32 {
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => 0,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => t,
                    _ => {
                        errors.push(CompileError::invalid_field(
                            "Service",
                            object,
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            &t.to_string(),
                            format!("which is outside 1..={MAX_AFFINITY_TIMEOUT_S}"),
                            format!("the default of {DEFAULT_AFFINITY_TIMEOUT_S} s is used"),
                        ));
                        DEFAULT_AFFINITY_TIMEOUT_S
                    }
                },
            }
        }
        Some(other) => {
            errors.push(CompileError::invalid_field(
                "Service",
                object,
                "spec.sessionAffinity",
                other,
                "which is neither None nor ClientIP",
                "the Service gets no session affinity",
            ));
            0
        }
    }
}

/// Deduplicates, weighs and expands the selected endpoints.
fn backend_set(
    ctx: &ServiceContext<'_>,
    service: &ServiceRef,
    family: u8,
    scope: Scope,
    selected: &[Candidate<'_>],
    errors: &mut Vec<CompileError>,
) -> BackendSet {
    // The same address and port may be listed by two slices (while the
    // controller moves endpoints between them); the first listing wins.
    let mut weighted: BTreeMap<Backend, u32> = BTreeMap::new();
    for c in selected {
        let (addr, family) = addr_bytes(c.endpoint.addr);
        let backend = Backend {
            addr,
            port: c.port,
            family,
            _pad: 0,
        };
        let weight = ctx
            .settings
            .weights
            .of(c.endpoint.pod_name.as_deref(), c.endpoint.addr);
        weighted.entry(backend).or_insert(weight);
    }
    // Weight 0 is "never chosen": such a backend is left out of the set
    // altogether, so nothing (slots, Maglev) can point at it.
    let mut list: Vec<(Backend, u32)> = weighted.into_iter().filter(|(_, w)| *w > 0).collect();
    if list.len() > MAX_SLOTS_PER_SET as usize {
        errors.push(CompileError::TooManyBackends {
            service: service.clone(),
            scope: format!(
                "{}{}",
                if scope == Scope::Local {
                    "node-local "
                } else {
                    ""
                },
                if family == family::IPV4 {
                    "IPv4"
                } else {
                    "IPv6"
                }
            ),
            count: list.len(),
            max: MAX_SLOTS_PER_SET,
        });
        list.truncate(MAX_SLOTS_PER_SET as usize);
    }

    let weights: Vec<u32> = list.iter().map(|(_, w)| *w).collect();
    let slots = weights::expand(&weights, MAX_SLOTS_PER_SET);
    let maglev = (ctx.settings.algorithm == Algorithm::Maglev).then(|| {
        // "addr:port" is the same on every node, so every node builds the
        // same table and a flow keeps its backend whichever node it hits.
        let named: Vec<(String, u32)> = list.iter().map(|(b, w)| (backend_name(b), *w)).collect();
        maglev_table(&named, ctx.settings.maglev_size)
    });
    BackendSet {
        backends: list.into_iter().map(|(b, _)| b).collect(),
        slots,
        maglev,
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// Map layout of an address: IPv4 in the first 4 bytes, the rest zero.
fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut addr = [0; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (addr, family::IPV4)
        }
        IpAddr::V6(v6) => (v6.octets(), family::IPV6),
    }
}

fn ip_of(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == family::IPV4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

/// Maglev's stable name of a backend: `10.0.0.1:8080`, `[fd00::1]:8080`.
fn backend_name(b: &Backend) -> String {
    SocketAddr::new(ip_of(&b.addr, b.family), b.port).to_string()
}

/// `10.96.0.10:53/UDP`.
fn describe(key: &ServiceKey) -> String {
    let protocol = if key.protocol == PROTO_UDP {
        "UDP"
    } else {
        "TCP"
    };
    let ip = ip_of(&key.addr, key.family);
    format!("{}/{protocol}", SocketAddr::new(ip, key.port))
}
