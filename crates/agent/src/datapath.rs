//! Loading, pinning, attaching and detaching the embedded eBPF programs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::Config;
use crate::status::{AttachedDevice, Status};

/// The datapath object built by build.rs from bpf/datapath.
static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless-datapath"));

const PROG_POD_FROM: &str = "pod_from";
const PROG_POD_TO: &str = "pod_to";
const PROG_NODEPORT: &str = "nodeport_ingress";
/// Socket hooks on the node's cgroup: service translation at connect() and
/// sendmsg(), the service address shown again at recvmsg() and getpeername().
const SOCK_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_connect6",
    "sock_sendmsg4",
    "sock_sendmsg6",
    "sock_recvmsg4",
    "sock_recvmsg6",
    "sock_getpeername4",
    "sock_getpeername6",
];

/// Errors that stop the datapath from coming up. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{root} is not on a BPF filesystem, so maps could not survive an agent restart; \
         mount it with `mount -t bpf bpf /sys/fs/bpf` (cargo xtask setup does this)"
    )]
    NoBpffs { root: PathBuf },
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "loading the eBPF object: {0} (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF)"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("opening cgroup {path}: {source} (pass the node's cgroup v2 directory with --cgroup)")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Link { what: String, reason: String },
    #[error("the object has no program named {0}; the agent and bpf/datapath are out of step")]
    MissingProgram(&'static str),
}

fn program_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        source: Box::new(source),
    }
}

#[derive(Debug)]
struct DeviceLinks {
    ifindex: u32,
    pins: [PathBuf; 2],
}

/// The loaded datapath of one node.
///
/// Every attachment is a bpf_link pinned under `<pin_dir>/links/`, so the
/// hooks stay in the kernel when the agent exits or is killed: connections
/// keep flowing and new ones keep being balanced from the pinned maps. The
/// next agent takes the links over (TC programs are replaced atomically in
/// their link; socket hooks are attached anew before the old link is
/// released). Only `--detach-on-exit` (or removing the pins) takes the
/// datapath out.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    config: Config,
    devices: BTreeMap<String, DeviceLinks>,
    sock_pins: Vec<(&'static str, PathBuf)>,
    /// ifindex of the external device once the north-south path is attached.
    external: Option<u32>,
    loaded_at_unix: u64,
}

fn link_err(what: String) -> impl FnOnce(aya::programs::links::LinkError) -> DatapathError {
    move |e| DatapathError::Link {
        what,
        reason: e.to_string(),
    }
}

fn pin_err(what: String) -> impl FnOnce(aya::pin::PinError) -> DatapathError {
    move |e| DatapathError::Link {
        what,
        reason: e.to_string(),
    }
}

