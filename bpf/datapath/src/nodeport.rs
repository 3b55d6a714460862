//! North-south service traffic (NodePort, LoadBalancer, externalIPs) on the
//! node's external device: per-packet translation with BPF connection
//! tracking. A backend on another node gets SNAT to this node's address (so
//! its replies come back here) or, with DSR, the packet keeps the client's
//! address and carries the service address in an IPv4 option; a backend on
//! this node keeps the client's address. Replies are translated back to the
//! service address and sent out of the external device with
//! `bpf_redirect_neigh`.
//!
//! IPv4 and IPv6, TCP and UDP. IPv4 fragments and options, and IPv6
//! extension headers, pass untouched. DSR is IPv4 only (IPv6 falls back to
//! SNAT).

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use meshless_common::{
    Backend, CtKey4, CtKey6, CtValue4, CtValue6, NodeConfig, ServiceKey, capacity, ct, family, lb,
    stat,
};

use crate::bump;
use crate::lb::{BACKENDS, SERVICES, maglev_pick, random_pick};

#[map(name = "ml_ct4")]
static CT4: LruHashMap<CtKey4, CtValue4> = LruHashMap::pinned(capacity::CT4, 0);

#[map(name = "ml_ct6")]
static CT6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(capacity::CT6, 0);

#[map(name = "ml_node_cfg")]
static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// SNAT source ports: the Linux default ephemeral range.
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 60_999 - 32_768;
const SNAT_TRIES: u32 = 8;

/// A flow in one direction, family-neutral (ports in network byte order).
#[derive(Clone, Copy)]
struct Tuple<A> {
    saddr: A,
    daddr: A,
    sport: u16,
    dport: u16,
    protocol: u8,
    flags: u32,
}

/// What differs between IPv4 and IPv6 on this path.
trait Af {
    type Addr: Copy + PartialEq;
    type Key: Copy + 'static;
    type Val: Copy + 'static;
    const FAMILY: u8;
    const ETH_P: u16;
    const SRC: usize;
    const DST: usize;
    const L4: usize;
    /// The L4 protocol if this is a plain (no options / extension headers,
    /// unfragmented) TCP or UDP packet of this family.
    fn l4_protocol(ctx: &TcContext) -> Option<u8>;
    fn key(t: &Tuple<Self::Addr>) -> Self::Key;
    fn val(t: &Tuple<Self::Addr>) -> Self::Val;
    fn unval(v: &Self::Val) -> Tuple<Self::Addr>;
    fn ct_get(k: &Self::Key) -> Option<Self::Val>;
    fn ct_insert(k: &Self::Key, v: &Self::Val) -> bool;
    /// Updates the checksums for an address change (the L3 one too for IPv4).
    fn addr_csum(
        ctx: &TcContext,
        csum_off: usize,
        l4: bool,
        flags: u64,
        old: &Self::Addr,
        new: &Self::Addr,
    ) -> Result<(), i64>;
    fn node_ip(cfg: &NodeConfig) -> Self::Addr;
    fn local(cfg: &NodeConfig, a: &Self::Addr) -> bool;
    fn service_key(t: &Tuple<Self::Addr>) -> ServiceKey;
    fn backend(b: &Backend) -> Self::Addr;
    fn hash(t: &Tuple<Self::Addr>) -> u64;
    /// DSR: forward a new request with the service address attached.
    fn dsr_forward(
        ctx: &TcContext,
        flow: &Tuple<Self::Addr>,
        to: &Tuple<Self::Addr>,
    ) -> Option<i32>;
}

struct V4;
struct V6;

#[inline(always)]
fn in_cidr<const N: usize>(addr: &[u8; N], cidr: &[u8; N], prefix: u8) -> bool {
    if prefix == 0 || usize::from(prefix) > N * 8 {
        return false;
    }
    let full = usize::from(prefix) / 8;
    let rest = prefix % 8;
    let mut i = 0;
    while i < N {
        if i < full {
            if addr[i] != cidr[i] {
                return false;
            }
        } else if i == full && rest != 0 {
            let mask = 0xffu8 << (8 - rest);
            if addr[i] & mask != cidr[i] & mask {
                return false;
            }
        }
        i += 1;
    }
    true
}

