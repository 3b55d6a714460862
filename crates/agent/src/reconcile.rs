//! Desired load-balancing state (from crates/lb) -> the pinned maps, writing
//! only the difference.
//!
//! Ids are the agent's business: backend ids (one per distinct address and
//! port), set ids (a fresh one each time a service's backends change, so the
//! switch is one atomic update), and service ids (stable per frontend, keys
//! of the affinity map). On start the agent adopts what the maps hold, so a
//! restart with unchanged input writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use meshless_common::{Backend, ServiceKey, ServiceValue};
use meshless_lb::DesiredService;

/// What the reconciler writes through: the pinned maps in the agent, an
/// in-memory model in unit tests.
pub trait LbWriter {
    type Error: std::fmt::Display;
    /// True when the error is a full map (counted separately: it needs a
    /// bigger map, not a fixed manifest).
    fn is_full(err: &Self::Error) -> bool;
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), Self::Error>;
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    fn write_set(&mut self, set_id: u32, backend_ids: &[u32]) -> Result<(), Self::Error>;
    fn delete_set(&mut self, set_id: u32, len: u32);
    fn write_maglev(&mut self, set_id: u32, table: &[u32]) -> Result<(), Self::Error>;
    fn delete_maglev(&mut self, set_id: u32, len: u32);
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
}

impl LbWriter for meshless_maps::LbMaps {
    type Error = meshless_maps::MapsError;
    fn is_full(err: &Self::Error) -> bool {
        matches!(err, meshless_maps::MapsError::Full { .. })
    }
    fn put_backend(&mut self, id: u32, b: &Backend) -> Result<(), Self::Error> {
        Self::put_backend(self, id, b)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error> {
        Self::remove_backend(self, id)
    }
    fn write_set(&mut self, set_id: u32, ids: &[u32]) -> Result<(), Self::Error> {
        Self::write_set(self, set_id, ids)
    }
    fn delete_set(&mut self, set_id: u32, len: u32) {
        Self::delete_set(self, set_id, len);
    }
    fn write_maglev(&mut self, set_id: u32, table: &[u32]) -> Result<(), Self::Error> {
        Self::write_maglev(self, set_id, table)
    }
    fn delete_maglev(&mut self, set_id: u32, len: u32) {
        Self::delete_maglev(self, set_id, len);
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error> {
        Self::put_service(self, key, value)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error> {
        Self::remove_service(self, key)
    }
}

/// One installed frontend, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    value: ServiceValue,
    slots: Vec<u32>,
    maglev: Option<Vec<u32>>,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub services_written: usize,
    pub services_removed: usize,
    pub services_unchanged: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Frontends that could not be written; their previous state is kept.
    pub errors: Vec<String>,
    /// How many of those failed because a map was full.
    pub map_full: usize,
}

/// The reconciler's memory of what is in the maps.
#[derive(Debug, Default)]
pub struct LbState {
    backends: BTreeMap<Backend, u32>,
    installed: BTreeMap<ServiceKey, Installed>,
    service_ids: BTreeMap<ServiceKey, u32>,
    /// Id allocators: every id a map entry (or a retired entry) still uses
    /// is taken, so allocation is O(log n), not a scan of all services.
    set_pool: IdPool,
    backend_pool: IdPool,
    service_pool: IdPool,
    /// Sets and backends no service points at any more. A connect() that
    /// read the old service value a moment ago may still look them up, so
    /// they are deleted only after a grace period ([`LbState::flush_retired`]).
    retired_sets: Vec<(std::time::Instant, Installed)>,
    retired_backends: Vec<(std::time::Instant, u32)>,
}

/// How long a replaced set or backend stays readable: far longer than any
/// single BPF program run, short enough not to matter for capacity.
const GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Ids from 1 up, reused only after release; allocation walks forward from
/// the last id handed out, so it is O(log n) amortised.
#[derive(Debug, Default)]
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdPool {
    fn alloc(&mut self) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if self.used.insert(self.next) {
                return self.next;
            }
        }
    }
    fn take(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id);
    }
    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

impl LbState {
    /// Rebuilds the state from maps a previous agent left (pinned).
    pub fn adopt(maps: &meshless_maps::LbMaps) -> Result<Self, meshless_maps::MapsError> {
        let mut state = Self::default();
        for (id, backend) in maps.backends()? {
            state.backends.insert(backend, id);
            state.backend_pool.take(id);
        }
        for (key, value) in maps.services()? {
            let slots = maps.read_set(value.set_id, value.slots)?;
            let maglev = if value.flags & meshless_common::lb::FLAG_MAGLEV != 0 {
                Some(maps.read_maglev(value.set_id, value.maglev_size)?)
            } else {
                None
            };
            state.set_pool.take(value.set_id);
            state.service_pool.take(value.service_id);
            state.service_ids.insert(key, value.service_id);
            state.installed.insert(
                key,
                Installed {
                    value,
                    slots,
                    maglev,
                },
            );
        }
        Ok(state)
    }

