//! Loading, pinning, attaching and detaching the embedded eBPF programs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::Config;
use crate::status::{AttachedDevice, Status};

/// The datapath object built by build.rs from bpf/datapath.
static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless-datapath"));

const PROG_POD_FROM: &str = "pod_from";
const PROG_POD_TO: &str = "pod_to";
const PROG_CONNECT4: &str = "sock_connect4";
const PROG_CONNECT6: &str = "sock_connect6";

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
    from: aya::programs::tc::SchedClassifierLinkId,
    to: aya::programs::tc::SchedClassifierLinkId,
}

/// The loaded datapath of one node.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    config: Config,
    devices: BTreeMap<String, DeviceLinks>,
    cgroup_links: Vec<(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    )>,
    loaded_at_unix: u64,
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
        std::fs::create_dir_all(&pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(DATAPATH_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [PROG_POD_FROM, PROG_POD_TO] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            prog.load().map_err(program_err(name))?;
        }
        for name in [PROG_CONNECT4, PROG_CONNECT6] {
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
            cgroup_links: Vec::new(),
            loaded_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Attaches the connect hooks to the node's cgroup (and so to every pod
    /// cgroup below it).
    pub fn attach_cgroup(&mut self) -> Result<(), DatapathError> {
        let cgroup = File::open(&self.config.cgroup).map_err(|source| DatapathError::Cgroup {
            path: self.config.cgroup.clone(),
            source,
        })?;
        for name in [PROG_CONNECT4, PROG_CONNECT6] {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            // With bpf_link (every kernel we support) the kernel always allows
            // other programs beside ours and rejects explicit multi flags, so
            // the mode stays at its default.
            let link = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            self.cgroup_links.push((name, link));
        }
        tracing::info!(cgroup = %self.config.cgroup.display(), "socket hooks attached");
        Ok(())
    }

    /// Attaches the TC programs to pod devices that appeared and forgets the
    /// ones that went away (the kernel detaches a link when its device goes).
    pub fn sync_pod_devices(&mut self) {
        let present: BTreeMap<String, u32> = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .filter_map(|i| {
                    let name = i.name().to_str().ok()?.to_owned();
                    name.starts_with(&self.config.pod_device_prefix)
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
                // The device (or its ifindex) is gone, so the kernel already
                // dropped the attachment; release our handles quietly.
                self.release_device(&name, links);
                tracing::info!(device = %name, "pod device removed");
            }
        }
        for (name, ifindex) in present {
            if self.devices.contains_key(&name) {
                continue;
            }
            match self.attach_device(&name) {
                Ok((from, to)) => {
                    tracing::info!(device = %name, ifindex, "pod device attached");
                    self.devices.insert(name, DeviceLinks { ifindex, from, to });
                }
                Err(err) => {
                    tracing::warn!(device = %name, error = %err, "attaching pod device; will retry")
                }
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

    fn attach_device(
        &mut self,
        device: &str,
    ) -> Result<
        (
            aya::programs::tc::SchedClassifierLinkId,
            aya::programs::tc::SchedClassifierLinkId,
        ),
        DatapathError,
    > {
        let from = self
            .classifier(PROG_POD_FROM)?
            .attach(device, TcAttachType::Ingress)
            .map_err(program_err(PROG_POD_FROM))?;
        match self
            .classifier(PROG_POD_TO)?
            .attach(device, TcAttachType::Egress)
            .map_err(program_err(PROG_POD_TO))
        {
            Ok(to) => Ok((from, to)),
            Err(err) => {
                // Nothing half-attached: undo the ingress side.
                if let Ok(prog) = self.classifier(PROG_POD_FROM) {
                    let _ignored = prog.detach(from);
                }
                Err(err)
            }
        }
    }

    fn release_device(&mut self, name: &str, links: DeviceLinks) -> usize {
        let mut detached = 0;
        for (prog, link) in [(PROG_POD_FROM, links.from), (PROG_POD_TO, links.to)] {
            match self.classifier(prog).map(|p| p.detach(link)) {
                Ok(Ok(())) => detached += 1,
                Ok(Err(err)) => {
                    tracing::debug!(device = %name, program = prog, error = %err, "detach")
                }
                Err(err) => tracing::debug!(device = %name, program = prog, error = %err, "detach"),
            }
        }
        detached
    }

    /// Detaches every program this agent attached; returns how many links it
    /// released. Pinned maps stay, so the next agent adopts their state.
    pub fn detach_all(&mut self) -> usize {
        let mut detached = 0;
        let devices = std::mem::take(&mut self.devices);
        for (name, links) in devices {
            detached += self.release_device(&name, links);
        }
        for (name, link) in std::mem::take(&mut self.cgroup_links) {
            let result = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))
                .and_then(|p| <&mut CgroupSockAddr>::try_from(p).map_err(program_err(name)))
                .map(|p| p.detach(link));
            match result {
                Ok(Ok(())) => detached += 1,
                Ok(Err(err)) => {
                    tracing::warn!(program = name, error = %err, "detaching socket hook")
                }
                Err(err) => tracing::warn!(program = name, error = %err, "detaching socket hook"),
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
                .cgroup_links
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
        }
    }
}
