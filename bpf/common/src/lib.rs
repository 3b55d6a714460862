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
    /// Service frontends: [`super::ServiceKey`] -> [`super::ServiceValue`].
    pub const SERVICES: &str = "ml_services";
    /// Backend sets: [`super::SlotKey`] (set, slot) -> backend id (`u32`).
    pub const BACKEND_SLOTS: &str = "ml_slots";
    /// Maglev lookup tables: [`super::SlotKey`] (set, index) -> backend id (`u32`).
    pub const MAGLEV: &str = "ml_maglev";
    /// Backends: backend id (`u32`) -> [`super::Backend`].
    pub const BACKENDS: &str = "ml_backends";
    /// Session affinity (LRU): [`super::AffinityKey`] -> [`super::AffinityValue`].
    pub const AFFINITY: &str = "ml_affinity";
    /// Socket reverse translation (LRU): [`super::RevNatKey`] -> [`super::RevNatValue`].
    pub const REV_NAT: &str = "ml_sock_revnat";
    /// North-south IPv4 connection tracking (LRU): [`super::CtKey4`] -> [`super::CtValue4`].
    pub const CT4: &str = "ml_ct4";
    /// North-south IPv6 connection tracking (LRU): [`super::CtKey6`] -> [`super::CtValue6`].
    pub const CT6: &str = "ml_ct6";
    /// This node's addresses for the datapath: one [`super::NodeConfig`] at index 0.
    pub const NODE_CONFIG: &str = "ml_node_cfg";
}

/// Default capacities. Userspace may override them at load time.
pub mod capacity {
    /// Distinct (device, direction, family, protocol, source, destination) tuples counted.
    pub const PACKET_COUNTERS: u32 = 65_536;
    /// Service frontends (VIP, port, protocol). kube-proxy-scale clusters
    /// reach tens of thousands; the benchmark installs 50,000.
    pub const SERVICES: u32 = 131_072;
    /// Backend slots over all sets; two sets per service may coexist while
    /// one replaces the other.
    pub const BACKEND_SLOTS: u32 = 524_288;
    /// Maglev entries over all Maglev services (16,381 per service by default).
    pub const MAGLEV: u32 = 262_144;
    /// Distinct backends (address, port).
    pub const BACKENDS: u32 = 131_072;
    /// Affinity entries (client x service); LRU, so the oldest are evicted.
    pub const AFFINITY: u32 = 65_536;
    /// Sockets whose peer address is reported as the service address; LRU.
    pub const REV_NAT: u32 = 262_144;
    /// North-south flows, two entries each (request and reply direction); LRU.
    pub const CT4: u32 = 262_144;
    /// The same for IPv6.
    pub const CT6: u32 = 131_072;
}

/// Load-balancing constants shared by the compiler (crates/lb) and the datapath.
pub mod lb {
    /// Default Maglev table size M (prime; > 100 x backends keeps shares within ~1%).
    pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;
    /// Most slots one backend set may have (weights are expanded into slots).
    pub const MAX_SLOTS_PER_SET: u32 = 4_096;
    /// [`super::ServiceValue::flags`]: pick backends with the Maglev table.
    pub const FLAG_MAGLEV: u32 = 1 << 0;
    /// [`super::ServiceValue::flags`]: sessionAffinity ClientIP.
    pub const FLAG_AFFINITY: u32 = 1 << 1;
    /// IP protocol numbers used in [`super::ServiceKey::protocol`].
    pub const PROTO_TCP: u8 = 6;
    pub const PROTO_UDP: u8 = 17;
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
    /// Connections (or datagrams) to a service translated to a backend.
    pub const LB_TRANSLATED: u32 = 6;
    /// Connections to a service with no ready backend, refused.
    pub const LB_NO_BACKEND: u32 = 7;
    /// A service pointed at a slot or backend that is missing (a bug or a
    /// race with an update); the connection was refused.
    pub const LB_MISSING_ENTRY: u32 = 8;
    /// Replies whose source was translated back to the service address.
    pub const LB_REV_TRANSLATED: u32 = 9;
    /// Affinity hits: the client went to its remembered backend.
    pub const LB_AFFINITY_HIT: u32 = 10;
    /// The reverse-translation map refused an insert.
    pub const LB_REV_NAT_FULL: u32 = 11;
    /// New north-south flows (NodePort, LoadBalancer, externalIPs) translated.
    pub const NP_NEW: u32 = 12;
    /// Packets of tracked north-south flows translated (both directions).
    pub const NP_TRACKED: u32 = 13;
    /// North-south packets to a service with no backend, dropped.
    pub const NP_NO_BACKEND: u32 = 14;
    /// No free source port for SNAT, or the conntrack map refused the flow; dropped.
    pub const NP_CT_FAIL: u32 = 15;
    /// Requests sent to a remote backend's node with the DSR option.
    pub const NP_DSR_OUT: u32 = 16;
    /// Requests received with the DSR option (this node answers directly).
    pub const NP_DSR_IN: u32 = 17;
    /// Number of slots in the stats array (room to grow without a map resize).
    pub const MAX: u32 = 32;

