//! ADD: allocate, wire, register; on failure undo exactly what was done.

use std::path::Path;

use serde_json::Value;

use super::{delete_host_device, netns, paired};
use crate::config::NetConf;
use crate::endpoint::{self, Endpoint};
use crate::env::Invocation;
use crate::error::CniError;
use crate::ipam::Allocation;
use crate::ipam::store::Store;
use crate::iproute::{self, Netns};
use crate::result::{self, Interface};
use crate::wiring::{self, Wiring};

/// What a failed ADD must take back, in reverse order of doing.
struct Undo<'a> {
    store: &'a Store,
    inv: &'a Invocation,
    endpoints_dir: &'a Path,
    veth: Option<String>,
    endpoint: bool,
}

impl Undo<'_> {
    fn run(self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.endpoint
            && let Err(e) = endpoint::remove(self.endpoints_dir, &self.inv.container_id)
        {
            problems.push(e.to_string());
        }
        if let Some(dev) = &self.veth
            && let Err(e) = delete_host_device(dev)
        {
            problems.push(e.to_string());
        }
        let released = self.store.update(|s| {
            s.release(&self.inv.container_id, &self.inv.ifname);
            Ok(())
        });
        if let Err(e) = released {
            problems.push(e.to_string());
        }
        problems
    }
}

/// The result, or the error and whatever could not be undone.
pub(super) fn add(conf: &NetConf, inv: &Invocation) -> Result<Value, (CniError, Vec<String>)> {
    let no_cleanup = |e| (e, Vec::new());
    let netns = netns(inv).map_err(no_cleanup)?;
    let store = Store::new(&conf.state_dir, &conf.name);
    let host_device = wiring::host_device(&inv.container_id);
    let alloc = store
        .update(|s| {
            s.allocate(
                &conf.name,
                &conf.pools,
                &inv.container_id,
                &inv.ifname,
                &host_device,
            )
        })
        .map_err(no_cleanup)?;
    let mut undo = Undo {
        store: &store,
        inv,
        endpoints_dir: &conf.agent_endpoints_dir,
        veth: None,
        endpoint: false,
    };
    match wire(conf, inv, netns, &alloc, &mut undo) {
        Ok(v) => Ok(v),
        Err(e) => Err((e, undo.run())),
    }
}

fn wire(
    conf: &NetConf,
    inv: &Invocation,
    netns: &Path,
    alloc: &Allocation,
    undo: &mut Undo<'_>,
) -> Result<Value, CniError> {
    let w = Wiring {
        host_device: &alloc.host_device,
        ifname: &inv.ifname,
        netns,
        mtu: conf.mtu,
        addresses: paired(conf, alloc),
    };
    let args = w.create_args();
    iproute::ip(
        Netns::Host,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .map_err(|e| explain_create_failure(e, &w))?;
    undo.veth = Some(alloc.host_device.clone());
    iproute::ip_batch(Netns::Host, &w.host_lines())?;
    iproute::ip_batch(Netns::Path(netns), &w.container_lines())?;
    let gone = |what: String| CniError::Command {
        command: "ip -j link show".into(),
        stderr: format!("{what} disappeared right after it was configured"),
    };
    let host = iproute::link(Netns::Host, &alloc.host_device)?
        .ok_or_else(|| gone(format!("host device {}", alloc.host_device)))?;
    let container = iproute::link(Netns::Path(netns), &inv.ifname)?
        .ok_or_else(|| gone(format!("{} in {}", inv.ifname, netns.display())))?;
    undo.endpoint = true;
    endpoint::write(
        &conf.agent_endpoints_dir,
        &Endpoint {
            container_id: inv.container_id.clone(),
            namespace: inv.args.pod_namespace.clone(),
            pod: inv.args.pod_name.clone(),
            netns: netns.to_owned(),
            ifname: inv.ifname.clone(),
            host_device: alloc.host_device.clone(),
            addresses: alloc.addresses.clone(),
        },
    )?;
    Ok(result::add(
        conf.cni_version,
        &Interface {
            name: &host.ifname,
            mac: host.address.as_deref().unwrap_or_default(),
            sandbox: None,
        },
        &Interface {
            name: &container.ifname,
            mac: container.address.as_deref().unwrap_or_default(),
            sandbox: Some(netns),
        },
        &w.addresses,
    ))
}

/// "File exists" does not say which side: look and say.
fn explain_create_failure(e: CniError, w: &Wiring<'_>) -> CniError {
    let CniError::Command { command, stderr } = e else {
        return e;
    };
    let exists = |ns, name| matches!(iproute::link(ns, name), Ok(Some(_)));
    let hint = if exists(Netns::Path(w.netns), w.ifname) {
        format!(
            "{} already exists in {} (CNI_IFNAME must name a new interface)",
            w.ifname,
            w.netns.display()
        )
    } else if exists(Netns::Host, w.host_device) {
        format!(
            "host device {0} already exists: a leftover of a container whose DEL never ran (remove it with `ip link del {0}`) or one whose id hashes alike",
            w.host_device
        )
    } else {
        return CniError::Command { command, stderr };
    };
    CniError::Command {
        command,
        stderr: format!("{stderr}: {hint}"),
    }
}
