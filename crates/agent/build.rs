//! Builds bpf/datapath for the BPF target with the pinned nightly (bpf/TOOLCHAIN)
//! and leaves the object in OUT_DIR, where src/datapath.rs embeds it.
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).join("../..");
    let toolchain_file = root.join("bpf/TOOLCHAIN");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let toolchain = toolchain.trim();
    let datapath = root.join("bpf/datapath");
    let datapath = datapath
        .canonicalize()
        .with_context(|| format!("{} is missing", datapath.display()))?;
    let datapath = datapath
        .to_str()
        .context("non-UTF-8 path to bpf/datapath")?;
    // aya-build relays every line the nested cargo prints as a cargo warning,
    // which cargo then replays on every build; keep the nested cargo quiet
    // so only real diagnostics show.
    // SAFETY: build scripts are single-threaded here; nothing reads the
    // environment concurrently.
    #[allow(unsafe_code, reason = "std::env::set_var is unsafe in edition 2024")]
    unsafe {
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "meshless-datapath",
            root_dir: datapath,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
    .with_context(|| {
        format!("building the eBPF datapath with {toolchain} failed; `cargo xtask setup` installs the toolchain, rust-src and bpf-linker")
    })
}
