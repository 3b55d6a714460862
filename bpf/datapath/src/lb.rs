//! Socket-level service load balancing: a connection to a service address is
//! translated to a backend once, at connect() (or per datagram at sendmsg()
//! for unconnected UDP); replies and getpeername() show the service address
//! again. No per-packet NAT.

use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use meshless_common::{
    AffinityKey, AffinityValue, Backend, RevNatKey, RevNatValue, ServiceKey, ServiceValue, SlotKey,
    capacity, family, lb, stat,
};

use crate::bump;

/// Hash maps the agent fills: allocate entries on demand rather than
/// reserving the full capacity per node up front.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "ml_services")]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "ml_slots")]
pub(crate) static SLOTS: HashMap<SlotKey, u32> =
    HashMap::pinned(capacity::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "ml_maglev")]
pub(crate) static MAGLEV: HashMap<SlotKey, u32> =
    HashMap::pinned(capacity::MAGLEV, BPF_F_NO_PREALLOC);

#[map(name = "ml_backends")]
pub(crate) static BACKENDS: HashMap<u32, Backend> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "ml_affinity")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

#[map(name = "ml_sock_revnat")]
static REV_NAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(capacity::REV_NAT, 0);

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Which hook is running: connect() or sendmsg() translate, recvmsg() and
/// getpeername() translate back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    Sendmsg,
}

#[inline(always)]
fn load_addr(ctx: &SockAddrContext, fam: u8) -> ([u8; 16], u16) {
    let sa = ctx.sock_addr;
    let mut addr = [0u8; 16];
    // SAFETY: `sa` is the context pointer the kernel passed to this program.
    let (port, ip4, ip6) = unsafe { ((*sa).user_port, (*sa).user_ip4, (*sa).user_ip6) };
    if fam == family::IPV4 {
        addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        for (i, word) in ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    // user_port holds the port in network byte order in its low 16 bits.
    (addr, u16::from_be(port as u16))
}

#[inline(always)]
fn store_addr(ctx: &SockAddrContext, fam: u8, addr: &[u8; 16], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: writing user_ip4/user_ip6/user_port is what these hooks are for;
    // the verifier checks the access width.
    unsafe {
        if fam == family::IPV4 {
            (*sa).user_ip4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        } else {
            for i in 0..4 {
                (*sa).user_ip6[i] = u32::from_ne_bytes([
                    addr[i * 4],
                    addr[i * 4 + 1],
                    addr[i * 4 + 2],
                    addr[i * 4 + 3],
                ]);
            }
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: reading the context.
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call; makes the syscall fail with ECONNREFUSED
    // (as kube-proxy's REJECT would) instead of the default EPERM.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Picks a backend id for this socket, or None when the service has none.
#[inline(always)]
fn select(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<u32> {
    if svc.slots == 0 {
        return None;
    }
    // SAFETY: helper calls on our own context.
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr_mut()) };
    let affinity_key = AffinityKey {
        client,
        service_id: svc.service_id,
        _pad: 0,
    };
    // SAFETY: helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if svc.flags & lb::FLAG_AFFINITY != 0
        && let Some(prev) = AFFINITY.get_ptr_mut(affinity_key)
    {
        // SAFETY: the pointer came from a successful lookup; LRU values stay
        // valid for the duration of the program (RCU).
        let (last, id) = unsafe { ((*prev).last_used_ns, (*prev).backend_id) };
        let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
        // SAFETY: as above.
        if now.wrapping_sub(last) <= timeout_ns && unsafe { BACKENDS.get(id) }.is_some() {
            // SAFETY: as above.
            unsafe { (*prev).last_used_ns = now };
            bump(stat::LB_AFFINITY_HIT);
            return Some(id);
        }
    }
    let id = if svc.flags & lb::FLAG_MAGLEV != 0 && svc.maglev_size != 0 {
        // The flow: the client (its netns) and its bound source port when it
        // bound one; otherwise the socket, which makes each connection its
        // own flow.
        // SAFETY: `sk` is always set for sock_addr programs.
        let sport = unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            if sk.is_null() { 0 } else { (*sk).src_port }
        };
        let salt = if sport != 0 {
            u64::from(sport)
        } else {
            // SAFETY: helper call.
            unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) }
        };
        maglev_pick(svc, mix(client ^ salt.rotate_left(32)))
    } else {
        random_pick(svc)
    };
    if let Some(id) = id
        && svc.flags & lb::FLAG_AFFINITY != 0
    {
        let _ignored = AFFINITY.insert(
            affinity_key,
            AffinityValue {
                last_used_ns: now,
                backend_id: id,
                _pad: 0,
            },
            0,
        );
    }
    id
}