impl Datapath {
    /// Loads the embedded object, pinning (or adopting already pinned) maps
    /// under the node's pin directory, and loads every program into the kernel.
    pub fn load(config: &Config) -> Result<Self, DatapathError> {
        if !meshless_maps::is_bpffs(&config.bpffs_root) {
            return Err(DatapathError::NoBpffs {
                root: config.bpffs_root.clone(),
            });
        }
        let pin_dir = config.pin_dir();
        let links = pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir {
            path: links.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(meshless_common::map_names::SERVICES, config.max_services)
            .map_max_entries(meshless_common::map_names::BACKENDS, config.max_backends)
            .map_max_entries(
                meshless_common::map_names::BACKEND_SLOTS,
                config.max_backend_slots,
            )
            .map_max_entries(
                meshless_common::map_names::MAGLEV,
                config.max_maglev_entries,
            )
            .map_max_entries(meshless_common::map_names::CT4, config.max_conntrack)
            .map_max_entries(meshless_common::map_names::CT6, config.max_conntrack)
            .load(DATAPATH_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [PROG_POD_FROM, PROG_POD_TO, PROG_NODEPORT] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            prog.load().map_err(program_err(name))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            prog.load().map_err(program_err(name))?;
        }
        tracing::info!(node = %config.node, pin_dir = %pin_dir.display(), "datapath loaded");
        Ok(Self {
            ebpf,
            config: config.clone(),
            devices: BTreeMap::new(),
            sock_pins: Vec::new(),
            external: None,
            loaded_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Writes the node facts the north-south path reads (node addresses as
    /// SNAT sources, pod CIDRs) and attaches it to the external device's
    /// ingress. The caller attaches only once an IPv4 node address is known.
    pub fn attach_external(
        &mut self,
        device: &str,
        facts: &crate::node::NodeFacts,
    ) -> Result<(), DatapathError> {
        let ifindex = nix::net::if_::if_nametoindex(device).map_err(|e| DatapathError::Link {
            what: format!("external device {device}"),
            reason: format!("{e} (pass the node's uplink with --external-device)"),
        })?;
        self.external = Some(ifindex);
        self.write_node_config(facts)?;
        let path = self.links_dir().join(format!("ext_{device}_{ifindex}"));
        self.attach_tc_pinned(PROG_NODEPORT, device, TcAttachType::Ingress, &path)?;
        self.sock_pins.push((PROG_NODEPORT, path));
        tracing::info!(device, ifindex, "north-south path attached");
        Ok(())
    }

    /// Whether [`Datapath::attach_external`] has run.
    pub fn external_attached(&self) -> bool {
        self.external.is_some()
    }

    /// Rewrites the node facts the north-south path reads (after the Node
    /// object changed). One array update: the programs see either the old
    /// or the new facts, never a mix.
    pub fn write_node_config(
        &mut self,
        facts: &crate::node::NodeFacts,
    ) -> Result<(), DatapathError> {
        let Some(ifindex) = self.external else {
            return Ok(());
        };
        let mut cfg = meshless_common::NodeConfig {
            ext_ifindex: ifindex,
            nat_mode: if self.config.lb_mode == "dsr" {
                meshless_common::ct::MODE_DSR
            } else {
                meshless_common::ct::MODE_SNAT
            },
            ..Default::default()
        };
        if let Some(std::net::IpAddr::V4(v4)) = facts.ips.iter().find(|a| a.is_ipv4()) {
            cfg.node_ip4 = v4.octets();
        }
        if let Some((std::net::IpAddr::V4(net), len)) =
            facts.pod_cidrs.iter().find(|(a, _)| a.is_ipv4())
        {
            cfg.pod_cidr4 = net.octets();
            cfg.pod_prefix4 = *len;
        }
        if let Some(std::net::IpAddr::V6(v6)) = facts.ips.iter().find(|a| a.is_ipv6()) {
            cfg.node_ip6 = v6.octets();
        }
        if let Some((std::net::IpAddr::V6(net), len)) =
            facts.pod_cidrs.iter().find(|(a, _)| a.is_ipv6())
        {
            cfg.pod_cidr6 = net.octets();
            cfg.pod_prefix6 = *len;
        }
        let map = self
            .ebpf
            .map_mut(meshless_common::map_names::NODE_CONFIG)
            .ok_or(DatapathError::MissingProgram(
                meshless_common::map_names::NODE_CONFIG,
            ))?;
        let mut array: aya::maps::Array<&mut aya::maps::MapData, meshless_common::NodeConfig> =
            aya::maps::Array::try_from(map).map_err(|e| DatapathError::Link {
                what: "node config map".into(),
                reason: e.to_string(),
            })?;
        array.set(0, cfg, 0).map_err(|e| DatapathError::Link {
            what: "writing the node config map".into(),
            reason: e.to_string(),
        })
    }

    fn links_dir(&self) -> PathBuf {
        self.config.pin_dir().join("links")
    }

    /// Attaches the socket hooks to the node's cgroup (and so to every pod
    /// cgroup below it). A link left by a previous agent is released only
    /// after the new one is in place, so no connect() goes untranslated.
    pub fn attach_cgroup(&mut self) -> Result<(), DatapathError> {
        let cgroup = File::open(&self.config.cgroup).map_err(|source| DatapathError::Cgroup {
            path: self.config.cgroup.clone(),
            source,
        })?;
        let links = self.links_dir();
        for name in SOCK_PROGRAMS {
            let path = links.join(name);
            let old = PinnedLink::from_pin(&path).ok();
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            // With bpf_link (every kernel we support) the kernel always allows
            // other programs beside ours and rejects explicit multi flags, so
            // the mode stays at its default.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = prog.take_link(id).map_err(program_err(name))?;
            let fd: FdLink = link.try_into().map_err(link_err(format!("{name} link")))?;
            if let Some(old) = old {
                let _ignored = std::fs::remove_file(&path);
                drop(old);
                tracing::info!(
                    program = name,
                    "took over the socket hook of a previous agent"
                );
            }
            fd.pin(&path)
                .map_err(pin_err(format!("pinning {}", path.display())))?;
            self.sock_pins.push((name, path));
        }
        tracing::info!(cgroup = %self.config.cgroup.display(), "socket hooks attached");
        Ok(())
    }

    /// Attaches the TC programs to pod devices that appeared and forgets the
    /// ones that went away (the kernel detaches a link when its device goes).
    /// Pod devices are those named `--pod-device-prefix*` and those a CNI
    /// endpoint record names (`registered`).
    pub fn sync_pod_devices(&mut self, registered: &std::collections::BTreeSet<String>) {
        let present: BTreeMap<String, u32> = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .filter_map(|i| {
                    let name = i.name().to_str().ok()?.to_owned();
                    (name.starts_with(&self.config.pod_device_prefix) || registered.contains(&name))
                        .then_some((name, i.index()))
                })
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "listing network devices");
                return;
            }
        };
        let gone: Vec<String> = self
            .devices
            .iter()
            .filter(|(name, links)| present.get(*name) != Some(&links.ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(links) = self.devices.remove(&name) {
                for pin in &links.pins {
                    let _ignored = std::fs::remove_file(pin);
                }
                tracing::info!(device = %name, "pod device removed");
            }
        }
        self.remove_stale_device_pins(&present);
        for (name, ifindex) in present {
            if self.devices.contains_key(&name) {
                continue;
            }
            match self.attach_device(&name, ifindex) {
                Ok(pins) => {
                    tracing::info!(device = %name, ifindex, "pod device attached");
                    self.devices.insert(name, DeviceLinks { ifindex, pins });
                }
                Err(err) => {
                    tracing::warn!(device = %name, error = %err, "attaching pod device; will retry")
                }
            }
        }
    }

    /// Pins of devices that no longer exist (removed while no agent ran).
    fn remove_stale_device_pins(&self, present: &BTreeMap<String, u32>) {
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix("tc_") else {
                continue;
            };
            let keep = present
                .iter()
                .any(|(name, ifindex)| rest.starts_with(&format!("{name}_{ifindex}_")));
            if !keep {
                let _ignored = std::fs::remove_file(e.path());
            }
        }
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(program_err(name))
    }

    /// Attaches `prog` to `device` through a link pinned at `path`; if a
    /// previous agent left a link there, swaps our program into it
    /// atomically instead (no moment without a program).
    fn attach_tc_pinned(
        &mut self,
        prog: &'static str,
        device: &str,
        dir: TcAttachType,
        path: &std::path::Path,
    ) -> Result<(), DatapathError> {
        match PinnedLink::from_pin(path) {
            Ok(old) => {
                let fd: FdLink = old.into();
                let link = SchedClassifierLink::try_from(fd)
                    .map_err(link_err(format!("{} link", path.display())))?;
                self.classifier(prog)?
                    .attach_to_link(link)
                    .map(drop)
                    .map_err(program_err(prog))
            }
            Err(_) => {
                let p = self.classifier(prog)?;
                let id = p.attach(device, dir).map_err(program_err(prog))?;
                let link = p.take_link(id).map_err(program_err(prog))?;
                let fd: FdLink = link.try_into().map_err(link_err(format!("{prog} link")))?;
                fd.pin(path)
                    .map(drop)
                    .map_err(pin_err(format!("pinning {}", path.display())))
            }
        }
    }

    /// Attaches (or takes over, atomically) both TC links of one device.
    fn attach_device(&mut self, device: &str, ifindex: u32) -> Result<[PathBuf; 2], DatapathError> {
        let links = self.links_dir();
        let mut pins = Vec::new();
        for (prog, dir, tag) in [
            (PROG_POD_FROM, TcAttachType::Ingress, "from"),
            (PROG_POD_TO, TcAttachType::Egress, "to"),
        ] {
            let path = links.join(format!("tc_{device}_{ifindex}_{tag}"));
            let result = self.attach_tc_pinned(prog, device, dir, &path);
            if let Err(e) = result {
                // Nothing half-attached: drop what this call pinned.
                for p in &pins {
                    let _ignored = std::fs::remove_file(p);
                }
                return Err(e);
            }
            pins.push(path);
        }
        let [from, to]: [PathBuf; 2] = pins
            .try_into()
            .map_err(|_| DatapathError::MissingProgram(PROG_POD_TO))?;
        Ok([from, to])
    }

    /// Takes the whole datapath out: removes every link pin, so the kernel
    /// detaches each program once this agent lets go. Maps stay pinned.
    /// Returns how many links were released.
    pub fn detach_all(&mut self) -> usize {
        let mut detached = 0;
        let pins: Vec<PathBuf> = std::mem::take(&mut self.devices)
            .into_values()
            .flat_map(|d| d.pins)
            .chain(
                std::mem::take(&mut self.sock_pins)
                    .into_iter()
                    .map(|(_, p)| p),
            )
            .collect();
        for pin in pins {
            // Open the link before unpinning it: dropping the pin alone frees
            // the link from a kernel work queue, some time later; closing the
            // last file descriptor detaches it before `close` returns.
            let result = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|link| link.unpin().map_err(|e| e.to_string()));
            match result {
                Ok(fd) => {
                    drop(fd);
                    detached += 1;
                }
                Err(err) => {
                    tracing::warn!(pin = %pin.display(), error = %err, "releasing link");
                    let _ignored = std::fs::remove_file(&pin);
                }
            }
        }
        detached
    }

    /// What is attached right now.
    pub fn status(&self) -> Status {
        Status {
            node: self.config.node.clone(),
            pin_dir: self.config.pin_dir(),
            cgroup: self.config.cgroup.clone(),
            socket_hooks: self
                .sock_pins
                .iter()
                .map(|(n, _)| (*n).to_owned())
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(name, l)| AttachedDevice {
                    name: name.clone(),
                    ifindex: l.ifindex,
                })
                .collect(),
            loaded_at_unix: self.loaded_at_unix,
            lb: None,
            node_facts: None,
            external_attached: self.external.is_some(),
            endpoints: Vec::new(),
            cluster: None,
            source_updates: 0,
            errors: Vec::new(),
        }
    }
}
