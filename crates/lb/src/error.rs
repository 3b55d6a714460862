//! Problems the compiler finds in cluster objects.
//!
//! None of them stops a compilation: the object (or the part of it) named in
//! the message is skipped or falls back to a default, everything else compiles.

use crate::model::ServiceRef;

/// One problem in one object. Messages name the object, the field, what
/// happened because of it, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The object has no `metadata.name`, so nothing can refer to it.
    #[error(
        "{kind} in namespace {namespace:?} has no metadata.name and is ignored: \
         create it with a name"
    )]
    MissingName {
        kind: &'static str,
        namespace: String,
    },

    /// A Service port uses a protocol the datapath does not balance.
    #[error(
        "Service {service}: {field} is {value:?}; Meshless balances TCP and UDP only, \
         so this port gets no frontend (the Service's other ports still do): \
         change it to TCP or UDP, or serve this port with another proxy"
    )]
    UnsupportedProtocol {
        /// `namespace/name`.
        service: String,
        /// e.g. `spec.ports[1].protocol`.
        field: String,
        value: String,
    },

    /// A field holds a value that cannot be used.
    #[error(
        "{kind} {object}: {field} is {value:?}, {problem}; {consequence}. \
         Fix {field} on the {kind}"
    )]
    InvalidField {
        /// `Service` or `EndpointSlice`.
        kind: &'static str,
        /// `namespace/name`.
        object: String,
        /// e.g. `spec.clusterIPs[0]`, `endpoints[3].addresses[0]`.
        field: String,
        value: String,
        /// What is wrong, e.g. "which is not an IP address".
        problem: String,
        /// What the compiler did instead, e.g. "this address gets no frontend".
        consequence: String,
    },

    /// A `meshless.dev/*` annotation could not be parsed.
    #[error(
        "Service {service}: metadata.annotations[\"{annotation}\"] is {value:?}: {problem}; \
         {consequence}. Fix it with `kubectl annotate service -n {namespace} {name} \
         {annotation}=... --overwrite`, or remove it"
    )]
    InvalidAnnotation {
        /// `namespace/name`.
        service: String,
        namespace: String,
        name: String,
        annotation: &'static str,
        value: String,
        problem: String,
        consequence: String,
    },

    /// Two Service ports claim the same address, port and protocol.
    #[error(
        "{frontend} is claimed by Service port {kept} and by Service port {dropped}; \
         {kept} keeps it (Services are taken in namespace/name order, ports in spec order) \
         and {dropped} gets no frontend there: give one of them a different address or port"
    )]
    DuplicateFrontend {
        /// e.g. `10.96.0.10:53/UDP`.
        frontend: String,
        kept: ServiceRef,
        dropped: ServiceRef,
    },

    /// More backends than a backend set has slots.
    #[error(
        "Service port {service}: {count} usable {scope} backends exceed the {max} slots \
         of a backend set; only the first {max} (by address) get traffic: split the \
         workload over several Services"
    )]
    TooManyBackends {
        service: ServiceRef,
        /// Which backend set, e.g. `IPv4` or `node-local IPv6`.
        scope: String,
        count: usize,
        max: u32,
    },
}

/// Longest excerpt of a user value quoted in a message: annotations may be
/// up to 256 KiB, and an error log line should stay readable.
const MAX_QUOTED: usize = 120;

/// `value`, cut at a character boundary after [`MAX_QUOTED`] bytes.
pub(crate) fn excerpt(value: &str) -> String {
    if value.len() <= MAX_QUOTED {
        return value.to_owned();
    }
    let mut end = MAX_QUOTED;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

impl CompileError {
    pub(crate) fn invalid_field(
        kind: &'static str,
        object: &str,
        field: impl Into<String>,
        value: &str,
        problem: impl Into<String>,
        consequence: impl Into<String>,
    ) -> Self {
        Self::InvalidField {
            kind,
            object: object.to_owned(),
            field: field.into(),
            value: excerpt(value),
            problem: problem.into(),
            consequence: consequence.into(),
        }
    }
}
