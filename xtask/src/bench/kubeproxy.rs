//! kube-proxy's own rule layouts, written out the way kube-proxy writes them,
//! so the `iptables` and `nftables` paths of `cargo xtask bench lb` measure
//! what a cluster running kube-proxy would run. Pure functions: typed
//! services in, `iptables-restore` / `nft -f` text out.
//!
//! Sources (kubernetes/kubernetes, read at the commits named here):
//! - iptables mode: `pkg/proxy/iptables/proxier.go` (`iptablesJumpChains`,
//!   `syncProxyRules`, `writeServiceToEndpointRules`, `servicePortChainName`,
//!   `servicePortEndpointChainName`, `appendServiceCommentLocked`) and the
//!   expected dumps in `proxier_test.go` (e.g. `TestOverallIPTablesRules`).
//! - nftables mode (KEP-3866): `pkg/proxy/nftables/proxier.go` at
//!   b0f823e6ccd8a10b3893fc75011b9981af39285c (`nftablesBaseChains`,
//!   `nftablesJumpChains`, `setupNFTables`, `syncProxyRules`,
//!   `hashAndTruncate`, `servicePortChainNameBase`,
//!   `servicePortEndpointChainNameBase`) and `baseRules` in `proxier_test.go`.
//!
//! What is left out, and why it does not change the measured path: NodePort,
//! ExternalIP, LoadBalancer, session affinity and "Local" traffic policy (the
//! bench services are plain ClusterIP services with ready endpoints, so
//! kube-proxy would not write those rules either), the mangle-table canary
//! chains (never on a packet's path), and services without endpoints (none
//! here).
//!
//! Chain names match kube-proxy's byte for byte: the unit tests check them
//! against names taken from kube-proxy's own test expectations.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The cluster-wide settings kube-proxy's rules depend on.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: (Ipv4Addr, u8),
    /// The Service CIDR (nftables mode drops traffic to unallocated ClusterIPs in it).
    pub service_cidr: (Ipv4Addr, u8),
}

/// kube-proxy's default `--masquerade-bit` 14.
const MASQ_MARK: &str = "0x4000";

/// One service port with its ready endpoints: what kube-proxy's
/// `ServicePortMap` + `EndpointsMap` hold for it. TCP only (the bench).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The ServicePort's name; empty for an unnamed single port.
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// `proxy.ServicePortName.String()`: `ns/name`, plus `:port` when the
    /// port is named.
    pub fn name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// Protocol as kube-proxy spells it in rules and hashes (`strings.ToLower`).
const PROTO: &str = "tcp";

fn cidr(c: (Ipv4Addr, u8)) -> String {
    format!("{}/{}", c.0, c.1)
}

// ---------------------------------------------------------------------------
// Hashing: kube-proxy names chains after base32(sha256(...)). A minimal
// SHA-256 (FIPS 180-4) and RFC 4648 base32, so xtask needs no crypto crate.

