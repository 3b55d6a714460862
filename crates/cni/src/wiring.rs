//! How a container is wired to its node, as iproute2 command lines: pure
//! functions of the allocation, so the exact shape is unit-tested. It is the
//! lab's pod wiring (`meshless_lab` `Lab::add_pod`), which the datapath is
//! tested against:
//!
//! | side      | what                                                                 |
//! |-----------|----------------------------------------------------------------------|
//! | host      | router addresses on `lo` (`/32`, `/128`), shared by all pods         |
//! | host      | veth `ml<hash>`: `addrgenmode none`, `fe80::1/64`, up                 |
//! | host      | `<pod v4>/32` and `<pod v6>/128` routes via the veth                 |
//! | container | `CNI_IFNAME`: `<v4>/32`, `<v6>/128`, `fe80::2/64`, all `nodad`         |
//! | container | `<router v4> scope link`, default via router v4, default via fe80::1 |
//!
//! No bridge, no ARP proxy: the node answers for its router address
//! because it is local, and IPv6 uses the link-local gateway every host-side
//! device carries. `addrgenmode none` keeps the kernel from adding
//! link-local addresses of its own (and with `nodad`, DAD never delays a
//! pod's start).

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use crate::ipam::Pool;

/// Host-side devices start with this (meshless-agent's
/// `--pod-device-prefix` default).
pub const HOST_DEVICE_PREFIX: &str = "ml";

/// The IPv6 gateway of every pod, on every host-side device.
pub const GATEWAY_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The container side's link-local address (a source for neighbour
/// discovery, since the kernel generates none).
pub const CONTAINER_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

/// `ml` + 8 hex digits of FNV-1a over the container id: unique per node
/// with high probability, stable across releases (unlike std's hasher), and
/// within the kernel's 15-byte limit. The same function names lab pods'
/// devices.
pub fn host_device(container_id: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in container_id.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{HOST_DEVICE_PREFIX}{hash:08x}")
}

/// One container's wiring.
#[derive(Debug, Clone)]
pub struct Wiring<'a> {
    pub host_device: &'a str,
    pub ifname: &'a str,
    pub netns: &'a Path,
    pub mtu: u32,
    /// Each pool with the address allocated from it.
    pub addresses: Vec<(Pool, IpAddr)>,
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

