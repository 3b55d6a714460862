//! Typed handles for every map the datapath pins under
//! `/sys/fs/bpf/meshless/<node>/`.
//!
//! Opening a handle by pin path is how the agent adopts the state a previous
//! agent left behind and how tools (meshctl, tests, the demo) read what the
//! datapath saw without owning it.
#![forbid(unsafe_code)]

mod counters;
mod error;
mod lb;
mod pin;
mod state;

pub use counters::{FlowCount, PacketCounters, Stats};
pub use error::MapsError;
pub use lb::{Capacity, LbMaps};
pub use pin::{BPFFS_ROOT, is_bpffs, node_pin_dir};
pub use state::{DatapathState, StateCounts};
