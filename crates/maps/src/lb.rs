//! Writable handles on the load-balancing maps.
//!
//! The write order is what keeps the datapath consistent: a backend exists
//! before any slot names it, a set is complete before a service points at
//! it, and a service is switched to a new set in one update (so a connect()
//! sees the old set or the new one, never a mix and never an empty one).

use std::path::Path;

use aya::maps::{HashMap, MapData, MapError};
use meshless_common::{Backend, ServiceKey, ServiceValue, SlotKey, map_names};

use crate::MapsError;
use crate::counters::open;

/// The maps crates/lb compiles into.
pub struct LbMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    maglev: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    /// max_entries of each map as the kernel reports it (they are sized at
    /// load time, so the constants in meshless-common are only defaults).
    capacity: Capacity,
}

/// The sizes of the load-balancing maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub slots: u32,
    pub maglev: u32,
    pub backends: u32,
}

impl std::fmt::Debug for LbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbMaps").finish_non_exhaustive()
    }
}

fn typed<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<(HashMap<MapData, K, V>, u32), MapsError> {
    let map = open(dir, name)?;
    let cap = match &map {
        aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => {
            d.info().map_or(0, |i| i.max_entries())
        }
        _ => 0,
    };
    let typed = HashMap::try_from(map).map_err(|source| MapsError::Read { name, source })?;
    Ok((typed, cap))
}

/// A failed update; a full map gets its own variant (and a clear message).
fn write_err(name: &'static str, capacity: u32) -> impl Fn(MapError) -> MapsError {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc_e2big()) => {
            MapsError::Full { name, capacity }
        }
        _ => MapsError::Write { name, source },
    }
}

/// E2BIG: what the kernel returns when a hash map has no free entry.
const fn libc_e2big() -> i32 {
    7
}

impl LbMaps {
    /// Opens the pinned maps in a node's pin directory.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let (services, c_services) = typed(dir, map_names::SERVICES)?;
        let (slots, c_slots) = typed(dir, map_names::BACKEND_SLOTS)?;
        let (maglev, c_maglev) = typed(dir, map_names::MAGLEV)?;
        let (backends, c_backends) = typed(dir, map_names::BACKENDS)?;
        Ok(Self {
            services,
            slots,
            maglev,
            backends,
            capacity: Capacity {
                services: c_services,
                slots: c_slots,
                maglev: c_maglev,
                backends: c_backends,
            },
        })
    }

    /// The maps' sizes.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapsError> {
        self.backends
            .insert(id, *backend, 0)
            .map_err(write_err(map_names::BACKENDS, self.capacity.backends))
    }

    pub fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.backends.remove(&id), map_names::BACKENDS)
    }

    /// Writes a complete backend set. On failure the slots written so far are
    /// removed again, so nothing is left half-written.
    pub fn write_set(&mut self, set_id: u32, backend_ids: &[u32]) -> Result<(), MapsError> {
        write_table(
            &mut self.slots,
            map_names::BACKEND_SLOTS,
            self.capacity.slots,
            set_id,
            backend_ids,
        )
    }

    /// Removes the slots of a set (after no service points at it any more).
    pub fn delete_set(&mut self, set_id: u32, len: u32) {
        delete_table(&mut self.slots, set_id, len);
    }

    /// Writes a complete Maglev table for a set (same all-or-nothing rule).
    pub fn write_maglev(&mut self, set_id: u32, table: &[u32]) -> Result<(), MapsError> {
        write_table(
            &mut self.maglev,
            map_names::MAGLEV,
            self.capacity.maglev,
            set_id,
            table,
        )
    }

    pub fn delete_maglev(&mut self, set_id: u32, len: u32) {
        delete_table(&mut self.maglev, set_id, len);
    }

    /// Points a frontend at its (complete) set: the one atomic switch.
    pub fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.services
            .insert(*key, *value, 0)
            .map_err(write_err(map_names::SERVICES, self.capacity.services))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        ignore_missing(self.services.remove(key), map_names::SERVICES)
    }

    /// Every installed frontend (to adopt what a previous agent left).
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError> {
        collect(self.services.iter(), map_names::SERVICES)
    }

    /// Every backend by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, MapsError> {
        collect(self.backends.iter(), map_names::BACKENDS)
    }

    /// The backend ids of a set, slot by slot.
    pub fn read_set(&self, set_id: u32, len: u32) -> Result<Vec<u32>, MapsError> {
        (0..len)
            .map(|index| {
                self.slots
                    .get(&SlotKey { set_id, index }, 0)
                    .map_err(|source| MapsError::Read {
                        name: map_names::BACKEND_SLOTS,
                        source,
                    })
            })
            .collect()
    }

    /// The backend ids of a Maglev table.
    pub fn read_maglev(&self, set_id: u32, len: u32) -> Result<Vec<u32>, MapsError> {
        (0..len)
            .map(|index| {
                self.maglev
                    .get(&SlotKey { set_id, index }, 0)
                    .map_err(|source| MapsError::Read {
                        name: map_names::MAGLEV,
                        source,
                    })
            })
            .collect()
    }
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    iter.map(|r| r.map_err(|source| MapsError::Read { name, source }))
        .collect()
}

fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), MapsError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(source) => Err(MapsError::Write { name, source }),
    }
}

fn write_table(
    map: &mut HashMap<MapData, SlotKey, u32>,
    name: &'static str,
    capacity: u32,
    set_id: u32,
    ids: &[u32],
) -> Result<(), MapsError> {
    for (index, id) in (0u32..).zip(ids) {
        if let Err(e) = map.insert(SlotKey { set_id, index }, *id, 0) {
            delete_table(map, set_id, index);
            return Err(write_err(name, capacity)(e));
        }
    }
    Ok(())
}

fn delete_table(map: &mut HashMap<MapData, SlotKey, u32>, set_id: u32, len: u32) {
    for index in 0..len {
        let _ignored = map.remove(&SlotKey { set_id, index });
    }
}
