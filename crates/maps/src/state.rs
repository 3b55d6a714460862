//! Read-only handles on the maps the datapath itself writes: session
//! affinity, socket reverse translation and north-south connection
//! tracking. For diagnostics (meshctl, the demo, tests); the agent never
//! writes them.

use std::path::Path;

use aya::maps::{HashMap, MapData};
use meshless_common::{
    AffinityKey, AffinityValue, CtKey4, CtKey6, CtValue4, CtValue6, RevNatKey, RevNatValue, ct,
    map_names,
};

use crate::MapsError;
use crate::counters::open;

fn typed<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, MapsError> {
    HashMap::try_from(open(dir, name)?).map_err(|source| MapsError::Read { name, source })
}

fn count<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    let mut n = 0;
    for item in map.keys() {
        item.map_err(|source| MapsError::Read { name, source })?;
        n += 1;
    }
    Ok(n)
}

/// Entries of the state maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// (client, service) pairs remembered for ClientIP affinity.
    pub affinity: usize,
    /// Sockets whose peer is shown as a service address.
    pub rev_nat: usize,
    /// North-south flow directions tracked, IPv4 and IPv6.
    pub conntrack4: usize,
    pub conntrack6: usize,
    /// Of those, reply directions (each tracked flow has one, except DSR).
    pub conntrack_replies: usize,
}

/// The datapath-owned maps of one node.
pub struct DatapathState {
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    rev_nat: HashMap<MapData, RevNatKey, RevNatValue>,
    ct4: HashMap<MapData, CtKey4, CtValue4>,
    ct6: HashMap<MapData, CtKey6, CtValue6>,
}

impl std::fmt::Debug for DatapathState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathState").finish_non_exhaustive()
    }
}

impl DatapathState {
    /// Opens the pinned maps in a node's pin directory.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            affinity: typed(dir, map_names::AFFINITY)?,
            rev_nat: typed(dir, map_names::REV_NAT)?,
            ct4: typed(dir, map_names::CT4)?,
            ct6: typed(dir, map_names::CT6)?,
        })
    }

    /// How many entries each map holds right now.
    pub fn counts(&self) -> Result<StateCounts, MapsError> {
        let mut replies = 0;
        for item in self.ct4.iter() {
            let (_, v) = item.map_err(|source| MapsError::Read {
                name: map_names::CT4,
                source,
            })?;
            replies += usize::from(v.flags & ct::REPLY != 0);
        }
        for item in self.ct6.iter() {
            let (_, v) = item.map_err(|source| MapsError::Read {
                name: map_names::CT6,
                source,
            })?;
            replies += usize::from(v.flags & ct::REPLY != 0);
        }
        Ok(StateCounts {
            affinity: count(&self.affinity, map_names::AFFINITY)?,
            rev_nat: count(&self.rev_nat, map_names::REV_NAT)?,
            conntrack4: count(&self.ct4, map_names::CT4)?,
            conntrack6: count(&self.ct6, map_names::CT6)?,
            conntrack_replies: replies,
        })
    }

    /// The backend id a client (netns cookie) is pinned to for a service.
    pub fn affinity(&self, client: u64, service_id: u32) -> Result<Option<u32>, MapsError> {
        let key = AffinityKey {
            client,
            service_id,
            _pad: 0,
        };
        match self.affinity.get(&key, 0) {
            Ok(v) => Ok(Some(v.backend_id)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapsError::Read {
                name: map_names::AFFINITY,
                source,
            }),
        }
    }
}
