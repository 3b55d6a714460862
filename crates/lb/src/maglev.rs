//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4).
//!
//! Each backend gets a permutation of the table positions from two hashes of
//! its name (`offset`, `skip`); backends then take turns claiming their next
//! free preferred position until the table of size M is full. With M prime,
//! every permutation visits every position. The table depends only on the
//! backend names, weights and M, so every node builds the same one and a
//! flow hashes to the same backend wherever it lands.
//!
//! The hash (seeded FNV-1a 64, then the MurmurHash3 finalizer) is part of
//! that cross-node contract: changing it reshuffles every table, so nodes on
//! different versions would disagree during a rollout. The golden test below pins it.

/// Builds the lookup table for `backends` (stable name, weight).
///
/// Entries are indexes into `backends`. A backend of weight `w` claims `w`
/// positions per round (weights are divided by their gcd first), so its share
/// of the table is close to `w / sum(w)`; weight 0 claims none. The result
/// does not depend on the order of `backends`. Empty when `backends` is empty,
/// every weight is 0, or `size` is 0.
///
/// `size` should be prime (the paper's requirement, and what
/// [`crate::compile`] enforces for annotations). For any other size, a skip
/// that shares a factor with it is bumped to the next coprime one so the
/// table still fills.
pub fn maglev_table(backends: &[(String, u32)], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let divisor = backends.iter().fold(0, |g, (_, w)| gcd(g, *w));
    if m == 0 || divisor == 0 {
        return Vec::new();
    }

    // Populate in name order so callers that list backends differently
    // (different nodes, different slice order) still get the same table.
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    order.sort_by(|&a, &b| backends[a].0.cmp(&backends[b].0).then(a.cmp(&b)));

    struct Turn {
        index: u32,
        turns: u32,
        offset: u64,
        skip: u64,
        next: u64,
    }
    let mut turns: Vec<Turn> = order
        .into_iter()
        .map(|i| {
            let name = backends[i].0.as_bytes();
            let offset = name_hash(OFFSET_SEED, name) % m;
            let skip = coprime_skip(name_hash(SKIP_SEED, name), m);
            Turn {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                turns: backends[i].1 / divisor,
                offset,
                skip,
                next: 0,
            }
        })
        .collect();

    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; usize::try_from(size).unwrap_or(usize::MAX)];
    let mut filled: u64 = 0;
    loop {
        for t in &mut turns {
            for _ in 0..t.turns {
                // `skip` is coprime with M, so this walk reaches every
                // position and finds a free one while the table is not full.
                let pos = loop {
                    let pos = (t.offset + t.next * t.skip) % m;
                    t.next += 1;
                    let pos = pos as usize;
                    if table[pos] == EMPTY {
                        break pos;
                    }
                };
                table[pos] = t.index;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// Whether `n` is prime (trial division; `n` is at most a table size).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Seeds of the two hashes (the paper's h1 and h2). Arbitrary, but fixed forever.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// FNV-1a 64 over the seed and the name, then the MurmurHash3 finalizer so
/// the two seeded hashes are not visibly correlated modulo M.
fn name_hash(seed: u64, name: &[u8]) -> u64 {
    fmix64(fnv1a64(seed.to_le_bytes().iter().chain(name)))
}

fn fnv1a64<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .into_iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The paper's `skip = h2 mod (M - 1) + 1`, moved to the next value coprime
/// with M (a no-op when M is prime).
fn coprime_skip(hash: u64, m: u64) -> u64 {
    if m <= 2 {
        return 1;
    }
    let mut skip = hash % (m - 1) + 1;
    while gcd64(skip, m) != 1 {
        skip = skip % (m - 1) + 1;
    }
    skip
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn gcd64(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd64(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;

    fn named(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.0.{}.{}:8080", i / 250, i % 250 + 1), 1))
            .collect()
    }

    /// Entries per backend name.
    fn counts(backends: &[(String, u32)], table: &[u32]) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for &e in table {
            *c.entry(backends[e as usize].0.clone()).or_insert(0) += 1;
        }
        c
    }

    fn by_name(backends: &[(String, u32)], table: &[u32]) -> Vec<String> {
        table
            .iter()
            .map(|&e| backends[e as usize].0.clone())
            .collect()
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(meshless_common::lb::MAGLEV_DEFAULT_SIZE));
        assert!(is_prime(65_537));
        assert!(!is_prime(16_383), "16383 = 3 * 43 * 127");
        assert!(!is_prime(65_536));
        assert!(is_prime(4_294_967_291), "largest 32-bit prime");
        assert!(!is_prime(u32::MAX));
    }

    #[test]
    fn hash_is_fnv1a_and_pinned() {
        // Published FNV-1a 64 vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // What every node computes must not change between releases.
        let name = b"10.0.0.1:8080";
        assert_eq!(
            name_hash(OFFSET_SEED, name),
            0xdbf5_0372_439f_2c63,
            "offset hash changed"
        );
        assert_eq!(
            name_hash(SKIP_SEED, name),
            0x4b11_4803_3cdc_d661,
            "skip hash changed"
        );
        let table = maglev_table(&named(3), 13);
        assert_eq!(
            table,
            [0, 1, 2, 0, 1, 0, 2, 2, 1, 2, 1, 0, 0],
            "Maglev table for 3 backends, M=13, changed"
        );
    }

    #[test]
    fn empty_inputs_give_empty_tables() {
        assert!(maglev_table(&[], 16_381).is_empty());
        assert!(maglev_table(&named(3), 0).is_empty());
        let zero = vec![("a:1".to_owned(), 0), ("b:1".to_owned(), 0)];
        assert!(maglev_table(&zero, 17).is_empty());
    }

    #[test]
    fn every_entry_is_a_backend_and_the_table_is_full() {
        for m in [1, 2, 3, 16, 97, 100, 16_381] {
            let backends = named(7);
            let table = maglev_table(&backends, m);
            assert_eq!(table.len(), m as usize, "M={m}");
            assert!(
                table.iter().all(|&e| (e as usize) < backends.len()),
                "M={m}"
            );
        }
    }

    #[test]
    fn equal_weights_share_within_one_percent() {
        let m = meshless_common::lb::MAGLEV_DEFAULT_SIZE;
        for n in [10, 100] {
            let backends = named(n);
            let table = maglev_table(&backends, m);
            let c = counts(&backends, &table);
            assert_eq!(c.len(), n, "every backend gets entries");
            let ideal = f64::from(m) / n as f64;
            for (name, &k) in &c {
                let dev = (k as f64 - ideal).abs() / ideal;
                assert!(
                    dev <= 0.01,
                    "N={n}: {name} has {k} entries, ideal {ideal:.1} ({dev:.4})"
                );
            }
        }
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        let m = meshless_common::lb::MAGLEV_DEFAULT_SIZE;
        let backends: Vec<(String, u32)> = named(10)
            .into_iter()
            .enumerate()
            .map(|(i, (n, _))| (n, i as u32 + 1))
            .collect();
        let total: u32 = backends.iter().map(|b| b.1).sum();
        let table = maglev_table(&backends, m);
        let c = counts(&backends, &table);
        for (name, w) in &backends {
            let ideal = f64::from(m) * f64::from(*w) / f64::from(total);
            let k = c[name] as f64;
            let dev = (k - ideal).abs() / ideal;
            assert!(
                dev <= 0.01,
                "{name} weight {w}: {k} entries, ideal {ideal:.1} ({dev:.4})"
            );
        }
    }

    #[test]
    fn weight_zero_gets_nothing_and_weights_are_reduced_by_gcd() {
        let a = vec![
            ("a:1".to_owned(), 2),
            ("b:1".to_owned(), 0),
            ("c:1".to_owned(), 2),
        ];
        let b = vec![
            ("a:1".to_owned(), 1),
            ("b:1".to_owned(), 0),
            ("c:1".to_owned(), 1),
        ];
        let table = maglev_table(&a, 101);
        assert!(!table.contains(&1));
        assert_eq!(table, maglev_table(&b, 101));
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let backends = named(20);
        let mut reversed = backends.clone();
        reversed.reverse();
        let m = 1_009;
        assert_eq!(
            by_name(&backends, &maglev_table(&backends, m)),
            by_name(&reversed, &maglev_table(&reversed, m))
        );
    }

    /// Disruption when one of N backends goes away (section 5.3 of the
    /// paper: Maglev trades a little extra disruption for balance).
    ///
    /// Minimal disruption is the removed backend's own ~M/N entries; Maglev
    /// also moves some entries between surviving backends, because removing
    /// one changes the order in which the others claim positions. Measured
    /// with M=16381 over every possible removal: N=10 moves at most 101
    /// other entries (0.62% of M, total 1.06/N); N=50 at most 178 (1.09% of
    /// M, total 1.54/N). The bounds leave ~25% headroom over that.
    #[test]
    fn removing_one_backend_moves_few_other_entries() {
        let m = meshless_common::lb::MAGLEV_DEFAULT_SIZE;
        for (n, max_other) in [(10, 0.008), (50, 0.013)] {
            let before_b = named(n);
            let before = by_name(&before_b, &maglev_table(&before_b, m));
            let mut worst = 0.0_f64;
            for removed in 0..n {
                let mut after_b = before_b.clone();
                let gone = after_b.remove(removed).0;
                let after = by_name(&after_b, &maglev_table(&after_b, m));
                let mut owned_by_gone = 0;
                let mut moved_other = 0;
                for (b, a) in before.iter().zip(&after) {
                    if *b == gone {
                        owned_by_gone += 1;
                        assert_ne!(a, &gone, "an entry of the removed {gone} stayed");
                    } else if b != a {
                        moved_other += 1;
                    }
                }
                assert!(owned_by_gone > 0, "{gone} had entries");
                let frac = moved_other as f64 / f64::from(m);
                worst = worst.max(frac);
                assert!(
                    frac <= max_other,
                    "N={n}, removed {gone}: {moved_other} entries of surviving backends \
                     moved ({:.2}% of M, bound {:.2}%)",
                    frac * 100.0,
                    max_other * 100.0
                );
                let total = (owned_by_gone + moved_other) as f64 / f64::from(m);
                assert!(
                    total * n as f64 <= 1.0 + max_other * n as f64,
                    "N={n}: {:.3}/N of the table changed",
                    total * n as f64
                );
            }
            assert!(
                worst > 0.0,
                "Maglev is not minimally disruptive; did the test break?"
            );
        }
    }

    #[test]
    fn adding_one_backend_moves_few_other_entries() {
        let m = meshless_common::lb::MAGLEV_DEFAULT_SIZE;
        let before_b = named(10);
        let before = by_name(&before_b, &maglev_table(&before_b, m));
        let mut after_b = before_b.clone();
        after_b.push(("10.9.9.9:8080".to_owned(), 1));
        let after = by_name(&after_b, &maglev_table(&after_b, m));
        let new_entries = after.iter().filter(|a| *a == "10.9.9.9:8080").count();
        let moved_other = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && *a != "10.9.9.9:8080")
            .count();
        // The newcomer takes ~M/11; measured 77 other entries move (0.47%).
        assert!(
            (1_480..=1_500).contains(&new_entries),
            "new backend got {new_entries}"
        );
        assert!(
            moved_other as f64 <= 0.008 * f64::from(m),
            "{moved_other} other entries moved"
        );
    }
}