    /// Human-readable names, indexed like the constants above.
    pub const NAMES: [&str; 18] = [
        "tc_packets",
        "tc_non_ip",
        "tc_truncated",
        "packet_counters_full",
        "connect4",
        "connect6",
        "lb_translated",
        "lb_no_backend",
        "lb_missing_entry",
        "lb_rev_translated",
        "lb_affinity_hit",
        "lb_rev_nat_full",
        "np_new",
        "np_tracked",
        "np_no_backend",
        "np_ct_fail",
        "np_dsr_out",
        "np_dsr_in",
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

/// A service frontend as the socket hooks look it up: the address and port
/// a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// [`lb::PROTO_TCP`] or [`lb::PROTO_UDP`].
    pub protocol: u8,
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// What a frontend translates to. Replacing a service's backends writes a
/// new set under a fresh `set_id` first and then this value in one update,
/// so the datapath never sees an empty or mixed set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Which backend set (and Maglev table) is current.
    pub set_id: u32,
    /// Slots in the set; 0 means no ready backend: connections are refused.
    pub slots: u32,
    /// `lb::FLAG_*`.
    pub flags: u32,
    /// Maglev table size M for this service (0 unless `FLAG_MAGLEV`).
    pub maglev_size: u32,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout_s: u32,
    /// Stable id of the service (for affinity keys), assigned by the agent.
    pub service_id: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 24);

/// Key of the backend-slot and Maglev maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub set_id: u32,
    /// Slot in the set, or index into the Maglev table.
    pub index: u32,
}
const _: () = assert!(size_of::<SlotKey>() == 8);

/// A backend: where a connection to a service really goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 20);

/// Affinity key: one client (its network namespace) and one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Network-namespace cookie of the client socket: one pod, one client IP.
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// bpf_ktime_get_ns() of the last connection that used this entry.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Reverse translation for a socket: replies from the backend are shown to
/// the application as coming from the service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub socket_cookie: u64,
    /// Backend address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<RevNatKey>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// Service address the application asked for.
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<RevNatValue>() == 24);

/// A north-south IPv4 flow as seen in one direction (addresses and ports in
/// network byte order, as in the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey4>() == 16);

/// How packets of one direction of a tracked flow are rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// `ct::REPLY`, `ct::DSR`.
    pub flags: u32,
}
const _: () = assert!(size_of::<CtValue4>() == 16);

/// A north-south IPv6 flow in one direction (ports in network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey6>() == 40);

/// How packets of one direction of a tracked IPv6 flow are rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// `ct::REPLY` (DSR is IPv4 only).
    pub flags: u32,
}
const _: () = assert!(size_of::<CtValue6>() == 40);

/// [`CtValue4::flags`] and north-south modes.
pub mod ct {
    /// The reply direction (backend -> client).
    pub const REPLY: u32 = 1 << 0;
    /// A request forwarded to another node with the service address in an
    /// IPv4 option (direct server return); its replies never come back here.
    pub const DSR: u32 = 1 << 1;
    /// [`super::NodeConfig::nat_mode`]: SNAT to the node address for remote backends.
    pub const MODE_SNAT: u8 = 0;
    /// [`super::NodeConfig::nat_mode`]: direct server return for remote backends.
    pub const MODE_DSR: u8 = 1;
    /// IPv4 option type carrying the service address (copied flag + 26),
    /// 8 bytes: type, length, service port, service address.
    pub const DSR_OPT_TYPE: u8 = 0x9a;
    pub const DSR_OPT_LEN: u8 = 8;
}

/// Node facts the north-south path needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's IPv4 address on its external device: the SNAT source.
    pub node_ip4: [u8; 4],
    /// The node's IPv4 pod CIDR: backends inside it are local (no SNAT).
    pub pod_cidr4: [u8; 4],
    pub pod_prefix4: u8,
    /// `ct::MODE_SNAT` or `ct::MODE_DSR`.
    pub nat_mode: u8,
    pub _pad: [u8; 2],
    /// ifindex of the external device: where translated north-south packets leave.
    pub ext_ifindex: u32,
    /// The node's IPv6 address on its external device (all zero: none).
    pub node_ip6: [u8; 16],
    /// The node's IPv6 pod CIDR.
    pub pod_cidr6: [u8; 16],
    pub pod_prefix6: u8,
    pub _pad6: [u8; 3],
}
const _: () = assert!(size_of::<NodeConfig>() == 52);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], Copy, contain only integers and byte
    // arrays, and have no implicit padding (sizes are asserted above).
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::PacketKey {}
    // SAFETY: see above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::PacketCount {}
    // SAFETY: #[repr(C)], Copy, integers and byte arrays only, sizes asserted.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::RevNatKey {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::RevNatValue {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::CtKey4 {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::CtValue4 {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::CtKey6 {}
    // SAFETY: as above.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::CtValue6 {}
}
