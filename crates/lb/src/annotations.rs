//! The `meshless.dev/*` Service annotations and the defaults behind them,
//! declared once here.

use std::collections::BTreeMap;

use crate::error::{CompileError, excerpt};
use crate::maglev::is_prime;
use crate::model::{Algorithm, CompileOptions};
use crate::weights::Weights;

/// `KEY=WEIGHT,...`: how much traffic each backend gets relative to the
/// others. KEY is a pod name (`targetRef.name`) or an endpoint address. Lets
/// an operator drain a pod (weight 0) or canary a new one without extra
/// Services.
pub const BACKEND_WEIGHTS: &str = "meshless.dev/backend-weights";
/// `random` or `maglev`: overrides [`CompileOptions::default_algorithm`] for
/// Services that need flows to stick to a backend across nodes.
pub const LB_ALGORITHM: &str = "meshless.dev/lb-algorithm";
/// A prime Maglev table size M; larger M gives finer shares for many backends.
pub const MAGLEV_TABLE_SIZE: &str = "meshless.dev/maglev-table-size";

/// Weight of an endpoint the weights annotation does not name.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight: keeps the ratio of two weights meaningful within
/// [`meshless_common::lb::MAX_SLOTS_PER_SET`] slots.
pub const MAX_WEIGHT: u32 = 1_000;
/// Largest Maglev table a Service may ask for: the whole Maglev map. Also keeps
/// an annotation from making the compiler allocate gigabytes.
pub const MAX_MAGLEV_TABLE_SIZE: u32 = meshless_common::capacity::MAGLEV;
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest affinity timeout Kubernetes accepts.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// What the annotations of one Service ask for, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) algorithm: Algorithm,
    pub(crate) maglev_size: u32,
    pub(crate) weights: Weights,
}

/// Reads the annotations of Service `namespace/name`. A bad annotation is
/// reported and its default used; the Service still compiles.
pub(crate) fn parse(
    namespace: &str,
    name: &str,
    annotations: Option<&BTreeMap<String, String>>,
    opts: &CompileOptions,
    errors: &mut Vec<CompileError>,
) -> Settings {
    let get = |key: &str| annotations.and_then(|a| a.get(key));
    let mut error = |annotation: &'static str, value: &str, problem: String, consequence: &str| {
        errors.push(CompileError::InvalidAnnotation {
            service: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            annotation,
            value: excerpt(value),
            problem,
            consequence: consequence.to_owned(),
        });
    };

    let algorithm = match get(LB_ALGORITHM).map(|v| (v, v.trim())) {
        None => opts.default_algorithm,
        Some((_, "random")) => Algorithm::Random,
        Some((_, "maglev")) => Algorithm::Maglev,
        Some((raw, _)) => {
            error(
                LB_ALGORITHM,
                raw,
                "expected \"random\" or \"maglev\"".to_owned(),
                &format!("the cluster default ({:?}) is used", opts.default_algorithm),
            );
            opts.default_algorithm
        }
    };

    let maglev_size = match get(MAGLEV_TABLE_SIZE) {
        None => opts.default_maglev_size,
        Some(raw) => match raw.trim().parse::<u32>() {
            Ok(n) if is_prime(n) && n <= MAX_MAGLEV_TABLE_SIZE => n,
            _ => {
                error(
                    MAGLEV_TABLE_SIZE,
                    raw,
                    format!(
                        "expected a prime number from 2 to {MAX_MAGLEV_TABLE_SIZE} \
                         (16381 and 65537 are common choices)"
                    ),
                    &format!("the default size {} is used", opts.default_maglev_size),
                );
                opts.default_maglev_size
            }
        },
    };

    let weights = match get(BACKEND_WEIGHTS) {
        None => Weights::default(),
        Some(raw) => Weights::parse(raw).unwrap_or_else(|problem| {
            error(
                BACKEND_WEIGHTS,
                raw,
                problem,
                "every backend gets weight 1 until it is fixed",
            );
            Weights::default()
        }),
    };

    Settings {
        algorithm,
        maglev_size,
        weights,
    }
}
