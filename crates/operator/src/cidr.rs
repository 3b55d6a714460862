//! IP prefixes as the operator's allocators see them: a family, a base
//! address as a `u128` and a prefix length, so IPv4 and IPv6 share one
//! arithmetic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address family, spelled as Kubernetes spells it in `spec.ipFamilies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// `IPv4` / `IPv6` as in `spec.ipFamilies`; anything else is `None`.
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(Self::V4),
            "IPv6" => Some(Self::V6),
            _ => None,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Why a prefix did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error(
        "{0:?} is not a prefix: write it as address/length, e.g. 198.18.1.0/24 or fd00:d::/112"
    )]
    Syntax(String),
    #[error("{input:?}: the prefix length must be at most {max} for {family}")]
    Length {
        input: String,
        max: u8,
        family: Family,
    },
    #[error("{input:?} has host bits set: did you mean {suggestion}?")]
    HostBits { input: String, suggestion: Cidr },
}

/// A network prefix (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    family: Family,
    base: u128,
    len: u8,
}

/// An address as a number (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The inverse of [`to_u128`]; IPv4 keeps only the low 32 bits.
pub fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "IPv4 numbers are below 2^32 by construction"
        )]
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl Cidr {
    /// A prefix from an address and a length, with host bits cleared.
    pub fn new_truncating(ip: IpAddr, len: u8) -> Self {
        let family = Family::of(ip);
        let len = len.min(family.bits());
        Self {
            family,
            base: to_u128(ip) & Self::mask(family, len),
            len,
        }
    }

    fn mask(family: Family, len: u8) -> u128 {
        let host = u32::from(family.bits() - len);
        let width_mask = if family == Family::V4 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        // checked_shl: a /0 shifts by the full width.
        width_mask & !(1u128.checked_shl(host).map_or(u128::MAX, |v| v - 1))
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        from_u128(self.family, self.base)
    }

    /// log2 of the number of addresses.
    pub fn host_bits(&self) -> u8 {
        self.family.bits() - self.len
    }

    /// First and last address as numbers.
    pub fn range(&self) -> (u128, u128) {
        let last = self.base
            | 1u128
                .checked_shl(u32::from(self.host_bits()))
                .map_or(u128::MAX, |v| v - 1);
        (self.base, last)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family
            && to_u128(ip) & Self::mask(self.family, self.len) == self.base
    }

    /// Whether `other` lies inside this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.family == self.family && other.len >= self.len && self.contains(other.network())
    }

    /// The `index`-th sub-prefix of length `len` (`len >= self.len`), if any.
    pub fn subnet(&self, len: u8, index: u128) -> Option<Cidr> {
        if len < self.len || len > self.family.bits() {
            return None;
        }
        let shift = u32::from(self.family.bits() - len);
        let count_bits = u32::from(len - self.len);
        if count_bits < 128 && index >> count_bits != 0 {
            return None;
        }
        Some(Cidr {
            family: self.family,
            base: self.base | index.checked_shl(shift).unwrap_or(0),
            len,
        })
    }

    /// Which sub-prefix of length `len` contains `ip` (the inverse of [`Cidr::subnet`]).
    pub fn subnet_index(&self, len: u8, ip: IpAddr) -> Option<u128> {
        if !self.contains(ip) || len < self.len || len > self.family.bits() {
            return None;
        }
        let shift = u32::from(self.family.bits() - len);
        Some((to_u128(ip) - self.base).checked_shr(shift).unwrap_or(0))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_owned()))?;
        let ip: IpAddr = addr.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let len: u8 = len.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let family = Family::of(ip);
        if len > family.bits() {
            return Err(CidrError::Length {
                input: s.to_owned(),
                max: family.bits(),
                family,
            });
        }
        let cidr = Cidr::new_truncating(ip, len);
        if cidr.network() != ip {
            return Err(CidrError::HostBits {
                input: s.to_owned(),
                suggestion: cidr,
            });
        }
        Ok(cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect(s)
    }

    #[test]
    fn parses_and_prints_both_families() {
        assert_eq!(c("198.18.1.0/24").to_string(), "198.18.1.0/24");
        assert_eq!(c("fd00:d::/112").to_string(), "fd00:d::/112");
        assert_eq!(c("0.0.0.0/0").range(), (0, u128::from(u32::MAX)));
        assert_eq!(c("::/0").range(), (0, u128::MAX));
    }

    #[test]
    fn rejects_host_bits_with_a_suggestion() {
        let err = "198.18.1.5/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"198.18.1.5/24\" has host bits set: did you mean 198.18.1.0/24?"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Length { .. })
        ));
        assert!(matches!(
            "10.0.0.0".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
    }

    #[test]
    fn subnets_round_trip() {
        let v4 = c("198.18.16.0/20");
        assert_eq!(v4.subnet(24, 0), Some(c("198.18.16.0/24")));
        assert_eq!(v4.subnet(24, 15), Some(c("198.18.31.0/24")));
        assert_eq!(v4.subnet(24, 16), None);
        assert_eq!(v4.subnet_index(24, "198.18.20.7".parse().unwrap()), Some(4));
        let v6 = c("fd00:b::/48");
        assert_eq!(v6.subnet(64, 3), Some(c("fd00:b:0:3::/64")));
        assert_eq!(
            v6.subnet_index(64, "fd00:b:0:3::1".parse().unwrap()),
            Some(3)
        );
        assert!(v6.covers(&c("fd00:b:0:3::/64")));
        assert!(!v6.covers(&c("fd00:c::/64")));
        assert!(!v4.contains("fd00:b::1".parse().unwrap()));
    }
}
