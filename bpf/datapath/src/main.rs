//! Meshless eBPF programs.
//!
//! Every entry point is a thin wrapper over `try_<name>` that returns an
//! explicit verdict; anything that goes wrong is counted in `ml_stats`.
#![no_std]
#![no_main]
#![allow(
    unsafe_code,
    reason = "BPF programs need link_section/no_mangle and raw pointers into maps"
)]

mod lb;
mod nodeport;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use meshless_common::{PacketCount, PacketKey, capacity, direction, family, stat};

#[map(name = "ml_pkt_count")]
static PACKET_COUNTERS: PerCpuHashMap<PacketKey, PacketCount> =
    PerCpuHashMap::pinned(capacity::PACKET_COUNTERS, 0);

#[map(name = "ml_stats")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::MAX, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Counts packets sent by pods (TC ingress on the host-side device).
#[classifier]
pub fn pod_from(ctx: TcContext) -> i32 {
    let counted = match try_count(&ctx, direction::FROM_POD) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    // A reply of a north-south flow served by this pod goes back translated.
    nodeport::from_pod(&ctx).unwrap_or(counted)
}

/// Counts packets delivered to pods (TC egress on the host-side device).
#[classifier]
pub fn pod_to(ctx: TcContext) -> i32 {
    match try_count(&ctx, direction::TO_POD) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// Counting never changes a packet's fate: both arms carry TC_ACT_OK, the
/// error arm has already been counted in `ml_stats`.
#[inline(always)]
fn try_count(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    bump(stat::TC_PACKETS);
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| truncated())?);
    let mut key = PacketKey {
        // SAFETY: reading a field of the skb context the kernel handed us.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        direction: dir,
        family: 0,
        protocol: 0,
        _pad: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    match ethertype {
        ETH_P_IP => {
            key.family = family::IPV4;
            key.protocol = ctx.load::<u8>(ETH_HLEN + 9).map_err(|_| truncated())?;
            let saddr = ctx
                .load::<[u8; 4]>(ETH_HLEN + 12)
                .map_err(|_| truncated())?;
            let daddr = ctx
                .load::<[u8; 4]>(ETH_HLEN + 16)
                .map_err(|_| truncated())?;
            key.saddr[..4].copy_from_slice(&saddr);
            key.daddr[..4].copy_from_slice(&daddr);
        }
        ETH_P_IPV6 => {
            key.family = family::IPV6;
            key.protocol = ctx.load::<u8>(ETH_HLEN + 6).map_err(|_| truncated())?;
            key.saddr = ctx
                .load::<[u8; 16]>(ETH_HLEN + 8)
                .map_err(|_| truncated())?;
            key.daddr = ctx
                .load::<[u8; 16]>(ETH_HLEN + 24)
                .map_err(|_| truncated())?;
        }
        _ => {
            bump(stat::TC_NON_IP);
            return Ok(TC_ACT_OK);
        }
    }
    let len = u64::from(ctx.len());
    if let Some(count) = PACKET_COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only from this CPU.
        unsafe {
            (*count).packets += 1;
            (*count).bytes += len;
        }
    } else if PACKET_COUNTERS
        .insert(
            key,
            PacketCount {
                packets: 1,
                bytes: len,
            },
            0,
        )
        .is_err()
    {
        bump(stat::PACKET_COUNTERS_FULL);
    }
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn truncated() -> i32 {
    bump(stat::TC_TRUNCATED);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
