//! CHECK: is the container's network still what ADD made? Every difference
//! found is reported at once.

use std::net::IpAddr;

use super::{netns, paired};
use crate::config::NetConf;
use crate::env::Invocation;
use crate::error::CniError;
use crate::ipam::store::Store;
use crate::iproute::{self, Netns};
use crate::result;
use crate::wiring::Wiring;

fn prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

pub(super) fn check(conf: &NetConf, inv: &Invocation) -> Result<(), CniError> {
    let netns = netns(inv)?;
    let store = Store::new(&conf.state_dir, &conf.name);
    let failed = |problems: Vec<String>| CniError::CheckFailed {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        problems,
    };
    let state = store.read()?;
    let Some(alloc) = state.find(&inv.container_id, &inv.ifname) else {
        return Err(failed(vec![format!(
            "network {} holds no addresses for it in {} (was ADD run on this node?)",
            conf.name,
            store.path().display()
        )]));
    };
    let mut problems = Vec::new();
    if let Some(prev) = &conf.prev_result {
        let mut want = result::prev_addresses(prev)?;
        let mut have = alloc.addresses.clone();
        want.sort();
        have.sort();
        if want != have {
            problems.push(format!(
                "prevResult lists {want:?} but {have:?} are allocated"
            ));
        }
    }
    let pairs = paired(conf, alloc);
    if pairs.len() != alloc.addresses.len()
        || pairs.iter().any(|(pool, ip)| !pool.cidr.contains(*ip))
    {
        problems.push(format!(
            "allocated {:?} do not match podCIDRs {:?} (did the config change since ADD?)",
            alloc.addresses,
            conf.pools
                .iter()
                .map(|p| p.cidr.to_string())
                .collect::<Vec<_>>()
        ));
    }

    let dev = &alloc.host_device;
    match iproute::link(Netns::Host, dev)? {
        None => problems.push(format!("host device {dev} is missing")),
        Some(l) if !l.is_up() => problems.push(format!("host device {dev} is down")),
        Some(_) => {
            for ip in &alloc.addresses {
                let routes = iproute::routes(Netns::Host, ip.is_ipv6())?;
                if !routes
                    .iter()
                    .any(|r| r.is_host_route_to(*ip) && r.dev.as_deref() == Some(dev))
                {
                    problems.push(format!(
                        "the host has no route {ip}/{} dev {dev}",
                        prefix(*ip)
                    ));
                }
            }
        }
    }

    let ifname = &inv.ifname;
    let ns = Netns::Path(netns);
    match iproute::link(ns, ifname)? {
        None => problems.push(format!("{ifname} does not exist in {}", netns.display())),
        Some(l) => {
            if !l.is_up() {
                problems.push(format!("{ifname} is down"));
            }
            let have = iproute::addresses(ns, ifname)?;
            for ip in &alloc.addresses {
                if !have.contains(&(*ip, prefix(*ip))) {
                    problems.push(format!(
                        "address {ip}/{} is missing on {ifname}",
                        prefix(*ip)
                    ));
                }
            }
            for (pool, _) in &pairs {
                let gw = Wiring::gateway(pool);
                let routes = iproute::routes(ns, gw.is_ipv6())?;
                if !routes.iter().any(|r| {
                    r.is_default()
                        && r.gateway == Some(gw)
                        && r.dev.as_deref() == Some(ifname.as_str())
                }) {
                    problems.push(format!(
                        "the default route via {gw} dev {ifname} is missing"
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(failed(problems))
    }
}