const K: [u32; 64] = [
    0x428a_2f98,
    0x7137_4491,
    0xb5c0_fbcf,
    0xe9b5_dba5,
    0x3956_c25b,
    0x59f1_11f1,
    0x923f_82a4,
    0xab1c_5ed5,
    0xd807_aa98,
    0x1283_5b01,
    0x2431_85be,
    0x550c_7dc3,
    0x72be_5d74,
    0x80de_b1fe,
    0x9bdc_06a7,
    0xc19b_f174,
    0xe49b_69c1,
    0xefbe_4786,
    0x0fc1_9dc6,
    0x240c_a1cc,
    0x2de9_2c6f,
    0x4a74_84aa,
    0x5cb0_a9dc,
    0x76f9_88da,
    0x983e_5152,
    0xa831_c66d,
    0xb003_27c8,
    0xbf59_7fc7,
    0xc6e0_0bf3,
    0xd5a7_9147,
    0x06ca_6351,
    0x1429_2967,
    0x27b7_0a85,
    0x2e1b_2138,
    0x4d2c_6dfc,
    0x5338_0d13,
    0x650a_7354,
    0x766a_0abb,
    0x81c2_c92e,
    0x9272_2c85,
    0xa2bf_e8a1,
    0xa81a_664b,
    0xc24b_8b70,
    0xc76c_51a3,
    0xd192_e819,
    0xd699_0624,
    0xf40e_3585,
    0x106a_a070,
    0x19a4_c116,
    0x1e37_6c08,
    0x2748_774c,
    0x34b0_bcb5,
    0x391c_0cb3,
    0x4ed8_aa4a,
    0x5b9c_ca4f,
    0x682e_6ff3,
    0x748f_82ee,
    0x78a5_636f,
    0x84c8_7814,
    0x8cc7_0208,
    0x90be_fffa,
    0xa450_6ceb,
    0xbef9_a3f7,
    0xc671_78f2,
];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09_e667,
        0xbb67_ae85,
        0x3c6e_f372,
        0xa54f_f53a,
        0x510e_527f,
        0x9b05_688c,
        0x1f83_d9ab,
        0x5be0_cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = buf.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        // Output characters that carry input bits; the rest is padding.
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                let idx = (bits >> (35 - 5 * i)) & 0x1f;
                out.push(char::from(ALPHABET[usize::try_from(idx).unwrap_or(0)]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `base32(sha256(s))`, the hash every kube-proxy chain name is built on.
fn hash(s: &str) -> String {
    base32(&sha256(s.as_bytes()))
}

// ---------------------------------------------------------------------------

/// kube-proxy's iptables mode.
pub mod iptables {
    use std::fmt::Write as _;

    use super::{Cluster, MASQ_MARK, PROTO, ServicePort, cidr, hash};

    /// Above this many endpoints kube-proxy drops the per-rule comments on
    /// KUBE-SVC/KUBE-SEP rules (`largeClusterEndpointsThreshold`) and
    /// skips the `iptables-save` that finds stale chains on most syncs.
    pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

    /// `servicePortChainName`: `KUBE-SVC-` + 16 chars of
    /// base32(sha256(servicePortName + protocol)).
    pub fn svc_chain(svc: &ServicePort) -> String {
        let h = hash(&format!("{}{PROTO}", svc.name_string()));
        format!("KUBE-SVC-{}", &h[..16])
    }

    /// `servicePortEndpointChainName`: `KUBE-SEP-` + 16 chars of
    /// base32(sha256(servicePortName + protocol + "ip:port")).
    pub fn sep_chain(svc: &ServicePort, endpoint: std::net::SocketAddrV4) -> String {
        let h = hash(&format!("{}{PROTO}{endpoint}", svc.name_string()));
        format!("KUBE-SEP-{}", &h[..16])
    }

    /// `proxier.probability(n)`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
    pub fn probability(n: usize) -> String {
        let p = 1.0 / n as f64;
        format!("{p:.10}")
    }

    /// (table, chain, hooked from, comment, extra match) from
    /// `iptablesJumpChains`: kube-proxy ensures these with `iptables -I`
    /// once per full sync; the bench installs them once, untimed.
    const JUMPS: &[(&str, &str, &str, &str, &str)] = &[
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            "",
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-FORWARD",
            "FORWARD",
            "kubernetes forwarding rules",
            "",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "INPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "OUTPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "FORWARD",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "PREROUTING",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            "KUBE-POSTROUTING",
            "POSTROUTING",
            "kubernetes postrouting rules",
            "",
        ),
    ];

    /// The jumps from the built-in chains into kube-proxy's chains, as
    /// input for `iptables-restore --noflush`.
    pub fn jump_rules() -> String {
        let mut out = String::new();
        for table in ["filter", "nat"] {
            let _ = writeln!(out, "*{table}");
            let mut declared: Vec<&str> = Vec::new();
            for (t, chain, _, _, _) in JUMPS {
                if *t == table && !declared.contains(chain) {
                    declared.push(chain);
                    let _ = writeln!(out, ":{chain} - [0:0]");
                }
            }
            for (t, chain, from, comment, extra) in JUMPS {
                if *t == table {
                    let _ = writeln!(
                        out,
                        "-I {from} {extra}-m comment --comment \"{comment}\" -j {chain}"
                    );
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// What one kube-proxy full sync hands to `iptables-restore --noflush`:
    /// the filter and nat tables' kube-proxy chains, every service in the
    /// order given (so the last one is the last KUBE-SERVICES rule a packet
    /// is matched against).
    ///
    /// A service that was removed is simply absent: with more than
    /// [`LARGE_CLUSTER_ENDPOINTS`] endpoints kube-proxy leaves its chains
    /// (unreferenced) for a later cleanup, and below that the bench never
    /// removes services.
    pub fn sync(cluster: &Cluster, services: &[ServicePort]) -> String {
        let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let large = endpoints > LARGE_CLUSTER_ENDPOINTS;
        // ~700 bytes per two-endpoint service.
        let mut chains = String::with_capacity(services.len() * 100 + 256);
        let mut rules = String::with_capacity(services.len() * 700 + 1024);

        let mut out = String::new();
        out.push_str("*filter\n");
        for c in [
            "KUBE-NODEPORTS",
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
        ] {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
        let _ = writeln!(
            out,
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
        );
        out.push_str(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        );
        out.push_str("COMMIT\n*nat\n");
        for c in [
            "KUBE-NODEPORTS",
            "KUBE-SERVICES",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
        ] {
            let _ = writeln!(chains, ":{c} - [0:0]");
        }
        let _ = writeln!(
            rules,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
        );
        let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
        rules.push_str(
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        );
        let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");

        let cluster_cidr = cidr(cluster.cluster_cidr);
        for svc in services {
            let name = svc.name_string();
            let svc_chain = svc_chain(svc);
            let _ = writeln!(chains, ":{svc_chain} - [0:0]");
            let (vip, port) = (svc.cluster_ip, svc.port);
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {PROTO} -p {PROTO} -d {vip} --dport {port} -j {svc_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {PROTO} -p {PROTO} -d {vip} --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
            );
            let n = svc.endpoints.len();
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let sep = sep_chain(svc, *ep);
                let _ = write!(rules, "-A {svc_chain} ");
                if !large {
                    let _ = write!(rules, "-m comment --comment \"{name} -> {ep}\" ");
                }
                if i + 1 < n {
                    let _ = write!(
                        rules,
                        "-m statistic --mode random --probability {} ",
                        probability(n - i)
                    );
                }
                let _ = writeln!(rules, "-j {sep}");
            }
            for ep in &svc.endpoints {
                let sep = sep_chain(svc, *ep);
                let _ = writeln!(chains, ":{sep} - [0:0]");
                let comment = if large {
                    String::new()
                } else {
                    format!("-m comment --comment {name} ")
                };
                let _ = writeln!(rules, "-A {sep} {comment}-s {} -j KUBE-MARK-MASQ", ep.ip());
                let _ = writeln!(
                    rules,
                    "-A {sep} {comment}-m {PROTO} -p {PROTO} -j DNAT --to-destination {ep}"
                );
            }
        }
        rules.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        out.push_str(&chains);
        out.push_str(&rules);
        out.push_str("COMMIT\n");
        out
    }
}

/// kube-proxy's nftables mode.
pub mod nftables {
    use std::fmt::Write as _;

    use super::{Cluster, MASQ_MARK, PROTO, ServicePort, cidr, hash};

    /// Every object lives in this one table.
    pub const TABLE: &str = "ip kube-proxy";

    /// `knftables.NameLengthMax` (256) minus `chainNamePrefixLengthMax` (16).
    const CHAIN_NAME_BASE_MAX: usize = 240;

    /// `hashAndTruncate`: 8 chars of base32(sha256(name)) + "-" + name.
    fn hash_and_truncate(name: &str) -> String {
        let mut out = format!("{}-{name}", &hash(name)[..8]);
        if out.len() > CHAIN_NAME_BASE_MAX {
            out.truncate(CHAIN_NAME_BASE_MAX - 3);
            out.push_str("...");
        }
        out
    }

    /// `service-` + `servicePortChainNameBase`: `HASH-ns/name/tcp/portname`.
    pub fn service_chain(svc: &ServicePort) -> String {
        let base = format!("{}/{}/{PROTO}/{}", svc.namespace, svc.name, svc.port_name);
        format!("service-{}", hash_and_truncate(&base))
    }

    /// `endpoint-` + `servicePortEndpointChainNameBase`:
    /// `HASH-ns/name/tcp/portname__ip/port`.
    pub fn endpoint_chain(svc: &ServicePort, ep: std::net::SocketAddrV4) -> String {
        let base = format!(
            "{}/{}/{PROTO}/{}__{}/{}",
            svc.namespace,
            svc.name,
            svc.port_name,
            ep.ip(),
            ep.port()
        );
        format!("endpoint-{}", hash_and_truncate(&base))
    }

    /// `nftablesBaseChains`: (name, type, hook, priority). Priorities as
    /// numbers: dstnat = -100, srcnat = 100.
    const BASE_CHAINS: &[(&str, &str, &str, i32)] = &[
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];

    /// `nftablesJumpChains`: (destination, source, extra match).
    const JUMP_CHAINS: &[(&str, &str, &str)] = &[
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ];

    /// `ensureChain`: add and flush a chain, once per transaction.
    fn ensure_chain(out: &mut String, created: &mut Vec<String>, chain: &str) {
        if created.iter().any(|c| c == chain) {
            return;
        }
        created.push(chain.to_owned());
        let _ = writeln!(out, "add chain {TABLE} {chain}");
        let _ = writeln!(out, "flush chain {TABLE} {chain}");
    }

    /// `setupNFTables`: the table, base chains, dispatch maps and helper
    /// chains, written at the start of every full sync.
    fn setup(out: &mut String, cluster: &Cluster) {
        let _ = writeln!(
            out,
            "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
        );
        for (name, kind, hook, prio) in BASE_CHAINS {
            let _ = writeln!(
                out,
                "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
            );
            let _ = writeln!(out, "flush chain {TABLE} {name}");
        }
        let mut created = Vec::new();
        for (dst, src, extra) in JUMP_CHAINS {
            ensure_chain(out, &mut created, dst);
            let _ = writeln!(out, "add rule {TABLE} {src} {extra}jump {dst}");
        }
        for chain in [
            "services",
            "cluster-ips-check",
            "masquerading",
            "mark-for-masquerade",
        ] {
            ensure_chain(out, &mut created, chain);
        }
        let _ = writeln!(
            out,
            "add rule {TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} masquerading mark and {MASQ_MARK} == 0 return"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} masquerading mark set mark xor {MASQ_MARK}"
        );
        let _ = writeln!(out, "add rule {TABLE} masquerading masquerade fully-random");
        let _ = writeln!(
            out,
            "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            cidr(cluster.service_cidr)
        );
        // --nodeport-addresses unset ("match all"): kube-proxy adds and
        // deletes the nodeport-ips set so that it surely does not exist.
        let _ = writeln!(
            out,
            "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        );
        let _ = writeln!(out, "delete set {TABLE} nodeport-ips");
        let _ = writeln!(
            out,
            "add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        );
        let _ = writeln!(
            out,
            "add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
        );
        let _ = writeln!(
            out,
            "add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
        );
        let _ = writeln!(out, "flush chain {TABLE} reject-chain");
        let _ = writeln!(out, "add rule {TABLE} reject-chain reject");
        let _ = writeln!(
            out,
            "add rule {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
        );
        let _ = writeln!(
            out,
            "add map {TABLE} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        );
        ensure_chain(out, &mut created, "firewall-check");
        let _ = writeln!(
            out,
            "add rule {TABLE} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
        );
        let _ = writeln!(
            out,
            "add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        );
        let _ = writeln!(
            out,
            "add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
        );
        // nftElementStorage.reset: every sync-managed container starts empty.
        let _ = writeln!(out, "flush set {TABLE} cluster-ips");
        for map in [
            "service-ips",
            "firewall-ips",
            "no-endpoint-services",
            "no-endpoint-nodeports",
            "service-nodeports",
        ] {
            let _ = writeln!(out, "flush map {TABLE} {map}");
        }
    }

    /// One service's chains, rules and map elements, as `syncProxyRules`
    /// writes them for a service whose chains must be (re)written.
    fn service(out: &mut String, cluster: &Cluster, svc: &ServicePort) {
        let chain = service_chain(svc);
        let eps: Vec<String> = svc
            .endpoints
            .iter()
            .map(|ep| endpoint_chain(svc, *ep))
            .collect();
        for ep_chain in &eps {
            let _ = writeln!(out, "add chain {TABLE} {ep_chain}");
            let _ = writeln!(out, "flush chain {TABLE} {ep_chain}");
        }
        let _ = writeln!(out, "add chain {TABLE} {chain}");
        let _ = writeln!(out, "flush chain {TABLE} {chain}");
        let (vip, port) = (svc.cluster_ip, svc.port);
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} ip daddr {vip} {PROTO} dport {port} ip saddr != {} jump mark-for-masquerade",
            cidr(cluster.cluster_cidr)
        );
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        for (ep, ep_chain) in svc.endpoints.iter().zip(&eps) {
            let _ = writeln!(
                out,
                "add rule {TABLE} {ep_chain} ip saddr {} jump mark-for-masquerade",
                ep.ip()
            );
            let _ = writeln!(
                out,
                "add rule {TABLE} {ep_chain} meta l4proto {PROTO} dnat to {ep}"
            );
        }
        let _ = writeln!(out, "add element {TABLE} cluster-ips {{ {vip} }}");
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {vip} . {PROTO} . {port} : goto {chain} }}"
        );
    }

    /// One full sync (`needFullSync`, as after a restart): a transaction
    /// for `nft -f` that (re)builds the whole table with every service.
    pub fn full_sync(cluster: &Cluster, services: &[ServicePort]) -> String {
        let mut out = String::with_capacity(services.len() * 1200 + 4096);
        setup(&mut out, cluster);
        for svc in services {
            service(&mut out, cluster, svc);
        }
        out
    }

    /// The partial-sync transaction after one service was created: only
    /// its chains and elements (other services are `skipServiceUpdate`).
    pub fn add_service(cluster: &Cluster, svc: &ServicePort) -> String {
        let mut out = String::new();
        service(&mut out, cluster, svc);
        out
    }

    /// The partial-sync transaction after one service was deleted: its map
    /// elements go (`cleanupLeftoverKeys`) and its chains are flushed and
    /// left as stale; kube-proxy deletes them in a later sync (kernels
    /// before 6.2 do not notice at once that a chain became unreferenced).
    pub fn remove_service(svc: &ServicePort) -> String {
        let mut out = String::new();
        let (vip, port) = (svc.cluster_ip, svc.port);
        let _ = writeln!(out, "flush chain {TABLE} {}", service_chain(svc));
        for ep in &svc.endpoints {
            let _ = writeln!(out, "flush chain {TABLE} {}", endpoint_chain(svc, *ep));
        }
        let _ = writeln!(out, "delete element {TABLE} cluster-ips {{ {vip} }}");
        let _ = writeln!(
            out,
            "delete element {TABLE} service-ips {{ {vip} . {PROTO} . {port} }}"
        );
        out
    }

    /// The later transaction that deletes a removed service's stale chains.
    pub fn delete_stale_chains(svc: &ServicePort) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "delete chain {TABLE} {}", service_chain(svc));
        for ep in &svc.endpoints {
            let _ = writeln!(out, "delete chain {TABLE} {}", endpoint_chain(svc, *ep));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_matches_fips_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two blocks (56 bytes: the padding spills into a second block).
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), want, "base32({input:?})");
        }
    }

    fn svc(ns: &str, name: &str, port_name: &str, vip: Ipv4Addr, eps: &[&str]) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            cluster_ip: vip,
            port: 80,
            endpoints: eps.iter().map(|e| e.parse().expect("endpoint")).collect(),
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            cluster_cidr: (Ipv4Addr::new(10, 0, 0, 0), 8),
            service_cidr: (Ipv4Addr::new(172, 30, 0, 0), 16),
        }
    }

    #[test]
    fn chain_names_match_kube_proxy_test_expectations() {
        // From kube-proxy's iptables and nftables proxier_test.go.
        let s1 = svc(
            "ns1",
            "svc1",
            "p80",
            Ipv4Addr::new(172, 30, 0, 41),
            &["10.180.0.1:80"],
        );
        assert_eq!(iptables::svc_chain(&s1), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            iptables::sep_chain(&s1, SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, 1), 80)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        let s2 = svc("ns2", "svc2", "p80", Ipv4Addr::new(172, 30, 0, 42), &[]);
        assert_eq!(iptables::svc_chain(&s2), "KUBE-SVC-GNZBNJ2PO5MGZ6GT");
        assert_eq!(
            nftables::service_chain(&s1),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nftables::endpoint_chain(&s1, "10.180.0.1:80".parse().expect("ep")),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let s4 = svc("ns4", "svc4", "p80", Ipv4Addr::new(172, 30, 0, 44), &[]);
        assert_eq!(
            nftables::endpoint_chain(&s4, "10.180.0.5:80".parse().expect("ep")),
            "endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
        );
        // An unnamed port: "ns/name" without ":port", and an empty last
        // path element in nftables names.
        let unnamed = svc("bench", "svc-0", "", Ipv4Addr::new(198, 19, 0, 1), &[]);
        assert_eq!(unnamed.name_string(), "bench/svc-0");
        assert_eq!(iptables::svc_chain(&unnamed), "KUBE-SVC-HFVIGFGB6Q3GOAWL");
        assert_eq!(
            nftables::service_chain(&unnamed),
            "service-7W6RP75A-bench/svc-0/tcp/"
        );
    }

    #[test]
    fn probabilities_are_one_over_remaining_endpoints() {
        assert_eq!(iptables::probability(2), "0.5000000000");
        assert_eq!(iptables::probability(3), "0.3333333333");
        assert_eq!(iptables::probability(4), "0.2500000000");
        let s = svc(
            "ns",
            "s",
            "",
            Ipv4Addr::new(172, 30, 0, 1),
            &["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80", "10.0.1.4:80"],
        );
        let rules = iptables::sync(&cluster(), std::slice::from_ref(&s));
        let chain = iptables::svc_chain(&s);
        let jumps: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(jumps.len(), 4, "{rules}");
        // 1/4, 1/3, 1/2, then the last endpoint takes what is left.
        for (line, p) in jumps
            .iter()
            .zip(["0.2500000000", "0.3333333333", "0.5000000000"])
        {
            assert!(line.contains(&format!("--probability {p} ")), "{line}");
        }
        assert!(!jumps[3].contains("statistic"), "{}", jumps[3]);
        for (line, ep) in jumps.iter().zip(&s.endpoints) {
            assert!(
                line.ends_with(&format!("-j {}", iptables::sep_chain(&s, *ep))),
                "{line}"
            );
        }
    }

    #[test]
    fn iptables_sync_has_kube_proxy_shape() {
        let s1 = svc(
            "ns1",
            "svc1",
            "p80",
            Ipv4Addr::new(172, 30, 0, 41),
            &["10.180.0.1:80"],
        );
        let rules = iptables::sync(&cluster(), std::slice::from_ref(&s1));
        // The lines kube-proxy's TestOverallIPTablesRules expects for svc1,
        // plus --random-fully (the real iptables supports it).
        for want in [
            ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ] {
            assert!(rules.lines().any(|l| l == want), "missing {want}\n{rules}");
        }
        // Tables in restore order, each committed; chains declared before rules.
        assert!(rules.starts_with("*filter\n"));
        assert_eq!(rules.matches("COMMIT\n").count(), 2);
        let nat = &rules[rules.find("*nat").expect("nat table")..];
        let last_decl = nat.rfind("\n:").expect("declarations");
        let first_rule = nat.find("\n-A").expect("rules");
        assert!(last_decl < first_rule, "a chain is declared after a rule");
    }

    #[test]
    fn iptables_last_service_is_the_last_service_rule() {
        let services: Vec<ServicePort> = (0..5u8)
            .map(|i| {
                svc(
                    "bench",
                    &format!("svc-{i}"),
                    "",
                    Ipv4Addr::new(198, 19, 0, i + 1),
                    &["198.18.21.10:8080", "198.18.21.11:8080"],
                )
            })
            .collect();
        let rules = iptables::sync(&cluster(), &services);
        let dispatch: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(dispatch.len(), 6, "5 services + the NodePort tail");
        assert!(dispatch[4].contains("-d 198.19.0.5 "), "{}", dispatch[4]);
        assert!(dispatch[5].contains("KUBE-NODEPORTS"), "{}", dispatch[5]);
        // Jumps into kube-proxy's chains from the built-in ones.
        let jumps = iptables::jump_rules();
        assert!(jumps.contains(
            "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(jumps.contains(
            "-I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
        ));
    }

    #[test]
    fn iptables_drops_comments_in_large_clusters() {
        let many: Vec<ServicePort> = (0..501u32)
            .map(|i| {
                let [_, _, a, b] = (u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i).to_be_bytes();
                svc(
                    "bench",
                    &format!("svc-{i}"),
                    "",
                    Ipv4Addr::new(198, 19, a, b),
                    &["198.18.21.10:8080", "198.18.21.11:8080"],
                )
            })
            .collect();
        let rules = iptables::sync(&cluster(), &many);
        let sep = iptables::sep_chain(&many[0], many[0].endpoints[0]);
        let line = rules
            .lines()
            .find(|l| l.starts_with(&format!("-A {sep} ")) && l.contains("DNAT"))
            .expect("DNAT rule");
        assert_eq!(
            line,
            format!("-A {sep} -m tcp -p tcp -j DNAT --to-destination 198.18.21.10:8080")
        );
        // The KUBE-SERVICES comment stays (kube-proxy writes it directly).
        assert!(rules.contains("--comment \"bench/svc-0 cluster IP\""));
    }

    #[test]
    fn nftables_sync_has_kube_proxy_shape() {
        let s1 = svc(
            "ns1",
            "svc1",
            "p80",
            Ipv4Addr::new(172, 30, 0, 41),
            &["10.180.0.1:80", "10.180.0.2:80"],
        );
        let tx = nftables::full_sync(&cluster(), std::slice::from_ref(&s1));
        let ep1 = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80";
        let ep2 = nftables::endpoint_chain(&s1, "10.180.0.2:80".parse().expect("ep"));
        for want in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }".to_owned(),
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
                .to_owned(),
            "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }"
                .to_owned(),
            "add rule ip kube-proxy nat-prerouting jump services".to_owned(),
            "add rule ip kube-proxy nat-postrouting jump masquerading".to_owned(),
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
                .to_owned(),
            "add rule ip kube-proxy masquerading masquerade fully-random".to_owned(),
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade".to_owned(),
            format!("add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap {{ 0 : goto {ep1} , 1 : goto {ep2} }}"),
            format!("add rule ip kube-proxy {ep1} ip saddr 10.180.0.1 jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {ep1} meta l4proto tcp dnat to 10.180.0.1:80"),
            "add element ip kube-proxy cluster-ips { 172.30.0.41 }".to_owned(),
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }".to_owned(),
        ] {
            assert!(tx.lines().any(|l| l == want), "missing {want}\n{tx}");
        }
        // A chain is always created before anything refers to it.
        let pos = |needle: &str| tx.find(needle).expect(needle);
        assert!(
            pos(&format!("add chain ip kube-proxy {ep1}\n"))
                < pos("add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80\n")
        );
        assert!(
            pos("add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80\n")
                < pos("add element ip kube-proxy service-ips")
        );
    }

    #[test]
    fn nftables_incremental_transactions_touch_one_service() {
        let s = svc(
            "bench",
            "svc-9",
            "",
            Ipv4Addr::new(198, 19, 0, 10),
            &["198.18.21.10:8080", "198.18.21.11:8080"],
        );
        let add = nftables::add_service(&cluster(), &s);
        assert!(!add.contains("add table"), "partial syncs skip setup");
        assert_eq!(add.matches("add chain ").count(), 3);
        assert_eq!(add.matches("add element ").count(), 2);
        let remove = nftables::remove_service(&s);
        assert_eq!(
            remove
                .lines()
                .filter(|l| l.starts_with("delete element"))
                .count(),
            2
        );
        assert!(
            remove.contains("delete element ip kube-proxy service-ips { 198.19.0.10 . tcp . 80 }")
        );
        assert_eq!(remove.matches("flush chain ").count(), 3);
        assert_eq!(nftables::delete_stale_chains(&s).lines().count(), 3);
    }
}
