//! IP prefixes (`198.18.17.0/24`, `fd00:b:1::/64`): parsing, membership and
//! walking addresses by their numeric value. Both families are handled as
//! `u128` so IPAM has one code path.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A prefix in canonical form (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Address width of `ip`'s family in bits.
pub fn family_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The address as a number (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v4: bool, value: u128) -> IpAddr {
    if v4 {
        // Callers only pass values inside an IPv4 prefix, which fit in 32 bits.
        IpAddr::V4(u32::try_from(value).map_or(Ipv4Addr::BROADCAST, Ipv4Addr::from))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

impl Cidr {
    /// `network/prefix`; an address with host bits set is refused with the
    /// canonical form in the message (a typo there is usually a wrong mask).
    pub fn new(network: IpAddr, prefix: u8) -> Result<Self, String> {
        let bits = family_bits(network);
        if prefix > bits {
            return Err(format!(
                "prefix /{prefix} is longer than the {bits} bits of {network}"
            ));
        }
        let c = Self { network, prefix };
        if c.first() != to_u128(network) {
            return Err(format!(
                "{network}/{prefix} has host bits set; did you mean {}/{prefix}?",
                c.at(c.first())
            ));
        }
        Ok(c)
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    fn host_mask(&self) -> u128 {
        let host_bits = u32::from(family_bits(self.network) - self.prefix);
        if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        }
    }

    /// Numeric value of the first address (the network address).
    pub fn first(&self) -> u128 {
        to_u128(self.network) & !self.host_mask()
    }

    /// Numeric value of the last address.
    pub fn last(&self) -> u128 {
        self.first() | self.host_mask()
    }

    /// The address with numeric value `value` in this prefix's family.
    pub fn at(&self, value: u128) -> IpAddr {
        from_u128(self.is_ipv4(), value)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4() && (self.first()..=self.last()).contains(&to_u128(ip))
    }

    /// The IPv4 broadcast address; IPv6 has none.
    pub fn broadcast(&self) -> Option<IpAddr> {
        self.is_ipv4().then(|| self.at(self.last()))
    }

    /// The first address after the network address (`.1`, `::1`): the
    /// default router address.
    pub fn first_host(&self) -> IpAddr {
        self.at(self.first().saturating_add(1).min(self.last()))
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no /prefix (write it like 198.18.17.0/24)"))?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("prefix {prefix:?} in {s:?} is not a number"))?;
        Self::new(network, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_and_prints_both_families() {
        let v4: Cidr = "198.18.17.0/24".parse().expect("v4");
        assert_eq!(v4.to_string(), "198.18.17.0/24");
        assert!(v4.contains(ip("198.18.17.255")));
        assert!(!v4.contains(ip("198.18.18.0")));
        assert!(!v4.contains(ip("fd00:b:1::1")));
        assert_eq!(v4.broadcast(), Some(ip("198.18.17.255")));
        assert_eq!(v4.first_host(), ip("198.18.17.1"));
        let v6: Cidr = "fd00:b:1::/64".parse().expect("v6");
        assert_eq!(v6.to_string(), "fd00:b:1::/64");
        assert!(v6.contains(ip("fd00:b:1::ffff")));
        assert_eq!(v6.broadcast(), None);
        assert_eq!(v6.first_host(), ip("fd00:b:1::1"));
        let all: Cidr = "::/0".parse().expect("all");
        assert_eq!(all.last(), u128::MAX);
    }

    #[test]
    fn refuses_what_is_not_a_canonical_prefix() {
        for (bad, why) in [
            ("198.18.17.0", "no /prefix"),
            ("198.18.17.5/24", "did you mean 198.18.17.0/24"),
            ("198.18.17.0/33", "longer than the 32 bits"),
            ("nope/24", "not an IP address"),
            ("198.18.17.0/x", "not a number"),
        ] {
            let err = bad.parse::<Cidr>().expect_err(bad);
            assert!(err.contains(why), "{bad}: {err:?} should mention {why:?}");
        }
    }
}
