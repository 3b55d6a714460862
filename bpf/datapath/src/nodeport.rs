//! North-south service traffic (NodePort, LoadBalancer, externalIPs) on the
//! node's external device: per-packet translation with BPF connection
//! tracking. A backend on another node gets SNAT to this node's address (so
//! its replies come back here); a backend on this node keeps the client's
//! address. Replies are translated back to the service address and sent
//! out of the external device with `bpf_redirect_neigh`.
//!
//! IPv4, TCP and UDP; fragments and IP options pass untouched.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    helpers::{bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use meshless_common::{
    CtKey4, CtValue4, NodeConfig, ServiceKey, SlotKey, capacity, ct, family, lb, stat,
};

use crate::bump;
use crate::lb::{BACKENDS, MAGLEV, SERVICES, SLOTS};

#[map(name = "ml_ct4")]
static CT4: LruHashMap<CtKey4, CtValue4> = LruHashMap::pinned(capacity::CT4, 0);

#[map(name = "ml_node_cfg")]
static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
/// SNAT source ports: the Linux default ephemeral range.
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 60_999 - 32_768;
const SNAT_TRIES: u32 = 8;

/// A parsed IPv4 TCP/UDP packet.
struct Flow {
    l4: usize,
    key: CtKey4,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Flow> {
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP {
        return None;
    }
    let vihl = ctx.load::<u8>(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    // IP options are rare on this path; leave them to the stack.
    if vihl >> 4 != 4 || ihl != 20 {
        return None;
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if frag & 0x3fff != 0 {
        return None;
    }
    let protocol = ctx.load::<u8>(ETH_HLEN + 9).ok()?;
    if protocol != lb::PROTO_TCP && protocol != lb::PROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + 20;
    Some(Flow {
        l4,
        key: CtKey4 {
            saddr: ctx.load::<[u8; 4]>(IP_SRC_OFF).ok()?,
            daddr: ctx.load::<[u8; 4]>(IP_DST_OFF).ok()?,
            sport: ctx.load::<u16>(l4).ok()?,
            dport: ctx.load::<u16>(l4 + 2).ok()?,
            protocol,
            _pad: [0; 3],
        },
    })
}

/// Rewrites addresses and ports, fixing the IP and L4 checksums.
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, to: &CtValue4) -> Result<(), i64> {
    let k = &flow.key;
    let tcp = k.protocol == lb::PROTO_TCP;
    let csum_off = if tcp { flow.l4 + 16 } else { flow.l4 + 6 };
    // A UDP checksum of 0 means "none": leave it so.
    let l4_csum = tcp || ctx.load::<u16>(csum_off)? != 0;
    let mangled = if tcp {
        0
    } else {
        u64::from(BPF_F_MARK_MANGLED_0)
    };
    for (off, old, new) in [
        (IP_SRC_OFF, k.saddr, to.saddr),
        (IP_DST_OFF, k.daddr, to.daddr),
    ] {
        if old == new {
            continue;
        }
        let (o, n) = (
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new)),
        );
        if l4_csum {
            ctx.l4_csum_replace(csum_off, o, n, u64::from(BPF_F_PSEUDO_HDR) | mangled | 4)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4)?;
        ctx.store(off, &new, 0)?;
    }
    for (off, old, new) in [
        (flow.l4, k.sport, to.sport),
        (flow.l4 + 2, k.dport, to.dport),
    ] {
        if old == new {
            continue;
        }
        if l4_csum {
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

#[inline(always)]
fn in_cidr(addr: [u8; 4], cidr: [u8; 4], prefix: u8) -> bool {
    if prefix == 0 || prefix > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(cidr) & mask)
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
fn tracked(ctx: &TcContext, flow: &Flow, cfg: &NodeConfig, from_pod: bool) -> Option<i32> {
    // SAFETY: lookup result copied out immediately.
    let to = unsafe { CT4.get(flow.key) }.copied()?;
    if rewrite(ctx, flow, &to).is_err() {
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_TRACKED);
    if to.flags & ct::DSR != 0 {
        // The backend's node needs the service address to answer as it.
        if add_dsr_option(ctx, flow.key.daddr, flow.key.dport).is_err() {
            return Some(TC_ACT_SHOT);
        }
        bump(stat::NP_DSR_OUT);
        return Some(emit(Some(cfg.ext_ifindex)));
    }
    // Replies always leave through the external device; requests do unless
    // they are for a local pod (then the stack routes them to its device).
    let local = in_cidr(to.daddr, cfg.pod_cidr4, cfg.pod_prefix4);
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
    let flow = parse(ctx)?;
    let k = flow.key;
    let reply_key = CtKey4 {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        protocol: k.protocol,
        _pad: [0; 3],
    };
    let reply = CtValue4 {
        saddr: [opt[4], opt[5], opt[6], opt[7]],
        daddr: k.saddr,
        sport: u16::from_ne_bytes([opt[2], opt[3]]),
        dport: k.sport,
        flags: ct::REPLY,
    };
    if CT4.insert(reply_key, reply, 0).is_err() {
        bump(stat::NP_CT_FAIL);
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_DSR_IN);
    Some(TC_ACT_OK)
}

/// Packets arriving on the node's external device.
#[classifier]
pub fn nodeport_ingress(ctx: TcContext) -> i32 {
    try_nodeport(&ctx).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn try_nodeport(ctx: &TcContext) -> Option<i32> {
    if let Some(verdict) = dsr_receive(ctx) {
        return Some(verdict);
    }
    let flow = parse(ctx)?;
    let cfg = config()?;
    if let Some(verdict) = tracked(ctx, &flow, &cfg, false) {
        return Some(verdict);
    }
    let k = flow.key;
    let mut skey = ServiceKey {
        addr: [0; 16],
        port: u16::from_be(k.dport),
        protocol: k.protocol,
        family: family::IPV4,
    };
    skey.addr[..4].copy_from_slice(&k.daddr);
    // SAFETY: lookup result copied out immediately.
    let svc = unsafe { SERVICES.get(skey) }.copied()?;
    if svc.slots == 0 {
        bump(stat::NP_NO_BACKEND);
        return Some(TC_ACT_SHOT);
    }
    let id = if svc.flags & lb::FLAG_MAGLEV != 0 && svc.maglev_size != 0 {
        // The same flow maps to the same backend on every node.
        let h = hash4(&k);
        // SAFETY: lookup result copied out immediately.
        unsafe {
            MAGLEV.get(SlotKey {
                set_id: svc.set_id,
                index: (h % u64::from(svc.maglev_size)) as u32,
            })
        }
        .copied()
    } else {
        // SAFETY: helper call, then a lookup copied out immediately.
        let r = unsafe { bpf_get_prandom_u32() };
        unsafe {
            SLOTS.get(SlotKey {
                set_id: svc.set_id,
                index: r % svc.slots,
            })
        }
        .copied()
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
    let baddr = [b.addr[0], b.addr[1], b.addr[2], b.addr[3]];
    let bport = b.port.to_be();
    let local = in_cidr(baddr, cfg.pod_cidr4, cfg.pod_prefix4);
    if !local && cfg.nat_mode == ct::MODE_DSR {
        // Direct server return: the client's address stays, the backend's
        // node answers the client itself; nothing comes back here.
        let forward = CtValue4 {
            saddr: k.saddr,
            daddr: baddr,
            sport: k.sport,
            dport: bport,
            flags: ct::DSR,
        };
        if CT4.insert(k, forward, 0).is_err() {
            bump(stat::NP_CT_FAIL);
            return Some(TC_ACT_SHOT);
        }
        if rewrite(ctx, &flow, &forward).is_err() || add_dsr_option(ctx, k.daddr, k.dport).is_err()
        {
            return Some(TC_ACT_SHOT);
        }
        bump(stat::NP_NEW);
        bump(stat::NP_DSR_OUT);
        return Some(emit(Some(cfg.ext_ifindex)));
    }
    let (src, sport) = if local {
        (k.saddr, k.sport)
    } else {
        let Some(p) = snat_port(&k, baddr, bport, cfg.node_ip4) else {
            bump(stat::NP_CT_FAIL);
            return Some(TC_ACT_SHOT);
        };
        (cfg.node_ip4, p)
    };
    let forward = CtValue4 {
        saddr: src,
        daddr: baddr,
        sport,
        dport: bport,
        flags: 0,
    };
    let reply_key = CtKey4 {
        saddr: baddr,
        daddr: src,
        sport: bport,
        dport: sport,
        protocol: k.protocol,
        _pad: [0; 3],
    };
    let reply = CtValue4 {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        flags: ct::REPLY,
    };
    if CT4.insert(reply_key, reply, 0).is_err() || CT4.insert(k, forward, 0).is_err() {
        bump(stat::NP_CT_FAIL);
        return Some(TC_ACT_SHOT);
    }
    if rewrite(ctx, &flow, &forward).is_err() {
        return Some(TC_ACT_SHOT);
    }
    bump(stat::NP_NEW);
    Some(emit(if local { None } else { Some(cfg.ext_ifindex) }))
}

/// A free SNAT source port for (node -> backend), or None after a few tries.
#[inline(always)]
fn snat_port(k: &CtKey4, backend: [u8; 4], bport: u16, node: [u8; 4]) -> Option<u16> {
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper call.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((SNAT_PORT_MIN + r % SNAT_PORT_SPAN) as u16).to_be();
        let probe = CtKey4 {
            saddr: backend,
            daddr: node,
            sport: bport,
            dport: port,
            protocol: k.protocol,
            _pad: [0; 3],
        };
        // SAFETY: only testing for presence.
        if unsafe { CT4.get(probe) }.is_none() {
            return Some(port);
        }
    }
    None
}

#[inline(always)]
fn hash4(k: &CtKey4) -> u64 {
    let a = u64::from(u32::from_ne_bytes(k.saddr)) << 32 | u64::from(u32::from_ne_bytes(k.daddr));
    let b = u64::from(k.sport) << 24 | u64::from(k.dport) << 8 | u64::from(k.protocol);
    crate::lb::mix(a ^ crate::lb::mix(b))
}

/// Replies from local backends enter the node on the pod's device.
#[inline(always)]
pub(crate) fn from_pod(ctx: &TcContext) -> Option<i32> {
    let flow = parse(ctx)?;
    let cfg = config()?;
    tracked(ctx, &flow, &cfg, true)
}
