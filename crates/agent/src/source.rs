//! Where cluster objects come from. The compilers only see
//! [`ClusterObjects`]; a source decides when they changed.
//!
//! Three sources exist: the Kubernetes API ([`KubeSource`]), a directory of
//! Kubernetes manifests (standalone use, benchmarks) and an in-process
//! handle (tests).
//!
//! Adding a kind (NetworkPolicy, a Meshless CRD, a Gateway API route) is one
//! more field in [`ClusterObjects`], one more arm in [`parse_manifests`] and
//! one more reflector in [`KubeSource::start`]; nothing else changes.

mod kube;

pub use self::kube::KubeSource;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The cluster objects the agent works from.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Pods bound to this node (the Kubernetes source watches only those;
    /// a manifest directory may hold others, which the agent filters).
    pub pods: Vec<Pod>,
    /// Every Node: this node's own object gives its addresses, pod CIDRs
    /// and zone when no flag does.
    pub nodes: Vec<Node>,
    /// Every Namespace (their labels select peers in policies).
    pub namespaces: Vec<Namespace>,
}

impl ClusterObjects {
    /// A fingerprint of what the load-balancing compiler reads (Services
    /// and EndpointSlices): equal fingerprints compile to equal entries, so
    /// churn in other kinds (pods starting, node heartbeats) costs no
    /// recompile.
    pub fn lb_fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        fn add<K: ::kube::Resource + serde::Serialize>(h: &mut impl std::hash::Hasher, all: &[K]) {
            all.len().hash(h);
            for o in all {
                let m = o.meta();
                match (&m.uid, &m.resource_version) {
                    (Some(uid), Some(rv)) => (uid, rv).hash(h),
                    // Manifests carry neither: hash the object itself.
                    _ => serde_json::to_string(o).unwrap_or_default().hash(h),
                }
            }
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        add(&mut h, &self.services);
        add(&mut h, &self.slices);
        h.finish()
    }
}

/// A source of cluster objects.
pub trait Source: Send {
    /// Returns the full current set when it changed since the last call,
    /// with the problems found reading it (which never drop objects that
    /// were read fine before).
    fn poll(&mut self) -> Option<(ClusterObjects, Vec<String>)>;
}

/// Objects read from one file, remembered so a file that becomes
/// unreadable keeps its last good content.
#[derive(Debug, Clone, Default)]
struct FileObjects {
    stamp: Option<(SystemTime, u64)>,
    objects: ClusterObjects,
    error: Option<String>,
}

/// Every `*.yaml`, `*.yml` and `*.json` file in a directory: multi-document
/// YAML of v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Pod, v1 Node
/// and v1 Namespace objects. Other kinds are ignored. Files are re-read
/// when their mtime or size changes.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileObjects>,
    primed: bool,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            primed: false,
        }
    }
}

fn is_manifest(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// Parses one manifest file's text. An error names the file, the document
/// and what was wrong; a broken document fails the whole file so that a
/// half-written file never half-applies.
pub fn parse_manifests(text: &str, origin: &str) -> Result<ClusterObjects, String> {
    use serde::Deserialize as _;
    let mut out = ClusterObjects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| format!("{origin}: document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<no metadata.name>")
            .to_owned();
        let what = format!("{origin}: document {} ({kind} {name})", i + 1);
        match (api, kind) {
            ("v1", "Service") => out
                .services
                .push(serde_yaml::from_value(value).map_err(|e| format!("{what}: {e}"))?),
            ("discovery.k8s.io/v1", "EndpointSlice") => out
                .slices
                .push(serde_yaml::from_value(value).map_err(|e| format!("{what}: {e}"))?),
            ("v1", "Pod") => out
                .pods
                .push(serde_yaml::from_value(value).map_err(|e| format!("{what}: {e}"))?),
            ("v1", "Node") => out
                .nodes
                .push(serde_yaml::from_value(value).map_err(|e| format!("{what}: {e}"))?),
            ("v1", "Namespace") => out
                .namespaces
                .push(serde_yaml::from_value(value).map_err(|e| format!("{what}: {e}"))?),
            ("", _) | (_, "") => return Err(format!("{what}: missing apiVersion or kind")),
            _ => tracing::debug!(%what, "ignoring kind the agent does not use"),
        }
    }
    Ok(out)
}

impl Source for ManifestDir {
    fn poll(&mut self) -> Option<(ClusterObjects, Vec<String>)> {
        let mut changed = !self.primed;
        self.primed = true;
        let mut seen = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_manifest(p))
                .collect::<Vec<_>>(),
            Err(e) => {
                let msg = format!("reading manifest directory {}: {e}", self.dir.display());
                // Keep what we had: a vanished directory is not "delete everything".
                return changed.then(|| (self.merged(), vec![msg]));
            }
        };
        for path in entries {
            seen.push(path.clone());
            let stamp = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            let entry = self.files.entry(path.clone()).or_default();
            if entry.stamp == stamp && stamp.is_some() {
                continue;
            }
            changed = true;
            entry.stamp = stamp;
            match std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|t| parse_manifests(&t, &path.display().to_string()))
            {
                Ok(objects) => {
                    entry.objects = objects;
                    entry.error = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifest rejected; keeping its last good content");
                    entry.error = Some(e);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        changed |= self.files.len() != before;
        changed.then(|| {
            (
                self.merged(),
                self.files
                    .values()
                    .filter_map(|f| f.error.clone())
                    .collect(),
            )
        })
    }
}

