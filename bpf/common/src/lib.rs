//! Types shared by the kernel side (`bpf/datapath`) and userspace (`crates/maps`).
//!
//! Every map key and value here is `#[repr(C)]`, `Copy`, has explicit padding
//! and a size assertion next to it, so the layout the verifier sees is the one
//! userspace writes. `aya::Pod` is implemented only with the `user` feature.
#![no_std]

use core::mem::size_of;

/// Map names as the kernel and bpffs see them (at most 15 bytes: BPF_OBJ_NAME_LEN).
pub mod map_names {
    /// Per-CPU packet/byte counters keyed by [`super::PacketKey`].
    pub const PACKET_COUNTERS: &str = "ml_pkt_count";
    /// Per-CPU datapath statistics indexed by [`super::stat`].
    pub const STATS: &str = "ml_stats";
}

/// Default capacities. Userspace may override them at load time.
pub mod capacity {
    /// Distinct (device, direction, family, protocol, source, destination) tuples counted.
    pub const PACKET_COUNTERS: u32 = 65_536;
}

/// Indices into the per-CPU `ml_stats` array.
pub mod stat {
    /// Packets seen by a TC program on a pod device.
    pub const TC_PACKETS: u32 = 0;
    /// Packets that were neither IPv4 nor IPv6 (ARP, ...); passed, not counted per flow.
    pub const TC_NON_IP: u32 = 1;
    /// Packets too short for the headers they claim; passed, not counted per flow.
    pub const TC_TRUNCATED: u32 = 2;
    /// A counter could not be inserted because `ml_pkt_count` is full.
    pub const PACKET_COUNTERS_FULL: u32 = 3;
    /// connect() calls on IPv4 sockets seen by the cgroup hook.
    pub const CONNECT4: u32 = 4;
    /// connect() calls on IPv6 sockets seen by the cgroup hook.
    pub const CONNECT6: u32 = 5;
    /// Number of slots in the stats array (room to grow without a map resize).
    pub const MAX: u32 = 32;

    /// Human-readable names, indexed like the constants above.
    pub const NAMES: [&str; 6] = [
        "tc_packets",
        "tc_non_ip",
        "tc_truncated",
        "packet_counters_full",
        "connect4",
        "connect6",
    ];
}

/// Which way a packet crossed a pod's host-side device.
pub mod direction {
    /// Sent by the pod (TC ingress on the host-side veth).
    pub const FROM_POD: u8 = 0;
    /// Delivered to the pod (TC egress on the host-side veth).
    pub const TO_POD: u8 = 1;
}

/// Address family values used in keys (not AF_* numbers: stable across ABIs).
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// Key of the packet counter map: one entry per device, direction and IP flow
/// pair (no ports: this counts host-to-host traffic, not connections).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketKey {
    /// Interface index of the pod's host-side device.
    pub ifindex: u32,
    /// [`direction::FROM_POD`] or [`direction::TO_POD`].
    pub direction: u8,
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    pub _pad: u8,
    /// Source address; IPv4 uses the first 4 bytes, the rest are zero.
    pub saddr: [u8; 16],
    /// Destination address; IPv4 uses the first 4 bytes, the rest are zero.
    pub daddr: [u8; 16],
}
const _: () = assert!(size_of::<PacketKey>() == 40);

/// Value of the packet counter map (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    pub packets: u64,
    /// Bytes counted from the start of the L2 header (skb->len).
    pub bytes: u64,
}
const _: () = assert!(size_of::<PacketCount>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], Copy, contain only integers and byte
    // arrays, and have no implicit padding (sizes are asserted above).
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::PacketKey {}
    // SAFETY: see above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::PacketCount {}
}
