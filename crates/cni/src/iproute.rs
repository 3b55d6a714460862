//! Running iproute2 in the host's namespace or, through `nsenter --net=PATH`
//! (util-linux), in the container's: `ip -n` only knows names under
//! /run/netns and CNI_NETNS is any path (`/proc/PID/ns/net` too). Errors
//! carry the command line and what it printed.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::CniError;

/// Where a command runs.
#[derive(Debug, Clone, Copy)]
pub enum Netns<'a> {
    /// The namespace the plugin was started in (the node's).
    Host,
    /// A container's namespace, by path.
    Path(&'a Path),
}

fn command(ns: Netns<'_>) -> Command {
    let mut cmd = match ns {
        Netns::Host => Command::new("ip"),
        Netns::Path(p) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", p.display())).arg("ip");
            c
        }
    };
    // Stable messages in errors, whatever the node's locale.
    cmd.env("LC_ALL", "C");
    cmd
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn not_started(cmd: &Command, e: &std::io::Error) -> CniError {
    CniError::Command {
        command: describe(cmd),
        stderr: format!(
            "could not start: {e} (meshless-cni needs iproute2's `ip` and util-linux's `nsenter` in PATH)"
        ),
    }
}

/// `ip ARGS...` in `ns`, returning stdout.
pub fn ip(ns: Netns<'_>, args: &[&str]) -> Result<String, CniError> {
    let mut cmd = command(ns);
    cmd.args(args);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| not_started(&cmd, &e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CniError::Command {
            command: describe(&cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip -batch -` in `ns`: one process for many changes, stopping at the
/// first failing line, which the error quotes.
pub fn ip_batch(ns: Netns<'_>, lines: &[String]) -> Result<(), CniError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = command(ns);
    cmd.args(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    let failed = |cmd: &Command, stderr: String| CniError::Command {
        command: describe(cmd),
        stderr,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| not_started(&cmd, &e))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means ip exited early; its stderr says why.
        let _ignored = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(&cmd, e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(failed(&cmd, batch_failure(lines, &stderr)))
    }
}

/// iproute2 ends a failed batch with "Command failed -:N": name line N,
/// or show the whole script when that is missing.
fn batch_failure(lines: &[String], stderr: &str) -> String {
    let failing = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Command failed -:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .and_then(|n| Some((n, lines.get(n.checked_sub(1)?)?)));
    let reason: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Command failed"))
        .collect();
    match failing {
        Some((n, line)) => format!("line {n} `{line}`: {}", reason.join("; ")),
        None => format!("{} (script: {})", stderr.trim(), lines.join("; ")),
    }
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(
    what: &str,
    out: &str,
) -> Result<T, CniError> {
    if out.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(out).map_err(|e| CniError::Command {
        command: what.to_owned(),
        stderr: format!("unexpected output ({e}): {out}"),
    })
}

/// A link as `ip -j link show` prints it (the fields we use).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Link {
    pub ifname: String,
    pub ifindex: u32,
    /// The MAC address.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Link {
    /// Administratively up.
    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

/// Every link in `ns`.
pub fn links(ns: Netns<'_>) -> Result<Vec<Link>, CniError> {
    parse_json("ip -j link show", &ip(ns, &["-j", "link", "show"])?)
}

/// The link named `name` in `ns`, if there is one.
pub fn link(ns: Netns<'_>, name: &str) -> Result<Option<Link>, CniError> {
    Ok(links(ns)?.into_iter().find(|l| l.ifname == name))
}

#[derive(Debug, Default, Deserialize)]
struct AddrLink {
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    local: Option<IpAddr>,
    #[serde(default)]
    prefixlen: u8,
}

/// The addresses (with prefix lengths) on `dev` in `ns`.
pub fn addresses(ns: Netns<'_>, dev: &str) -> Result<Vec<(IpAddr, u8)>, CniError> {
    let out = ip(ns, &["-j", "addr", "show", "dev", dev])?;
    let links: Vec<AddrLink> = parse_json("ip -j addr show", &out)?;
    Ok(links
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter_map(|a| Some((a.local?, a.prefixlen)))
        .collect())
}

/// A route as `ip -j route show` prints it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Route {
    /// `default`, an address (a host route) or `address/len`.
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub dev: Option<String>,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.dst == "default"
    }

    /// True for the host route to `ip` (`ip` prints /32 and /128 bare).
    pub fn is_host_route_to(&self, ip: IpAddr) -> bool {
        let full = crate::cidr::family_bits(ip);
        match self.dst.split_once('/') {
            None => self.dst.parse::<IpAddr>().ok() == Some(ip),
            Some((a, len)) => {
                a.parse::<IpAddr>().ok() == Some(ip) && len.parse::<u8>().ok() == Some(full)
            }
        }
    }
}

/// The main table's routes of one family in `ns`.
pub fn routes(ns: Netns<'_>, ipv6: bool) -> Result<Vec<Route>, CniError> {
    let family = if ipv6 { "-6" } else { "-4" };
    parse_json(
        "ip -j route show",
        &ip(ns, &["-j", family, "route", "show"])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_name_the_failing_line() {
        let lines = vec![
            "link set lo up".to_owned(),
            "route add default via 198.18.17.1 dev eth0".to_owned(),
        ];
        assert_eq!(
            batch_failure(
                &lines,
                "RTNETLINK answers: File exists\nCommand failed -:2\n"
            ),
            "line 2 `route add default via 198.18.17.1 dev eth0`: RTNETLINK answers: File exists"
        );
        assert!(batch_failure(&lines, "boom").contains("script: link set lo up; route add"));
    }

    #[test]
    fn parses_ip_json() {
        let links: Vec<Link> = parse_json(
            "t",
            r#"[{"ifindex":2,"link_index":2,"ifname":"mltest","flags":["BROADCAST","MULTICAST","UP"],"mtu":1400,"address":"b6:a9:ac:a9:e7:4a","link_netnsid":0}]"#,
        )
        .expect("links");
        assert_eq!(links[0].ifname, "mltest");
        assert!(links[0].is_up());
        assert_eq!(links[0].address.as_deref(), Some("b6:a9:ac:a9:e7:4a"));
        let routes: Vec<Route> = parse_json(
            "t",
            r#"[{"dst":"default","gateway":"198.18.17.1","dev":"eth0","flags":[]},{"dst":"198.18.17.1","dev":"eth0","scope":"link","flags":[]},{"dst":"fd00:b:1::2/128","dev":"x"}]"#,
        )
        .expect("routes");
        assert!(routes[0].is_default());
        assert!(routes[1].is_host_route_to("198.18.17.1".parse().expect("ip")));
        assert!(routes[2].is_host_route_to("fd00:b:1::2".parse().expect("ip")));
        assert!(!routes[2].is_host_route_to("fd00:b:1::3".parse().expect("ip")));
        let empty: Vec<Route> = parse_json("t", "\n").expect("empty output");
        assert!(empty.is_empty());
        let addrs: Vec<AddrLink> = parse_json(
            "t",
            r#"[{"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"198.18.17.2","prefixlen":32},{"family":"inet6","local":"fe80::2","prefixlen":64}]}]"#,
        )
        .expect("addrs");
        assert_eq!(addrs[0].addr_info.len(), 2);
    }
}
