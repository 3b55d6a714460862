//! `cargo xtask codegen`: writes files generated from Rust types, so that
//! what is committed is what the code says.
//!
//! | output | from | how |
//! |---|---|---|
//! | `charts/meshless/crds/<crd name>.yaml` | `crates/operator/src/crd/` (kube-derive) | `meshless-operator print-crds` |
//!
//! The CRD YAML comes from running the operator binary rather than from a
//! library call, so that xtask does not depend on kube and the operator
//! crate. `--check` changes nothing and fails naming every stale file; the
//! operator's unit tests carry the same check for `cargo test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Change nothing; fail (exit 1) naming each file that is out of date.
    #[arg(long)]
    check: bool,
}

/// Where Helm picks up CRDs (installed as-is, before the templates).
const CRD_DIR: &str = "charts/meshless/crds";

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = util::root();
    let yaml = operator_crds()?;
    let files = split_crds(&yaml)?;
    let dir = root.join(CRD_DIR);
    let mut stale: Vec<String> = Vec::new();
    for (name, text) in &files {
        let path = dir.join(name);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(text.as_str()) {
            continue;
        }
        if args.check {
            stale.push(format!("{CRD_DIR}/{name}"));
        } else {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {CRD_DIR}/{name}");
        }
    }
    // A CRD that no type renders any more must not be installed by Helm.
    for name in existing(&dir)? {
        if files.contains_key(&name) {
            continue;
        }
        if args.check {
            stale.push(format!("{CRD_DIR}/{name} (no CRD type renders it)"));
        } else {
            let path = dir.join(&name);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            println!("removed {CRD_DIR}/{name}");
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated files are stale: {}; run `cargo xtask codegen` and commit the result",
            stale.join(", ")
        );
    }
    if args.check {
        println!("{} generated file(s) up to date", files.len());
    }
    Ok(())
}

/// `meshless-operator print-crds`, built and run by cargo.
fn operator_crds() -> anyhow::Result<String> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "meshless-operator",
        "--",
        "print-crds",
    ])
    .current_dir(util::root());
    let shown = util::show(&cmd);
    let out = cmd
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

/// Splits the operator's multi-document YAML on its `---` lines into
/// file name (`<metadata.name>.yaml`) -> text. Each document keeps its
/// header comment, so a file is exactly one rendered CRD.
fn split_crds(yaml: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut docs: Vec<String> = vec![String::new()];
    for line in yaml.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
        }
    }
    let mut files = BTreeMap::new();
    for doc in docs.into_iter().filter(|d| !d.trim().is_empty()) {
        let v: serde_yaml::Value = serde_yaml::from_str(&doc)
            .context("the operator printed a document that is not YAML")?;
        let Some(name) = v["metadata"]["name"].as_str() else {
            bail!("the operator printed a CRD without metadata.name:\n{doc}");
        };
        let file = format!("{name}.yaml");
        if files.insert(file.clone(), doc).is_some() {
            bail!("the operator printed two CRDs named {name}");
        }
    }
    if files.is_empty() {
        bail!("the operator printed no CRD");
    }
    Ok(files)
}

/// Every file in `dir` (none if it does not exist): Helm would install
/// any of them, so any that no type renders is stale.
fn existing(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let path: PathBuf = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_into_files_by_name() {
        let yaml = "# header\napiVersion: v1\nmetadata:\n  name: a.meshless.dev\n---\n# header\nmetadata:\n  name: b.meshless.dev\n";
        let files = split_crds(yaml).expect("splits");
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["a.meshless.dev.yaml", "b.meshless.dev.yaml"]
        );
        assert_eq!(
            files["a.meshless.dev.yaml"],
            "# header\napiVersion: v1\nmetadata:\n  name: a.meshless.dev\n"
        );
        assert!(split_crds("").is_err());
        assert!(split_crds("metadata: {}\n").is_err());
    }
}