impl Af for V4 {
    type Addr = [u8; 4];
    type Key = CtKey4;
    type Val = CtValue4;
    const FAMILY: u8 = family::IPV4;
    const ETH_P: u16 = ETH_P_IP;
    const SRC: usize = ETH_HLEN + 12;
    const DST: usize = ETH_HLEN + 16;
    const L4: usize = ETH_HLEN + 20;

    #[inline(always)]
    fn l4_protocol(ctx: &TcContext) -> Option<u8> {
        // Version 4, no options (IHL 5); options are rare here, leave them.
        if ctx.load::<u8>(ETH_HLEN).ok()? != 0x45 {
            return None;
        }
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if frag & 0x3fff != 0 {
            return None;
        }
        ctx.load::<u8>(ETH_HLEN + 9).ok()
    }
    #[inline(always)]
    fn key(t: &Tuple<[u8; 4]>) -> CtKey4 {
        CtKey4 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            protocol: t.protocol,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn val(t: &Tuple<[u8; 4]>) -> CtValue4 {
        CtValue4 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            flags: t.flags,
        }
    }
    #[inline(always)]
    fn unval(v: &CtValue4) -> Tuple<[u8; 4]> {
        Tuple {
            saddr: v.saddr,
            daddr: v.daddr,
            sport: v.sport,
            dport: v.dport,
            protocol: 0,
            flags: v.flags,
        }
    }
    #[inline(always)]
    fn ct_get(k: &CtKey4) -> Option<CtValue4> {
        // SAFETY: lookup result copied out immediately.
        unsafe { CT4.get(k) }.copied()
    }
    #[inline(always)]
    fn ct_insert(k: &CtKey4, v: &CtValue4) -> bool {
        CT4.insert(k, v, 0).is_ok()
    }
    #[inline(always)]
    fn addr_csum(
        ctx: &TcContext,
        csum_off: usize,
        l4: bool,
        flags: u64,
        old: &[u8; 4],
        new: &[u8; 4],
    ) -> Result<(), i64> {
        let (o, n) = (
            u64::from(u32::from_ne_bytes(*old)),
            u64::from(u32::from_ne_bytes(*new)),
        );
        if l4 {
            ctx.l4_csum_replace(csum_off, o, n, u64::from(BPF_F_PSEUDO_HDR) | flags | 4)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4)
    }
    #[inline(always)]
    fn node_ip(cfg: &NodeConfig) -> [u8; 4] {
        cfg.node_ip4
    }
    #[inline(always)]
    fn local(cfg: &NodeConfig, a: &[u8; 4]) -> bool {
        in_cidr(a, &cfg.pod_cidr4, cfg.pod_prefix4)
    }
    #[inline(always)]
    fn service_key(t: &Tuple<[u8; 4]>) -> ServiceKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&t.daddr);
        ServiceKey {
            addr,
            port: u16::from_be(t.dport),
            protocol: t.protocol,
            family: family::IPV4,
        }
    }
    #[inline(always)]
    fn backend(b: &Backend) -> [u8; 4] {
        [b.addr[0], b.addr[1], b.addr[2], b.addr[3]]
    }
    #[inline(always)]
    fn hash(t: &Tuple<[u8; 4]>) -> u64 {
        let a =
            (u64::from(u32::from_ne_bytes(t.saddr)) << 32) | u64::from(u32::from_ne_bytes(t.daddr));
        let b = (u64::from(t.sport) << 24) | (u64::from(t.dport) << 8) | u64::from(t.protocol);
        crate::lb::mix(a ^ crate::lb::mix(b))
    }
    #[inline(always)]
    fn dsr_forward(ctx: &TcContext, flow: &Tuple<[u8; 4]>, to: &Tuple<[u8; 4]>) -> Option<i32> {
        let cfg = config()?;
        if !Self::ct_insert(&Self::key(flow), &Self::val(to)) {
            bump(stat::NP_CT_FAIL);
            return Some(TC_ACT_SHOT);
        }
        if rewrite::<Self>(ctx, flow, to).is_err()
            || add_dsr_option(ctx, flow.daddr, flow.dport).is_err()
        {
            return Some(TC_ACT_SHOT);
        }
        bump(stat::NP_DSR_OUT);
        Some(emit(Some(cfg.ext_ifindex)))
    }
}