impl ManifestDir {
    fn merged(&self) -> ClusterObjects {
        let mut all = ClusterObjects::default();
        for f in self.files.values() {
            all.services.extend(f.objects.services.iter().cloned());
            all.slices.extend(f.objects.slices.iter().cloned());
            all.pods.extend(f.objects.pods.iter().cloned());
            all.nodes.extend(f.objects.nodes.iter().cloned());
            all.namespaces.extend(f.objects.namespaces.iter().cloned());
        }
        all
    }
}

/// A handle tests (and embedders) use to feed objects straight in.
#[derive(Debug, Clone, Default)]
pub struct InProcess {
    inner: Arc<Mutex<(u64, ClusterObjects)>>,
    seen: u64,
}

impl InProcess {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the current objects; the next poll returns them.
    pub fn set(&self, objects: ClusterObjects) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0 += 1;
        g.1 = objects;
    }
}

impl Source for InProcess {
    fn poll(&mut self) -> Option<(ClusterObjects, Vec<String>)> {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (g.0 != self.seen).then(|| {
            self.seen = g.0;
            (g.1.clone(), Vec::new())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n";

    #[test]
    fn parses_multi_document_yaml_and_ignores_other_kinds() {
        let text =
            format!("{SVC}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n");
        let o = parse_manifests(&text, "f.yaml").expect("parses");
        assert_eq!(o.services.len(), 1);
        assert!(o.slices.is_empty());
    }

    #[test]
    fn parses_pods_nodes_and_namespaces() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\nspec: {nodeName: n1, containers: []}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [198.18.17.0/24]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {team: a}}\n";
        let o = parse_manifests(text, "f.yaml").expect("parses");
        assert_eq!((o.pods.len(), o.nodes.len(), o.namespaces.len()), (1, 1, 1));
        let err = parse_manifests(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n9}\nspec: {podCIDRs: 3}\n",
            "n.yaml",
        )
        .expect_err("podCIDRs must be a list");
        assert!(err.contains("n.yaml") && err.contains("Node n9"), "{err}");
    }

    #[test]
    fn lb_fingerprint_ignores_other_kinds_and_sees_service_changes() {
        let a = parse_manifests(SVC, "a").expect("parses");
        let mut b = a.clone();
        b.pods = parse_manifests(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
            "p",
        )
        .expect("pod")
        .pods;
        assert_eq!(a.lb_fingerprint(), b.lb_fingerprint());
        let c = parse_manifests(&SVC.replace("port: 80", "port: 81"), "c").expect("parses");
        assert_ne!(a.lb_fingerprint(), c.lb_fingerprint());
        let mut d = a.clone();
        d.services[0].metadata.uid = Some("u".into());
        d.services[0].metadata.resource_version = Some("1".into());
        let mut e = d.clone();
        e.services[0].metadata.resource_version = Some("2".into());
        assert_ne!(d.lb_fingerprint(), e.lb_fingerprint());
    }

    #[test]
    fn a_bad_document_names_file_document_and_object() {
        let text = format!(
            "{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: broken}}\nspec: {{ports: 7}}\n"
        );
        let err = parse_manifests(&text, "svc.yaml").expect_err("spec.ports must be a list");
        assert!(
            err.contains("svc.yaml") && err.contains("document 2") && err.contains("broken"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = std::env::temp_dir().join(format!("ml-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let f = dir.join("a.yaml");
        std::fs::write(&f, SVC).expect("write");
        let mut src = ManifestDir::new(&dir);
        let (objs, errs) = src.poll().expect("first poll reports");
        assert_eq!((objs.services.len(), errs.len()), (1, 0));
        assert!(src.poll().is_none(), "unchanged -> nothing");
        std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: [oops\n").expect("write");
        let (objs, errs) = src.poll().expect("change reported");
        assert_eq!(objs.services.len(), 1, "last good content kept");
        assert_eq!(errs.len(), 1, "{errs:?}");
        std::fs::remove_file(&f).expect("rm");
        let (objs, _) = src.poll().expect("removal reported");
        assert!(objs.services.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn in_process_reports_each_change_once() {
        let h = InProcess::new();
        let mut src = h.clone();
        assert!(src.poll().is_none(), "nothing set yet");
        h.set(ClusterObjects::default());
        assert!(src.poll().is_some());
        assert!(src.poll().is_none());
    }
}
