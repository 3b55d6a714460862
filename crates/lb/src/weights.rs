//! Per-backend weights: the `meshless.dev/backend-weights` annotation and
//! their expansion into the slots the datapath picks from.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::annotations::{DEFAULT_WEIGHT, MAX_WEIGHT};
use crate::error::excerpt;

/// Parsed `KEY=WEIGHT,...`; a key is a pod name or an IP address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Weights {
    by_pod: BTreeMap<String, u32>,
    by_ip: BTreeMap<IpAddr, u32>,
}

impl Weights {
    /// Parses the annotation value; the error says what is wrong with it.
    ///
    /// Empty entries (a trailing comma) are allowed; a key given twice is not,
    /// since one of the two weights would be silently ignored.
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        let mut weights = Self::default();
        let mut seen = BTreeMap::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((key, weight)) = entry.split_once('=') else {
                return Err(format!("entry {:?} is not KEY=WEIGHT", excerpt(entry)));
            };
            let (key, weight) = (key.trim(), weight.trim());
            if key.is_empty() {
                return Err(format!(
                    "entry {:?} has no pod name or IP before '='",
                    excerpt(entry)
                ));
            }
            let weight = weight
                .parse::<u32>()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| {
                    format!(
                        "weight {:?} of {:?} is not an integer from 0 to {MAX_WEIGHT}",
                        excerpt(weight),
                        excerpt(key)
                    )
                })?;
            if seen.insert(key, weight).is_some() {
                return Err(format!("{:?} is given more than once", excerpt(key)));
            }
            // A pod name may look like an address ("10.0.0.1" is a valid
            // object name), so an address key is also tried as a pod name.
            if let Ok(ip) = key.parse::<IpAddr>() {
                weights.by_ip.insert(ip, weight);
            }
            weights.by_pod.insert(key.to_owned(), weight);
        }
        Ok(weights)
    }

    /// The weight of an endpoint: by pod name first, then by address.
    pub(crate) fn of(&self, pod: Option<&str>, ip: IpAddr) -> u32 {
        pod.and_then(|p| self.by_pod.get(p))
            .or_else(|| self.by_ip.get(&ip))
            .copied()
            .unwrap_or(DEFAULT_WEIGHT)
    }
}

/// Expands weights into slots: index `i` appears in proportion to
/// `weights[i]`, reduced by the gcd, in at most `max_slots` slots.
///
/// When the reduced weights sum to more than `max_slots` they are scaled down
/// and every positive weight keeps at least one slot; weight 0 gets none. The
/// caller keeps the number of positive weights at or below `max_slots`
/// (otherwise only the first `max_slots` of them get a slot).
pub(crate) fn expand(weights: &[u32], max_slots: u32) -> Vec<u32> {
    let scaled = scale(weights, max_slots);
    let mut slots = Vec::new();
    for (i, &w) in scaled.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        slots.extend(std::iter::repeat_n(index, w as usize));
    }
    slots.truncate(max_slots as usize);
    slots
}

fn scale(weights: &[u32], max_slots: u32) -> Vec<u32> {
    let reduced = reduce(weights);
    let sum: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    if sum <= u64::from(max_slots) {
        return reduced;
    }
    // Proportional shares of the budget, rounded down. A weight whose share
    // rounds to 0 is pinned at 1 slot and the rest of the budget is shared
    // again among the others, until no share rounds to 0. Each round pins at
    // least one more weight, and the floors never exceed the budget, so the
    // total stays within `max_slots`.
    let mut pinned = vec![false; reduced.len()];
    loop {
        let pinned_count = pinned.iter().filter(|p| **p).count() as u64;
        let budget = u64::from(max_slots).saturating_sub(pinned_count);
        let rest: u64 = reduced
            .iter()
            .zip(&pinned)
            .filter(|(_, p)| !**p)
            .map(|(&w, _)| u64::from(w))
            .sum();
        // `rest` is 0 only when every positive weight is pinned.
        let share = |w: u32| (u64::from(w) * budget).checked_div(rest).unwrap_or(0);
        let mut pinned_more = false;
        for (w, p) in reduced.iter().zip(pinned.iter_mut()) {
            if *w > 0 && !*p && share(*w) == 0 {
                *p = true;
                pinned_more = true;
            }
        }
        if !pinned_more {
            let scaled: Vec<u32> = reduced
                .iter()
                .zip(&pinned)
                .map(|(&w, &p)| match (w, p) {
                    (0, _) => 0,
                    (_, true) => 1,
                    // share(w) <= budget <= max_slots, so it fits in a u32.
                    (w, false) => u32::try_from(share(w)).unwrap_or(max_slots),
                })
                .collect();
            return reduce(&scaled);
        }
    }
}