/// The backend id the service's Maglev table holds for `hash`.
#[inline(always)]
pub(crate) fn maglev_pick(svc: &ServiceValue, hash: u64) -> Option<u32> {
    let index = (hash % u64::from(svc.maglev_size)) as u32;
    // SAFETY: lookup result copied out immediately.
    unsafe {
        MAGLEV.get(SlotKey {
            set_id: svc.set_id,
            index,
        })
    }
    .copied()
}

/// The backend id of a uniformly random slot of the service's set.
#[inline(always)]
pub(crate) fn random_pick(svc: &ServiceValue) -> Option<u32> {
    // SAFETY: helper call.
    let r = unsafe { bpf_get_prandom_u32() };
    // SAFETY: lookup result copied out immediately.
    unsafe {
        SLOTS.get(SlotKey {
            set_id: svc.set_id,
            index: r % svc.slots,
        })
    }
    .copied()
}

/// splitmix64 finaliser: a cheap, well-mixed 64-bit hash.
#[inline(always)]
pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, fam: u8, hook: Hook) -> i32 {
    let proto = protocol(ctx);
    if hook == Hook::Sendmsg && proto != lb::PROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = load_addr(ctx, fam);
    let key = ServiceKey {
        addr,
        port,
        protocol: proto,
        family: fam,
    };
    // SAFETY: lookup result copied out immediately.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    let Some(id) = select(ctx, &svc) else {
        bump(stat::LB_NO_BACKEND);
        return refuse();
    };
    // SAFETY: lookup result copied out immediately.
    let Some(backend) = (unsafe { BACKENDS.get(id) }).copied() else {
        bump(stat::LB_MISSING_ENTRY);
        return refuse();
    };
    store_addr(ctx, fam, &backend.addr, backend.port);
    // SAFETY: helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) };
    let rev_key = RevNatKey {
        socket_cookie: cookie,
        addr: backend.addr,
        port: backend.port,
        family: fam,
        _pad: [0; 5],
    };
    let rev = RevNatValue {
        addr,
        port,
        _pad: [0; 6],
    };
    if REV_NAT.insert(rev_key, rev, 0).is_err() {
        bump(stat::LB_REV_NAT_FULL);
    }
    bump(stat::LB_TRANSLATED);
    ALLOW
}

/// recvmsg()/getpeername(): show the service address instead of the backend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, fam: u8) -> i32 {
    let (addr, port) = load_addr(ctx, fam);
    // SAFETY: helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_mut()) };
    let key = RevNatKey {
        socket_cookie: cookie,
        addr,
        port,
        family: fam,
        _pad: [0; 5],
    };
    // SAFETY: lookup result copied out immediately.
    if let Some(orig) = (unsafe { REV_NAT.get(key) }).copied() {
        store_addr(ctx, fam, &orig.addr, orig.port);
        bump(stat::LB_REV_TRANSLATED);
    }
    ALLOW
}

trait CtxPtr {
    fn as_ptr_mut(&self) -> *mut core::ffi::c_void;
}
impl CtxPtr for SockAddrContext {
    #[inline(always)]
    fn as_ptr_mut(&self) -> *mut core::ffi::c_void {
        self.sock_addr.cast()
    }
}

/// Every IPv4 connect() of the node's pods: counted, and translated when it
/// targets a service.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    bump(stat::CONNECT4);
    translate(&ctx, family::IPV4, Hook::Connect)
}

/// Every IPv6 connect() of the node's pods.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    bump(stat::CONNECT6);
    translate(&ctx, family::IPV6, Hook::Connect)
}

/// Unconnected UDP sendto() to a service (IPv4).
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, family::IPV4, Hook::Sendmsg)
}

/// Unconnected UDP sendto() to a service (IPv6).
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, family::IPV6, Hook::Sendmsg)
}

/// UDP recvmsg(): replies from a backend appear to come from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, family::IPV4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, family::IPV6)
}

/// getpeername() of a translated socket returns the service address.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, family::IPV4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, family::IPV6)
}
