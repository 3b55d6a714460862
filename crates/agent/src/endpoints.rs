//! This node's endpoints: what meshless-cni registered (one record per
//! container under `--endpoints-dir`), joined with the node's Pods from the
//! API. The records say which host device and addresses a pod has; the Pod
//! says what the pod is (labels, phase) — the input identities and policy
//! will need. The datapath attaches to every device a record names.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Pod;
use meshless_cni::endpoint::Endpoint as CniRecord;

/// One container on this node as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalEndpoint {
    pub container_id: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub host_device: String,
    /// The Pod this record belongs to exists in the API (or the manifests)
    /// and is bound to this node. False for a record the CNI left behind
    /// for a pod that is gone (a missed DEL), or before the watch caught up.
    pub in_api: bool,
    /// `status.phase` of that Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The Pod has a `metadata.deletionTimestamp`: it is terminating.
    pub terminating: bool,
}

/// Joins CNI records with Pods. A record matches a Pod by namespace and
/// name (`K8S_POD_*` the runtime passed); records without those never match.
pub fn join(records: &[CniRecord], pods: &[Pod], node: &str) -> Vec<LocalEndpoint> {
    let by_name: BTreeMap<(&str, &str), &Pod> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| {
            Some((
                (
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ),
                p,
            ))
        })
        .collect();
    let mut out: Vec<LocalEndpoint> = records
        .iter()
        .map(|r| {
            let pod = match (r.namespace.as_deref(), r.pod.as_deref()) {
                (Some(ns), Some(name)) => by_name.get(&(ns, name)).copied(),
                _ => None,
            };
            LocalEndpoint {
                container_id: r.container_id.clone(),
                namespace: r.namespace.clone(),
                pod: r.pod.clone(),
                addresses: r.addresses.clone(),
                host_device: r.host_device.clone(),
                in_api: pod.is_some(),
                phase: pod.and_then(|p| p.status.as_ref()?.phase.clone()),
                terminating: pod.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.namespace, &a.pod, &a.container_id).cmp(&(&b.namespace, &b.pod, &b.container_id))
    });
    out
}

/// The records in a directory, re-read only when a file's mtime or size
/// changes (the CNI writes each by rename, so a file is never half there).
#[derive(Debug)]
pub struct RecordDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, Result<CniRecord, String>)>,
    /// The valid records and the messages for invalid files, as of the last
    /// scan that changed anything.
    records: Vec<CniRecord>,
    errors: Vec<String>,
    /// A directory that could not be listed (not a missing one).
    unreadable: Option<String>,
}

/// A file's mtime and size: when both are unchanged, so is the record.
type Stamp = (SystemTime, u64);

impl RecordDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            records: Vec::new(),
            errors: Vec::new(),
            unreadable: None,
        }
    }

    /// Valid records as of the last [`RecordDir::scan`].
    pub fn records(&self) -> &[CniRecord] {
        &self.records
    }

    /// One message per file that is not a valid record (named, never
    /// fatal), or for a directory that cannot be listed.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Lists the directory and re-reads the files that changed. Returns
    /// whether the records or errors changed. A missing directory is an
    /// empty node: the CNI creates it with the first pod. An unreadable one
    /// keeps the records read before.
    pub fn scan(&mut self) -> bool {
        let paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "json")
                        && !p
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                let msg = format!(
                    "reading CNI endpoint records in {}: {e}",
                    self.dir.display()
                );
                let changed = self.unreadable.as_ref() != Some(&msg);
                if changed {
                    tracing::warn!(error = %msg, "CNI endpoint records");
                    self.errors = vec![msg.clone()];
                }
                self.unreadable = Some(msg);
                return changed;
            }
        };
        let mut changed = self.unreadable.take().is_some();
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        changed |= self.files.len() != before;
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.files.get(&path).is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CniRecord>(&b).map_err(|e| e.to_string()))
                .map_err(|e| {
                    format!(
                        "CNI endpoint record {}: {e}; ignored (meshless-cni writes these)",
                        path.display()
                    )
                });
            if let Err(e) = &parsed {
                tracing::warn!(error = %e, "CNI endpoint record");
            }
            self.files.insert(path, (stamp, parsed));
            changed = true;
        }
        if changed {
            self.records = self
                .files
                .values()
                .filter_map(|(_, r)| r.as_ref().ok().cloned())
                .collect();
            self.errors = self
                .files
                .values()
                .filter_map(|(_, r)| r.as_ref().err().cloned())
                .collect();
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ns: Option<&str>, pod: Option<&str>, dev: &str) -> CniRecord {
        CniRecord {
            container_id: id.into(),
            namespace: ns.map(Into::into),
            pod: pod.map(Into::into),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            host_device: dev.into(),
            addresses: vec!["198.18.17.2".parse().expect("ip")],
        }
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod")
    }

    #[test]
    fn joins_records_with_this_nodes_pods() {
        let pods = [
            pod(
                "metadata: {name: web-1, namespace: default}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running}\n",
            ),
            pod(
                "metadata: {name: web-2, namespace: default, deletionTimestamp: '2026-01-01T00:00:00Z'}\nspec: {nodeName: n1, containers: []}\n",
            ),
            pod(
                "metadata: {name: web-3, namespace: default}\nspec: {nodeName: n2, containers: []}\n",
            ),
        ];
        let records = [
            record("c3", Some("default"), Some("web-3"), "mlc3"),
            record("c1", Some("default"), Some("web-1"), "mlc1"),
            record("c2", Some("default"), Some("web-2"), "mlc2"),
            record("c0", None, None, "mlc0"),
        ];
        let eps = join(&records, &pods, "n1");
        let got: Vec<(&str, bool, Option<&str>, bool)> = eps
            .iter()
            .map(|e| {
                (
                    e.container_id.as_str(),
                    e.in_api,
                    e.phase.as_deref(),
                    e.terminating,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("c0", false, None, false),
                ("c1", true, Some("Running"), false),
                ("c2", true, None, true),
                ("c3", false, None, false),
            ],
            "web-3 is bound to n2, so its record here is a leftover"
        );
    }

    #[test]
    fn a_bad_record_is_named_and_the_others_kept() {
        let dir = std::env::temp_dir().join(format!("ml-agent-eps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut rd = RecordDir::new(&dir);
        assert!(!rd.scan(), "no directory yet: no pods, nothing changed");
        assert!(rd.records().is_empty() && rd.errors().is_empty());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let good = record("c1", Some("default"), Some("web-1"), "mlc1");
        std::fs::write(
            dir.join("c1.json"),
            serde_json::to_vec(&good).expect("json"),
        )
        .expect("write");
        std::fs::write(dir.join("c2.json"), b"{not json").expect("write");
        std::fs::write(dir.join(".c3.json.tmp"), b"half").expect("write");
        assert!(rd.scan(), "two new files");
        assert_eq!(rd.records(), [good]);
        let errors = rd.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("c2.json"), "{errors:?}");
        assert!(!rd.scan(), "nothing changed: nothing re-read");
        std::fs::remove_file(dir.join("c1.json")).expect("rm");
        assert!(rd.scan(), "a removal is a change");
        assert!(rd.records().is_empty(), "a removed record is gone");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
