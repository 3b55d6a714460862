use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use meshless_common::{PacketCount, PacketKey, family, map_names, stat};

use crate::MapsError;

pub(crate) fn open(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path: PathBuf = dir.join(name);
    if !path.exists() {
        return Err(MapsError::NotPinned { path });
    }
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Open { path, source })
}

/// One row of `ml_pkt_count`, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowCount {
    pub ifindex: u32,
    pub direction: u8,
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub packets: u64,
    pub bytes: u64,
}

fn addr(fam: u8, raw: [u8; 16]) -> IpAddr {
    if fam == family::IPV4 {
        IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
    } else {
        IpAddr::from(raw)
    }
}

/// Read-only view of the per-CPU packet counters.
pub struct PacketCounters {
    map: PerCpuHashMap<MapData, PacketKey, PacketCount>,
}

impl std::fmt::Debug for PacketCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketCounters").finish_non_exhaustive()
    }
}

impl PacketCounters {
    /// Opens `<dir>/ml_pkt_count`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let map = open(dir, map_names::PACKET_COUNTERS)?;
        let map = PerCpuHashMap::try_from(map).map_err(|source| MapsError::Read {
            name: map_names::PACKET_COUNTERS,
            source,
        })?;
        Ok(Self { map })
    }

    /// Every counter, summed over CPUs, sorted by key.
    pub fn read(&self) -> Result<Vec<FlowCount>, MapsError> {
        let mut rows = Vec::new();
        for item in self.map.iter() {
            let (key, per_cpu) = item.map_err(|source| MapsError::Read {
                name: map_names::PACKET_COUNTERS,
                source,
            })?;
            let (packets, bytes) = per_cpu
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
            rows.push((key, packets, bytes));
        }
        rows.sort_by_key(|(key, _, _)| *key);
        Ok(rows
            .into_iter()
            .map(|(key, packets, bytes)| FlowCount {
                ifindex: key.ifindex,
                direction: key.direction,
                protocol: key.protocol,
                src: addr(key.family, key.saddr),
                dst: addr(key.family, key.daddr),
                packets,
                bytes,
            })
            .collect())
    }
}

/// Read-only view of the per-CPU datapath statistics.
pub struct Stats {
    map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// Opens `<dir>/ml_stats`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let map = open(dir, map_names::STATS)?;
        let map = PerCpuArray::try_from(map).map_err(|source| MapsError::Read {
            name: map_names::STATS,
            source,
        })?;
        Ok(Self { map })
    }

    /// The value of one stat (a `meshless_common::stat` index), summed over CPUs.
    pub fn get(&self, index: u32) -> Result<u64, MapsError> {
        let values = self.map.get(&index, 0).map_err(|source| MapsError::Read {
            name: map_names::STATS,
            source,
        })?;
        Ok(values.iter().sum())
    }

    /// Every named stat with its value.
    pub fn all(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        stat::NAMES
            .iter()
            .zip(0u32..)
            .map(|(name, index)| Ok((*name, self.get(index)?)))
            .collect()
    }
}
