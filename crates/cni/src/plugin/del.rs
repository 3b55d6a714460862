//! DEL: idempotent. Each step tolerates what is already gone (the netns,
//! the veth, the record, the allocation), so a repeated DEL, or one after
//! the container died, succeeds.

use crate::config::NetConf;
use crate::endpoint;
use crate::env::Invocation;
use crate::error::CniError;
use crate::ipam::store::Store;

pub(super) fn del(conf: &NetConf, inv: &Invocation) -> Result<(), CniError> {
    let store = Store::new(&conf.state_dir, &conf.name);
    let held = store.read()?.find(&inv.container_id, &inv.ifname).cloned();
    // Only a device this container's allocation names is deleted: a name
    // that merely hashes alike may belong to another container.
    if let Some(a) = &held {
        super::delete_host_device(&a.host_device)?;
    }
    endpoint::remove(&conf.agent_endpoints_dir, &inv.container_id)?;
    // Released last: until the veth is gone its addresses are in use.
    if held.is_some() {
        store.update(|s| {
            s.release(&inv.container_id, &inv.ifname);
            Ok(())
        })?;
    }
    Ok(())
}