    /// Number of installed frontends.
    pub fn frontends(&self) -> usize {
        self.installed.len()
    }

    /// Number of backends in the maps.
    pub fn backends(&self) -> usize {
        self.backends.len()
    }

    /// Deletes retired sets and backends older than the grace period; call it
    /// on every tick.
    pub fn flush_retired<W: LbWriter>(&mut self, w: &mut W) {
        let now = std::time::Instant::now();
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired_sets)
            .into_iter()
            .partition(|(t, _)| now.duration_since(*t) >= GRACE);
        self.retired_sets = keep;
        for (_, set) in old {
            release(w, &set);
            self.set_pool.release(set.value.set_id);
        }
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired_backends)
            .into_iter()
            .partition(|(t, _)| now.duration_since(*t) >= GRACE);
        self.retired_backends = keep;
        for (_, id) in old {
            let _ignored = w
                .remove_backend(id)
                .map_err(|e| tracing::warn!(backend = id, error = %e, "removing backend"));
            self.backend_pool.release(id);
        }
    }

    /// True while something waits for its grace period.
    pub fn has_retired(&self) -> bool {
        !self.retired_sets.is_empty() || !self.retired_backends.is_empty()
    }

    fn backend_id<W: LbWriter>(
        &mut self,
        w: &mut W,
        b: &Backend,
        report: &mut ApplyReport,
    ) -> Result<u32, (String, bool)> {
        if let Some(id) = self.backends.get(b) {
            return Ok(*id);
        }
        let id = self.backend_pool.alloc();
        if let Err(e) = w.put_backend(id, b) {
            self.backend_pool.release(id);
            return Err(err::<W>(e));
        }
        report.backends_written += 1;
        self.backends.insert(*b, id);
        Ok(id)
    }

    /// Makes the maps match `desired`, writing only what differs.
    pub fn apply<W: LbWriter>(
        &mut self,
        w: &mut W,
        desired: &BTreeMap<ServiceKey, DesiredService>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        for (key, d) in desired {
            match self.apply_one(w, key, d, &mut report) {
                Ok(true) => report.services_written += 1,
                Ok(false) => report.services_unchanged += 1,
                Err((e, full)) => {
                    report.map_full += usize::from(full);
                    report
                        .errors
                        .push(format!("{} ({}): {e}", d.service, describe(key)));
                }
            }
        }
        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Err(e) = w.remove_service(&key) {
                report
                    .errors
                    .push(format!("removing {}: {e}", describe(&key)));
                continue;
            }
            if let Some(old) = self.installed.remove(&key) {
                self.retired_sets.push((std::time::Instant::now(), old));
            }
            if let Some(id) = self.service_ids.remove(&key) {
                self.service_pool.release(id);
            }
            report.services_removed += 1;
        }
        // Backends no set refers to any more.
        let referenced: BTreeSet<u32> = self
            .installed
            .values()
            .flat_map(|i| i.slots.iter().chain(i.maglev.iter().flatten()))
            .copied()
            .collect();
        let unused: Vec<(Backend, u32)> = self
            .backends
            .iter()
            .filter(|(_, id)| !referenced.contains(id))
            .map(|(b, id)| (*b, *id))
            .collect();
        for (b, id) in unused {
            self.backends.remove(&b);
            self.retired_backends.push((std::time::Instant::now(), id));
            report.backends_removed += 1;
        }
        report
    }

    /// Returns Ok(true) when something was written.
    fn apply_one<W: LbWriter>(
        &mut self,
        w: &mut W,
        key: &ServiceKey,
        d: &DesiredService,
        report: &mut ApplyReport,
    ) -> Result<bool, (String, bool)> {
        let mut ids = Vec::with_capacity(d.backends.len());
        for b in &d.backends {
            ids.push(self.backend_id(w, b, report)?);
        }
        let slots: Vec<u32> = d.slots.iter().map(|i| ids[*i as usize]).collect();
        let maglev: Option<Vec<u32>> = d
            .maglev
            .as_ref()
            .map(|t| t.iter().map(|i| ids[*i as usize]).collect());
        let service_id = match self.service_ids.get(key) {
            Some(id) => *id,
            None => self.service_pool.alloc(),
        };
        let shape = |set_id| ServiceValue {
            set_id,
            slots: u32::try_from(slots.len()).unwrap_or(u32::MAX),
            flags: d.flags,
            maglev_size: d.maglev_size,
            affinity_timeout_s: d.affinity_timeout_s,
            service_id,
        };
        if let Some(cur) = self.installed.get(key)
            && cur.slots == slots
            && cur.maglev == maglev
            && cur.value == shape(cur.value.set_id)
        {
            return Ok(false);
        }
        let set_id = self.set_pool.alloc();
        let value = shape(set_id);
        let written = w
            .write_set(set_id, &slots)
            .map_err(err::<W>)
            .and_then(|()| {
                if let Some(table) = &maglev
                    && let Err(e) = w.write_maglev(set_id, table)
                {
                    w.delete_set(set_id, value.slots);
                    return Err(err::<W>(e));
                }
                w.put_service(key, &value).map_err(|e| {
                    w.delete_set(set_id, value.slots);
                    if let Some(t) = &maglev {
                        w.delete_maglev(set_id, u32::try_from(t.len()).unwrap_or(u32::MAX));
                    }
                    err::<W>(e)
                })
            });
        if let Err(e) = written {
            // Nothing of this frontend was applied: give the ids back.
            self.set_pool.release(set_id);
            if !self.service_ids.contains_key(key) {
                self.service_pool.release(service_id);
            }
            return Err(e);
        }
        self.service_ids.insert(*key, service_id);
        if let Some(old) = self.installed.insert(
            *key,
            Installed {
                value,
                slots,
                maglev,
            },
        ) {
            self.retired_sets.push((std::time::Instant::now(), old));
        }
        Ok(true)
    }
}

