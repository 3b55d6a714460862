//! EndpointSlices: parsed once, joined to Services, and filtered the way
//! kube-proxy filters them (readiness, terminating fallback, traffic policy,
//! topology).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshless_common::family;

use crate::error::CompileError;
use crate::model::NodeContext;

/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace of an object that does not say (as `kubectl` assumes).
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// All usable slices, by (namespace, Service name), in slice-name order.
#[derive(Debug, Default)]
pub(crate) struct SliceIndex {
    by_service: BTreeMap<(String, String), Vec<Slice>>,
}

#[derive(Debug)]
struct Slice {
    family: u8,
    /// (port name, port number); the name is empty for an unnamed port.
    ports: Vec<(String, u16)>,
    endpoints: Vec<Endpoint>,
}

/// One endpoint as the selection needs it. Only the first address counts:
/// the API defines no meaning for the others and kube-proxy ignores them.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
    zone: Option<String>,
    /// `targetRef.name`, the key of the weights annotation.
    pub(crate) pod_name: Option<String>,
}

/// An endpoint reached on a particular port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) port: u16,
}

/// Which endpoints a frontend may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    /// Any node's endpoints (traffic policy Cluster).
    Cluster,
    /// Only endpoints on this node (traffic policy Local).
    Local,
}

impl SliceIndex {
    /// Parses every slice once; problems are reported once per slice, not
    /// once per frontend that reads it.
    pub(crate) fn build(slices: &[EndpointSlice], errors: &mut Vec<CompileError>) -> Self {
        let mut sorted: Vec<&EndpointSlice> = slices.iter().collect();
        sorted.sort_by_key(|s| (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()));

        let mut index = Self::default();
        for slice in sorted {
            let namespace = slice
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE);
            let Some(name) = slice.metadata.name.as_deref() else {
                errors.push(CompileError::MissingName {
                    kind: "EndpointSlice",
                    namespace: namespace.to_owned(),
                });
                continue;
            };
            // Slices without the label belong to no Service we balance.
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let object = format!("{namespace}/{name}");
            if let Some(parsed) = parse_slice(&object, slice, errors) {
                index
                    .by_service
                    .entry((namespace.to_owned(), service.clone()))
                    .or_default()
                    .push(parsed);
            }
        }
        index
    }

    /// Endpoints of Service `namespace/service` of `family`, on the slice port
    /// named `port_name`, in slice order.
    pub(crate) fn candidates(
        &self,
        namespace: &str,
        service: &str,
        port_name: &str,
        family: u8,
    ) -> Vec<Candidate<'_>> {
        let Some(slices) = self
            .by_service
            .get(&(namespace.to_owned(), service.to_owned()))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for slice in slices.iter().filter(|s| s.family == family) {
            let Some(&(_, port)) = slice.ports.iter().find(|(n, _)| n == port_name) else {
                continue;
            };
            out.extend(
                slice
                    .endpoints
                    .iter()
                    .map(|endpoint| Candidate { endpoint, port }),
            );
        }
        out
    }
}

fn parse_slice(
    object: &str,
    slice: &EndpointSlice,
    errors: &mut Vec<CompileError>,
) -> Option<Slice> {
    let family = match slice.address_type.as_str() {
        "IPv4" => family::IPV4,
        "IPv6" => family::IPV6,
        // Hostnames are for DNS, not for a datapath.
        "FQDN" => return None,
        other => {
            errors.push(CompileError::invalid_field(
                "EndpointSlice",
                object,
                "addressType",
                other,
                "which is not IPv4, IPv6 or FQDN",
                "the slice is ignored",
            ));
            return None;
        }
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // No number means "all ports", which only headless Services use.
        let Some(number) = p.port else { continue };
        match u16::try_from(number) {
            Ok(port) if port > 0 => ports.push((p.name.clone().unwrap_or_default(), port)),
            _ => errors.push(CompileError::invalid_field(
                "EndpointSlice",
                object,
                format!("ports[{i}].port"),
                &number.to_string(),
                "which is outside 1..=65535",
                "this port of the slice is ignored",
            )),
        }
    }

    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let Some(first) = e.addresses.first() else {
            errors.push(CompileError::invalid_field(
                "EndpointSlice",
                object,
                format!("endpoints[{i}].addresses"),
                "",
                "which is empty",
                "the endpoint is ignored",
            ));
            continue;
        };
        let addr = match first.parse::<IpAddr>() {
            Ok(a) if family_of(a) == family => a,
            _ => {
                errors.push(CompileError::invalid_field(
                    "EndpointSlice",
                    object,
                    format!("endpoints[{i}].addresses[0]"),
                    first,
                    format!("which is not an {} address", slice.address_type),
                    "the endpoint is ignored",
                ));
                continue;
            }
        };
        let conditions = e.conditions.as_ref();
        // The API says: nil ready and nil serving mean true, nil terminating false.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(Endpoint {
            addr,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: e.node_name.clone(),
            zone: e.zone.clone(),
            pod_name: e.target_ref.as_ref().and_then(|t| t.name.clone()),
        });
    }

    Some(Slice {
        family,
        ports,
        endpoints,
    })
}

/// The endpoints a frontend uses, kube-proxy's way:
///
/// 1. `Local` scope keeps only endpoints on this node.
/// 2. Ready endpoints; if there are none, the serving-and-terminating ones
///    (so connections still drain to pods shutting down gracefully rather
///    than being refused). Endpoints neither ready nor serving never count.
/// 3. With `PreferClose` (Cluster scope only, where it has a choice): this
///    node's endpoints if any, else this zone's if any, else all.
pub(crate) fn select<'a>(
    candidates: &[Candidate<'a>],
    scope: Scope,
    prefer_close: bool,
    node: &NodeContext,
) -> Vec<Candidate<'a>> {
    let on_node = |c: &Candidate<'_>| c.endpoint.node_name.as_deref() == Some(&*node.node_name);
    let in_scope: Vec<Candidate<'a>> = candidates
        .iter()
        .filter(|c| scope == Scope::Cluster || on_node(c))
        .copied()
        .collect();

    let ready: Vec<Candidate<'a>> = in_scope
        .iter()
        .filter(|c| c.endpoint.ready)
        .copied()
        .collect();
    let usable = if ready.is_empty() {
        in_scope
            .into_iter()
            .filter(|c| c.endpoint.serving && c.endpoint.terminating)
            .collect()
    } else {
        ready
    };

    if !prefer_close || scope == Scope::Local {
        return usable;
    }
    let local: Vec<Candidate<'a>> = usable.iter().filter(|c| on_node(c)).copied().collect();
    if !local.is_empty() {
        return local;
    }
    if let Some(zone) = node.zone.as_deref() {
        let same_zone: Vec<Candidate<'a>> = usable
            .iter()
            .filter(|c| c.endpoint.zone.as_deref() == Some(zone))
            .copied()
            .collect();
        if !same_zone.is_empty() {
            return same_zone;
        }
    }
    usable
}

pub(crate) fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => family::IPV4,
        IpAddr::V6(_) => family::IPV6,
    }
}
