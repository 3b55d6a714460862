//! The allocation file of one network: `<stateDir>/<network>.json`, changed
//! only under an exclusive `flock` on `<stateDir>/<network>.lock`, written
//! by rename so a reader never sees half a file. Concurrent ADDs (kubelet
//! starts several pods at once) therefore never hand out one address twice.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::Allocations;
use crate::CniError;

/// How long to wait for another invocation to finish with the file before
/// answering "try again later" (code 11): a held lock means a plugin is
/// working on this network, never minutes.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

const LOCK_POLL: Duration = Duration::from_millis(5);

/// A network's allocation file.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    network: String,
}

impl Store {
    /// `network` must already be a valid network name (it names files).
    pub fn new(state_dir: &Path, network: &str) -> Self {
        Self {
            dir: state_dir.to_owned(),
            network: network.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.network))
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.network))
    }

    /// The current state (empty when nothing was ever allocated). Needs no
    /// lock: the file is only ever replaced whole.
    pub fn read(&self) -> Result<Allocations, CniError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CniError::Decode {
                what: format!(
                    "allocation file {} is corrupt (fix it, or remove it after deleting this node's pods)",
                    path.display()
                ),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::new()),
            Err(e) => Err(CniError::io("reading allocation file", &path)(e)),
        }
    }

    fn lock(&self) -> Result<Flock<File>, CniError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(CniError::io("creating state directory", &self.dir))?;
        let path = self.lock_path();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(CniError::io("opening lock file", &path))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(LOCK_POLL);
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(CniError::TryAgain {
                        what: format!(
                            "another meshless-cni holds {} for more than {}s",
                            path.display(),
                            LOCK_TIMEOUT.as_secs()
                        ),
                    });
                }
                Err((_, errno)) => {
                    return Err(CniError::io("locking", &path)(std::io::Error::from(errno)));
                }
            }
        }
    }

    /// Runs `change` on the state under the lock and saves the result when
    /// it succeeds; on error nothing is written.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Allocations) -> Result<T, CniError>,
    ) -> Result<T, CniError> {
        let _lock = self.lock()?;
        let mut state = self.read()?;
        let out = change(&mut state)?;
        self.write(&state)?;
        Ok(out)
    }

    fn write(&self, state: &Allocations) -> Result<(), CniError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{}.json.tmp", self.network));
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| CniError::Decode {
            what: "encoding the allocation file".into(),
            why: e.to_string(),
        })?;
        write_replace(&tmp, &path, &bytes)
    }
}

/// Writes `bytes` to `tmp`, syncs and renames it over `path`.
pub(crate) fn write_replace(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), CniError> {
    let result = File::create(tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.write_all(b"\n")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(tmp, path));
    result.map_err(|e| {
        let _ignored = std::fs::remove_file(tmp);
        CniError::io("writing", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Cidr;
    use crate::error::code;
    use crate::ipam::Pool;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshless-cni-{tag}-{}", std::process::id()));
        let _ignored = std::fs::remove_dir_all(&d);
        d
    }

    fn pools() -> Vec<Pool> {
        let c: Cidr = "198.18.17.0/24".parse().expect("cidr");
        vec![Pool::new(c, c.first_host())]
    }

    #[test]
    fn updates_persist_and_failed_updates_do_not() {
        let dir = tempdir("store");
        let s = Store::new(&dir, "meshless");
        assert_eq!(s.read().expect("missing file is empty"), Allocations::new());
        let a = s
            .update(|st| st.allocate("meshless", &pools(), "c1", "eth0", "ml1"))
            .expect("allocate");
        assert_eq!(s.read().expect("read").find("c1", "eth0"), Some(&a));
        let e = s
            .update(|st| st.allocate("meshless", &pools(), "c1", "eth0", "ml1"))
            .expect_err("twice");
        assert_eq!(e.code(), code::ALREADY_ADDED);
        assert_eq!(s.read().expect("read").allocations.len(), 1);
        std::fs::write(s.path(), b"{broken").expect("corrupt it");
        let e = s.read().expect_err("corrupt");
        assert_eq!(e.code(), code::DECODE_FAILURE);
        assert!(e.to_string().contains("meshless.json"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn concurrent_updates_never_share_an_address() {
        let dir = tempdir("race");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = Store::new(&dir, "meshless");
                std::thread::spawn(move || {
                    s.update(|st| {
                        st.allocate(
                            "meshless",
                            &pools(),
                            &format!("c{i}"),
                            "eth0",
                            &format!("ml{i}"),
                        )
                    })
                    .expect("allocate")
                    .addresses[0]
                })
            })
            .collect();
        let mut got: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 8, "addresses: {got:?}");
        assert_eq!(
            Store::new(&dir, "meshless")
                .read()
                .expect("read")
                .allocations
                .len(),
            8
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