fn err<W: LbWriter>(e: W::Error) -> (String, bool) {
    (e.to_string(), W::is_full(&e))
}

/// Deletes a set (and Maglev table) no service points at any more.
fn release<W: LbWriter>(w: &mut W, old: &Installed) {
    w.delete_set(old.value.set_id, old.value.slots);
    if let Some(t) = &old.maglev {
        w.delete_maglev(old.value.set_id, u32::try_from(t.len()).unwrap_or(u32::MAX));
    }
}

/// `198.19.0.10:80/tcp`, for messages.
pub fn describe(key: &ServiceKey) -> String {
    let ip: std::net::IpAddr = if key.family == meshless_common::family::IPV4 {
        std::net::IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        std::net::IpAddr::from(key.addr)
    };
    let proto = if key.protocol == meshless_common::lb::PROTO_UDP {
        "udp"
    } else {
        "tcp"
    };
    match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{}/{proto}", key.port),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{}/{proto}", key.port),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshless_common::{Backend, ServiceKey, ServiceValue, SlotKey, family, lb};
    use meshless_lb::{DesiredService, FrontendKind, ServiceRef};

    use super::{LbState, LbWriter};

    /// The maps as plain data, plus a write counter and an optional capacity.
    #[derive(Default)]
    struct Model {
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<SlotKey, u32>,
        maglev: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<u32, Backend>,
        writes: usize,
        slot_capacity: Option<usize>,
    }

    impl LbWriter for Model {
        type Error = String;
        fn is_full(err: &String) -> bool {
            err.contains("full")
        }
        fn put_backend(&mut self, id: u32, b: &Backend) -> Result<(), String> {
            self.writes += 1;
            self.backends.insert(id, *b);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), String> {
            self.writes += 1;
            self.backends.remove(&id);
            Ok(())
        }
        fn write_set(&mut self, set_id: u32, ids: &[u32]) -> Result<(), String> {
            if let Some(cap) = self.slot_capacity
                && self.slots.len() + ids.len() > cap
            {
                return Err("map ml_slots is full".into());
            }
            for (index, id) in (0u32..).zip(ids) {
                self.writes += 1;
                self.slots.insert(SlotKey { set_id, index }, *id);
            }
            Ok(())
        }
        fn delete_set(&mut self, set_id: u32, len: u32) {
            for index in 0..len {
                self.slots.remove(&SlotKey { set_id, index });
            }
        }
        fn write_maglev(&mut self, set_id: u32, t: &[u32]) -> Result<(), String> {
            for (index, id) in (0u32..).zip(t) {
                self.maglev.insert(SlotKey { set_id, index }, *id);
            }
            Ok(())
        }
        fn delete_maglev(&mut self, set_id: u32, len: u32) {
            for index in 0..len {
                self.maglev.remove(&SlotKey { set_id, index });
            }
        }
        fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), String> {
            self.writes += 1;
            self.services.insert(*k, *v);
            Ok(())
        }
        fn remove_service(&mut self, k: &ServiceKey) -> Result<(), String> {
            self.writes += 1;
            self.services.remove(k);
            Ok(())
        }
    }

    impl Model {
        /// The backends a frontend resolves to, slot by slot, as the datapath sees them.
        fn resolve(&self, k: &ServiceKey) -> Vec<Backend> {
            let v = self.services[k];
            (0..v.slots)
                .map(|index| {
                    self.backends[&self.slots[&SlotKey {
                        set_id: v.set_id,
                        index,
                    }]]
                })
                .collect()
        }
    }

    fn key(last: u8) -> ServiceKey {
        ServiceKey {
            addr: [198, 19, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 80,
            protocol: lb::PROTO_TCP,
            family: family::IPV4,
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            addr: [198, 18, 18, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 8080,
            family: family::IPV4,
            _pad: 0,
        }
    }

    fn desired(backends: &[u8]) -> DesiredService {
        DesiredService {
            service: ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: String::new(),
            },
            kind: FrontendKind::ClusterIp,
            backends: backends.iter().map(|b| backend(*b)).collect(),
            slots: (0..u32::try_from(backends.len()).expect("small")).collect(),
            maglev: None,
            flags: 0,
            maglev_size: 0,
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn unchanged_input_writes_nothing() {
        let mut m = Model::default();
        let mut s = LbState::default();
        let want = BTreeMap::from([(key(1), desired(&[10, 11])), (key(2), desired(&[11]))]);
        let r = s.apply(&mut m, &want);
        assert_eq!((r.services_written, r.backends_written), (2, 2), "{r:?}");
        let writes = m.writes;
        let r = s.apply(&mut m, &want);
        assert_eq!((r.services_written, r.services_unchanged), (0, 2));
        assert_eq!(m.writes, writes, "no map churn when nothing changed");
    }

    #[test]
    fn replacing_backends_switches_sets_and_retires_the_old_one() {
        let mut m = Model::default();
        let mut s = LbState::default();
        s.apply(&mut m, &BTreeMap::from([(key(1), desired(&[10, 11]))]));
        let old_set = m.services[&key(1)].set_id;
        s.apply(&mut m, &BTreeMap::from([(key(1), desired(&[12]))]));
        let v = m.services[&key(1)];
        assert_ne!(v.set_id, old_set, "a fresh set, switched in one update");
        assert_eq!(m.resolve(&key(1)), vec![backend(12)]);
        assert!(s.has_retired(), "old set kept for in-flight lookups");
        assert!(m.slots.contains_key(&SlotKey {
            set_id: old_set,
            index: 1
        }));
        std::thread::sleep(super::GRACE);
        s.flush_retired(&mut m);
        assert!(
            !m.slots.keys().any(|k| k.set_id == old_set),
            "old set deleted after the grace period"
        );
        assert_eq!(m.backends.len(), 1, "unused backends deleted");
    }

    #[test]
    fn a_full_map_keeps_the_previous_state_and_names_the_service() {
        let mut m = Model {
            slot_capacity: Some(3),
            ..Model::default()
        };
        let mut s = LbState::default();
        s.apply(&mut m, &BTreeMap::from([(key(1), desired(&[10, 11]))]));
        let r = s.apply(&mut m, &BTreeMap::from([(key(1), desired(&[10, 11, 12]))]));
        assert_eq!((r.errors.len(), r.map_full), (1, 1), "{r:?}");
        assert!(
            r.errors[0].contains("default/web") && r.errors[0].contains("198.19.0.1:80/tcp"),
            "{:?}",
            r.errors
        );
        assert_eq!(
            m.resolve(&key(1)),
            vec![backend(10), backend(11)],
            "old backends still served"
        );
    }

    #[test]
    fn removed_services_disappear() {
        let mut m = Model::default();
        let mut s = LbState::default();
        s.apply(
            &mut m,
            &BTreeMap::from([(key(1), desired(&[10])), (key(2), desired(&[11]))]),
        );
        let r = s.apply(&mut m, &BTreeMap::from([(key(2), desired(&[11]))]));
        assert_eq!(r.services_removed, 1);
        assert!(!m.services.contains_key(&key(1)));
        assert_eq!(m.resolve(&key(2)), vec![backend(11)]);
    }
}