impl Af for V6 {
    type Addr = [u8; 16];
    type Key = CtKey6;
    type Val = CtValue6;
    const FAMILY: u8 = family::IPV6;
    const ETH_P: u16 = ETH_P_IPV6;
    const SRC: usize = ETH_HLEN + 8;
    const DST: usize = ETH_HLEN + 24;
    const L4: usize = ETH_HLEN + 40;

    #[inline(always)]
    fn l4_protocol(ctx: &TcContext) -> Option<u8> {
        if ctx.load::<u8>(ETH_HLEN).ok()? >> 4 != 6 {
            return None;
        }
        // The next header directly: extension headers are left to the stack.
        ctx.load::<u8>(ETH_HLEN + 6).ok()
    }
    #[inline(always)]
    fn key(t: &Tuple<[u8; 16]>) -> CtKey6 {
        CtKey6 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            protocol: t.protocol,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn val(t: &Tuple<[u8; 16]>) -> CtValue6 {
        CtValue6 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            flags: t.flags,
        }
    }
    #[inline(always)]
    fn unval(v: &CtValue6) -> Tuple<[u8; 16]> {
        Tuple {
            saddr: v.saddr,
            daddr: v.daddr,
            sport: v.sport,
            dport: v.dport,
            protocol: 0,
            flags: v.flags,
        }
    }
    #[inline(always)]
    fn ct_get(k: &CtKey6) -> Option<CtValue6> {
        // SAFETY: lookup result copied out immediately.
        unsafe { CT6.get(k) }.copied()
    }
    #[inline(always)]
    fn ct_insert(k: &CtKey6, v: &CtValue6) -> bool {
        CT6.insert(k, v, 0).is_ok()
    }
    #[inline(always)]
    fn addr_csum(
        ctx: &TcContext,
        csum_off: usize,
        l4: bool,
        flags: u64,
        old: &[u8; 16],
        new: &[u8; 16],
    ) -> Result<(), i64> {
        if !l4 {
            return Ok(());
        }
        let (mut o, mut n) = (*old, *new);
        // SAFETY: both buffers are 16-byte stack arrays, as the sizes say.
        let diff =
            unsafe { bpf_csum_diff(o.as_mut_ptr().cast(), 16, n.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.l4_csum_replace(
            csum_off,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | flags,
        )
    }
    #[inline(always)]
    fn node_ip(cfg: &NodeConfig) -> [u8; 16] {
        cfg.node_ip6
    }
    #[inline(always)]
    fn local(cfg: &NodeConfig, a: &[u8; 16]) -> bool {
        in_cidr(a, &cfg.pod_cidr6, cfg.pod_prefix6)
    }
    #[inline(always)]
    fn service_key(t: &Tuple<[u8; 16]>) -> ServiceKey {
        ServiceKey {
            addr: t.daddr,
            port: u16::from_be(t.dport),
            protocol: t.protocol,
            family: family::IPV6,
        }
    }
    #[inline(always)]
    fn backend(b: &Backend) -> [u8; 16] {
        b.addr
    }
    #[inline(always)]
    fn hash(t: &Tuple<[u8; 16]>) -> u64 {
        let mut h = (u64::from(t.sport) << 24) | (u64::from(t.dport) << 8) | u64::from(t.protocol);
        let mut i = 0;
        while i < 16 {
            let s = u64::from(u32::from_ne_bytes([
                t.saddr[i],
                t.saddr[i + 1],
                t.saddr[i + 2],
                t.saddr[i + 3],
            ]));
            let d = u64::from(u32::from_ne_bytes([
                t.daddr[i],
                t.daddr[i + 1],
                t.daddr[i + 2],
                t.daddr[i + 3],
            ]));
            h = crate::lb::mix(h ^ (s << 32 | d));
            i += 4;
        }
        h
    }
    #[inline(always)]
    fn dsr_forward(
        _ctx: &TcContext,
        _flow: &Tuple<[u8; 16]>,
        _to: &Tuple<[u8; 16]>,
    ) -> Option<i32> {
        None
    }
}

#[inline(always)]
fn parse<A: Af>(ctx: &TcContext) -> Option<Tuple<A::Addr>> {
    if u16::from_be(ctx.load::<u16>(12).ok()?) != A::ETH_P {
        return None;
    }
    let protocol = A::l4_protocol(ctx)?;
    if protocol != lb::PROTO_TCP && protocol != lb::PROTO_UDP {
        return None;
    }
    Some(Tuple {
        saddr: ctx.load::<A::Addr>(A::SRC).ok()?,
        daddr: ctx.load::<A::Addr>(A::DST).ok()?,
        sport: ctx.load::<u16>(A::L4).ok()?,
        dport: ctx.load::<u16>(A::L4 + 2).ok()?,
        protocol,
        flags: 0,
    })
}

/// Rewrites addresses and ports, fixing the checksums.
#[inline(always)]
fn rewrite<A: Af>(ctx: &TcContext, k: &Tuple<A::Addr>, to: &Tuple<A::Addr>) -> Result<(), i64> {
    let tcp = k.protocol == lb::PROTO_TCP;
    let csum_off = if tcp { A::L4 + 16 } else { A::L4 + 6 };
    // An IPv4 UDP checksum of 0 means "none": leave it so.
    let l4 = tcp || ctx.load::<u16>(csum_off)? != 0;
    let mangled = if tcp {
        0
    } else {
        u64::from(BPF_F_MARK_MANGLED_0)
    };
    if k.saddr != to.saddr {
        A::addr_csum(ctx, csum_off, l4, mangled, &k.saddr, &to.saddr)?;
        ctx.store(A::SRC, &to.saddr, 0)?;
    }
    if k.daddr != to.daddr {
        A::addr_csum(ctx, csum_off, l4, mangled, &k.daddr, &to.daddr)?;
        ctx.store(A::DST, &to.daddr, 0)?;
    }
    for (off, old, new) in [(A::L4, k.sport, to.sport), (A::L4 + 2, k.dport, to.dport)] {
        if old == new {
            continue;
        }
        if l4 {
            ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), mangled | 2)?;
        }
        ctx.store(off, &new, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn config() -> Option<NodeConfig> {
    NODE_CONFIG.get(0).copied()
}

/// Sends a translated packet out of the external device (or lets the stack
/// deliver it when it is for a local pod).
#[inline(always)]
fn emit(out: Option<u32>) -> i32 {
    match out {
        // SAFETY: helper call; NULL params make the kernel resolve the next hop.
        Some(ifindex) => unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 },
        None => TC_ACT_OK,
    }
}

/// Applies a tracked flow's translation, if the packet belongs to one.
#[inline(always)]
fn tracked<A: Af>(
    ctx: &TcContext,
    flow: &Tuple<A::Addr>,
    cfg: &NodeConfig,
    from_pod: bool,
) -> Option<i32> {
    let to = A::unval(&A::ct_get(&A::key(flow))?);
    if rewrite::<A>(ctx, flow, &to).is_err() {
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_TRACKED);
    if to.flags & ct::DSR != 0 {
        // The backend's node needs the service address to answer as it.
        let d = A::service_key(flow);
        let svc = [d.addr[0], d.addr[1], d.addr[2], d.addr[3]];
        if add_dsr_option(ctx, svc, flow.dport).is_err() {
            return Some(TC_ACT_SHOT);
        }
        bump(stat::NP_DSR_OUT);
        return Some(emit(Some(cfg.ext_ifindex)));
    }
    // Replies always leave through the external device; requests do unless
    // they are for a local pod (then the stack routes them to its device).
    let local = A::local(cfg, &to.daddr);
    let out = if to.flags & ct::REPLY != 0 || (!local && !from_pod) {
        Some(cfg.ext_ifindex)
    } else {
        None
    };
    Some(emit(out))
}

/// The IPv4 header checksum of `hdr` (its checksum field must be zero).
#[inline(always)]
fn ip_checksum<const N: usize>(hdr: &[u8; N]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Inserts the DSR option (service address and port) after the IPv4 header.
#[inline(always)]
fn add_dsr_option(ctx: &TcContext, svc_addr: [u8; 4], svc_port: u16) -> Result<(), i64> {
    let base = ctx.load::<[u8; 20]>(ETH_HLEN)?;
    ctx.adjust_room(i32::from(ct::DSR_OPT_LEN), BPF_ADJ_ROOM_NET, 0)?;
    let mut hdr = [0u8; 28];
    hdr[..20].copy_from_slice(&base);
    hdr[0] = 0x47;
    let tot = u16::from_be_bytes([base[2], base[3]]).wrapping_add(u16::from(ct::DSR_OPT_LEN));
    hdr[2..4].copy_from_slice(&tot.to_be_bytes());
    hdr[10] = 0;
    hdr[11] = 0;
    hdr[20] = ct::DSR_OPT_TYPE;
    hdr[21] = ct::DSR_OPT_LEN;
    hdr[22..24].copy_from_slice(&svc_port.to_ne_bytes());
    hdr[24..28].copy_from_slice(&svc_addr);
    let csum = ip_checksum(&hdr);
    hdr[10..12].copy_from_slice(&csum);
    ctx.store(ETH_HLEN, &hdr, 0)
}

/// A request that another node forwarded with the DSR option: remember to
/// answer as the service, remove the option, let the stack deliver it.
#[inline(always)]
fn dsr_receive(ctx: &TcContext) -> Option<i32> {
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP || ctx.load::<u8>(ETH_HLEN).ok()? != 0x47
    {
        return None;
    }
    let opt = ctx.load::<[u8; 8]>(ETH_HLEN + 20).ok()?;
    if opt[0] != ct::DSR_OPT_TYPE || opt[1] != ct::DSR_OPT_LEN {
        return None;
    }
    let base = ctx.load::<[u8; 20]>(ETH_HLEN).ok()?;
    if ctx
        .adjust_room(-i32::from(ct::DSR_OPT_LEN), BPF_ADJ_ROOM_NET, 0)
        .is_err()
    {
        return Some(TC_ACT_SHOT);
    }
    let mut hdr = base;
    hdr[0] = 0x45;
    let tot = u16::from_be_bytes([base[2], base[3]]).wrapping_sub(u16::from(ct::DSR_OPT_LEN));
    hdr[2..4].copy_from_slice(&tot.to_be_bytes());
    hdr[10] = 0;
    hdr[11] = 0;
    let csum = ip_checksum(&hdr);
    hdr[10..12].copy_from_slice(&csum);
    if ctx.store(ETH_HLEN, &hdr, 0).is_err() {
        return Some(TC_ACT_SHOT);
    }
    let k = parse::<V4>(ctx)?;
    let reply_key = Tuple {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        protocol: k.protocol,
        flags: 0,
    };
    let reply = Tuple {
        saddr: [opt[4], opt[5], opt[6], opt[7]],
        daddr: k.saddr,
        sport: u16::from_ne_bytes([opt[2], opt[3]]),
        dport: k.sport,
        protocol: k.protocol,
        flags: ct::REPLY,
    };
    if !V4::ct_insert(&V4::key(&reply_key), &V4::val(&reply)) {
        bump(stat::NP_CT_FAIL);
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_DSR_IN);
    Some(TC_ACT_OK)
}

/// Packets arriving on the node's external device.
#[classifier]
pub fn nodeport_ingress(ctx: TcContext) -> i32 {
    if let Some(verdict) = dsr_receive(&ctx) {
        return verdict;
    }
    try_nodeport::<V4>(&ctx)
        .or_else(|| try_nodeport::<V6>(&ctx))
        .unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn try_nodeport<A: Af>(ctx: &TcContext) -> Option<i32> {
    let flow = parse::<A>(ctx)?;
    let cfg = config()?;
    if let Some(verdict) = tracked::<A>(ctx, &flow, &cfg, false) {
        return Some(verdict);
    }
    // SAFETY: lookup result copied out immediately.
    let svc = unsafe { SERVICES.get(A::service_key(&flow)) }.copied()?;
    if svc.slots == 0 {
        bump(stat::NP_NO_BACKEND);
        return Some(TC_ACT_SHOT);
    }
    let id = if svc.flags & lb::FLAG_MAGLEV != 0 && svc.maglev_size != 0 {
        // The same flow maps to the same backend on every node.
        maglev_pick(&svc, A::hash(&flow))
    } else {
        random_pick(&svc)
    };
    let Some(id) = id else {
        bump(stat::LB_MISSING_ENTRY);
        return Some(TC_ACT_SHOT);
    };
    // SAFETY: lookup result copied out immediately.
    let Some(b) = (unsafe { BACKENDS.get(id) }).copied() else {
        bump(stat::LB_MISSING_ENTRY);
        return Some(TC_ACT_SHOT);
    };
    if b.family != A::FAMILY {
        bump(stat::LB_MISSING_ENTRY);
        return Some(TC_ACT_SHOT);
    }
    let baddr = A::backend(&b);
    let bport = b.port.to_be();
    let local = A::local(&cfg, &baddr);
    if !local && cfg.nat_mode == ct::MODE_DSR {
        // Direct server return: the client's address stays, the backend's
        // node answers the client itself; nothing comes back here.
        let to = Tuple {
            daddr: baddr,
            dport: bport,
            flags: ct::DSR,
            ..flow
        };
        if let Some(verdict) = A::dsr_forward(ctx, &flow, &to) {
            bump(stat::NP_NEW);
            return Some(verdict);
        }
        // No DSR for this family: SNAT below.
    }
    let (src, sport) = if local {
        (flow.saddr, flow.sport)
    } else {
        let node = A::node_ip(&cfg);
        let Some(p) = snat_port::<A>(&flow, baddr, bport, node) else {
            bump(stat::NP_CT_FAIL);
            return Some(TC_ACT_SHOT);
        };
        (node, p)
    };
    let forward = Tuple {
        saddr: src,
        daddr: baddr,
        sport,
        dport: bport,
        protocol: flow.protocol,
        flags: 0,
    };
    let reply_key = Tuple {
        saddr: baddr,
        daddr: src,
        sport: bport,
        dport: sport,
        protocol: flow.protocol,
        flags: 0,
    };
    let reply = Tuple {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        protocol: flow.protocol,
        flags: ct::REPLY,
    };
    if !A::ct_insert(&A::key(&reply_key), &A::val(&reply))
        || !A::ct_insert(&A::key(&flow), &A::val(&forward))
    {
        bump(stat::NP_CT_FAIL);
        return Some(TC_ACT_SHOT);
    }
    if rewrite::<A>(ctx, &flow, &forward).is_err() {
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_NEW);
    Some(emit(if local { None } else { Some(cfg.ext_ifindex) }))
}

/// A free SNAT source port for (node -> backend), or None after a few tries.
#[inline(always)]
fn snat_port<A: Af>(
    flow: &Tuple<A::Addr>,
    backend: A::Addr,
    bport: u16,
    node: A::Addr,
) -> Option<u16> {
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper call.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((SNAT_PORT_MIN + r % SNAT_PORT_SPAN) as u16).to_be();
        let probe = Tuple {
            saddr: backend,
            daddr: node,
            sport: bport,
            dport: port,
            protocol: flow.protocol,
            flags: 0,
        };
        if A::ct_get(&A::key(&probe)).is_none() {
            return Some(port);
        }
    }
    None
}

/// Replies from local backends enter the node on the pod's device.
#[inline(always)]
pub(crate) fn from_pod(ctx: &TcContext) -> Option<i32> {
    let cfg = config()?;
    if let Some(flow) = parse::<V4>(ctx) {
        return tracked::<V4>(ctx, &flow, &cfg, true);
    }
    let flow = parse::<V6>(ctx)?;
    tracked::<V6>(ctx, &flow, &cfg, true)
}