/// Divides every weight by their gcd (all zero stays all zero).
fn reduce(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g <= 1 {
        return weights.to_vec();
    }
    weights.iter().map(|w| w / g).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = meshless_common::lb::MAX_SLOTS_PER_SET;

    fn count(slots: &[u32], i: u32) -> usize {
        slots.iter().filter(|&&s| s == i).count()
    }

    #[test]
    fn parses_pod_names_and_addresses() {
        let w = Weights::parse(" web-0=3, 10.0.0.2 =1,fd00::5=0,").expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(w.of(Some("web-0"), ip("10.0.0.1")), 3);
        assert_eq!(w.of(Some("web-1"), ip("10.0.0.2")), 1);
        // Address keys match any spelling of the address.
        assert_eq!(w.of(None, ip("fd00:0::5")), 0);
        assert_eq!(w.of(Some("other"), ip("10.0.0.9")), DEFAULT_WEIGHT);
        assert_eq!(
            Weights::parse("").expect("empty is valid"),
            Weights::default()
        );
    }

    #[test]
    fn rejects_malformed_values() {
        for (value, says) in [
            ("web-0", "is not KEY=WEIGHT"),
            ("=3", "no pod name"),
            ("web-0=x", "not an integer from 0 to 1000"),
            ("web-0=-1", "not an integer"),
            ("web-0=1001", "not an integer from 0 to 1000"),
            ("web-0=1.5", "not an integer"),
            ("web-0=1,web-0=2", "more than once"),
        ] {
            let err = Weights::parse(value).expect_err(value);
            assert!(err.contains(says), "{value:?}: {err:?} should say {says:?}");
        }
    }

    #[test]
    fn expands_by_reduced_weights() {
        assert_eq!(expand(&[3, 1], MAX), [0, 0, 0, 1]);
        assert_eq!(expand(&[300, 100], MAX), [0, 0, 0, 1]);
        assert_eq!(expand(&[2, 0, 4], MAX), [0, 2, 2]);
        assert_eq!(expand(&[1, 1, 1], MAX), [0, 1, 2]);
        assert!(expand(&[0, 0], MAX).is_empty());
        assert!(expand(&[], MAX).is_empty());
    }

    #[test]
    fn scales_down_keeping_every_positive_weight() {
        // 10 backends at 997 and 1 at 1: 9971 > 4096 slots.
        let mut weights = vec![997; 10];
        weights.push(1);
        let slots = expand(&weights, MAX);
        assert!(slots.len() <= MAX as usize, "{} slots", slots.len());
        assert_eq!(count(&slots, 10), 1, "the weight-1 backend keeps a slot");
        let big = count(&slots, 0);
        assert!(big >= 400, "{big} slots for a 997 weight");
        for i in 0..10 {
            assert_eq!(count(&slots, i), big, "equal weights stay equal");
        }

        // 4096 backends, one heavy: everybody still gets a slot.
        let mut weights = vec![1; MAX as usize];
        weights[0] = 1000;
        let slots = expand(&weights, MAX);
        assert_eq!(slots.len(), MAX as usize);
        assert!((0..MAX).all(|i| count(&slots, i) == 1));

        // Proportions survive scaling within a slot.
        let weights: Vec<u32> = (0..20).map(|i| 500 + i).collect();
        let slots = expand(&weights, MAX);
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let ideal = f64::from(w) * slots.len() as f64 / f64::from(total);
            let got = count(&slots, i as u32) as f64;
            assert!(
                (got - ideal).abs() <= 1.0,
                "weight {w}: {got} slots, ideal {ideal:.1}"
            );
        }
    }
}