impl Wiring<'_> {
    fn v4(&self) -> Option<(Pool, IpAddr)> {
        self.addresses.iter().copied().find(|(_, a)| a.is_ipv4())
    }

    fn v6(&self) -> Option<(Pool, IpAddr)> {
        self.addresses.iter().copied().find(|(_, a)| a.is_ipv6())
    }

    /// `ip` arguments that create the pair with its peer already in the
    /// container: one atomic step, so a taken name on either side fails
    /// before anything exists (iproute2 opens a `netns` argument containing
    /// '/' as a path).
    pub fn create_args(&self) -> Vec<String> {
        let mtu = self.mtu.to_string();
        [
            "link",
            "add",
            self.host_device,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            self.ifname,
            "mtu",
            &mtu,
            "netns",
            &self.netns.to_string_lossy(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Host-side lines, after the pair exists. Router addresses use
    /// `replace`, which is idempotent and safe against concurrent ADDs.
    pub fn host_lines(&self) -> Vec<String> {
        let dev = self.host_device;
        let mut lines = Vec::new();
        for (pool, _) in &self.addresses {
            let nodad = if pool.router.is_ipv6() { " nodad" } else { "" };
            lines.push(format!(
                "addr replace {}/{} dev lo{nodad}",
                pool.router,
                host_prefix(pool.router)
            ));
        }
        lines.push(format!("link set dev {dev} addrgenmode none"));
        lines.push(format!("link set dev {dev} up"));
        if self.v6().is_some() {
            lines.push(format!("addr add {GATEWAY_LL}/64 dev {dev} nodad"));
        }
        if let Some((_, a)) = self.v4() {
            lines.push(format!("route add {a}/32 dev {dev} scope link"));
        }
        if let Some((_, a)) = self.v6() {
            lines.push(format!("route add {a}/128 dev {dev}"));
        }
        lines
    }

    /// Container-side lines (run in CNI_NETNS).
    pub fn container_lines(&self) -> Vec<String> {
        let dev = self.ifname;
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("link set dev {dev} mtu {} addrgenmode none", self.mtu),
        ];
        if let Some((_, a)) = self.v4() {
            lines.push(format!("addr add {a}/32 dev {dev}"));
        }
        if let Some((_, a)) = self.v6() {
            lines.push(format!("addr add {a}/128 dev {dev} nodad"));
            lines.push(format!("addr add {CONTAINER_LL}/64 dev {dev} nodad"));
        }
        lines.push(format!("link set dev {dev} up"));
        if let Some((pool, _)) = self.v4() {
            lines.push(format!("route add {} dev {dev} scope link", pool.router));
            lines.push(format!("route add default via {} dev {dev}", pool.router));
        }
        if self.v6().is_some() {
            lines.push(format!("route add default via {GATEWAY_LL} dev {dev}"));
        }
        lines
    }

    /// The gateway a pod uses for `pool`'s family.
    pub fn gateway(pool: &Pool) -> IpAddr {
        if pool.router.is_ipv4() {
            pool.router
        } else {
            IpAddr::V6(GATEWAY_LL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Cidr;

    fn pool(cidr: &str) -> Pool {
        let c: Cidr = cidr.parse().expect("cidr");
        Pool::new(c, c.first_host())
    }

    fn dual() -> Wiring<'static> {
        Wiring {
            host_device: "ml0badf00d",
            ifname: "eth0",
            netns: Path::new("/run/netns/pod"),
            mtu: 1500,
            addresses: vec![
                (pool("198.18.17.0/24"), "198.18.17.2".parse().expect("ip")),
                (pool("fd00:b:1::/64"), "fd00:b:1::2".parse().expect("ip")),
            ],
        }
    }

    #[test]
    fn host_device_names_match_the_lab_and_fit_ifnamsiz() {
        for id in [
            "client",
            "server",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let d = host_device(id);
            assert_eq!(
                d,
                meshless_lab::plan::pod_device(id),
                "same scheme as lab pods"
            );
            assert!(d.len() <= 15 && d.starts_with(HOST_DEVICE_PREFIX), "{d}");
        }
        assert_ne!(host_device("a"), host_device("b"));
    }

    #[test]
    fn wiring_is_the_labs() {
        let w = dual();
        assert_eq!(
            w.create_args().join(" "),
            "link add ml0badf00d mtu 1500 type veth peer name eth0 mtu 1500 netns /run/netns/pod"
        );
        assert_eq!(
            w.host_lines(),
            [
                "addr replace 198.18.17.1/32 dev lo",
                "addr replace fd00:b:1::1/128 dev lo nodad",
                "link set dev ml0badf00d addrgenmode none",
                "link set dev ml0badf00d up",
                "addr add fe80::1/64 dev ml0badf00d nodad",
                "route add 198.18.17.2/32 dev ml0badf00d scope link",
                "route add fd00:b:1::2/128 dev ml0badf00d",
            ]
        );
        assert_eq!(
            w.container_lines(),
            [
                "link set lo up",
                "link set dev eth0 mtu 1500 addrgenmode none",
                "addr add 198.18.17.2/32 dev eth0",
                "addr add fd00:b:1::2/128 dev eth0 nodad",
                "addr add fe80::2/64 dev eth0 nodad",
                "link set dev eth0 up",
                "route add 198.18.17.1 dev eth0 scope link",
                "route add default via 198.18.17.1 dev eth0",
                "route add default via fe80::1 dev eth0",
            ]
        );
    }

    #[test]
    fn single_family_wiring_has_only_that_family() {
        let mut w = dual();
        w.addresses.truncate(1);
        assert!(
            w.host_lines().iter().all(|l| !l.contains(':')),
            "{:?}",
            w.host_lines()
        );
        assert!(
            w.container_lines().iter().all(|l| !l.contains("fe80")),
            "{:?}",
            w.container_lines()
        );
        let mut w = dual();
        w.addresses.remove(0);
        assert!(
            w.container_lines().iter().all(|l| !l.contains("198.18")),
            "{:?}",
            w.container_lines()
        );
        assert!(
            w.container_lines()
                .contains(&"route add default via fe80::1 dev eth0".to_owned())
        );
    }
}
