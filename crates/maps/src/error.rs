use std::path::PathBuf;

/// Errors from opening or reading pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "pinned map {path} not found: is meshless-agent running on this node (or was it ever)?"
    )]
    NotPinned { path: PathBuf },
    #[error("opening pinned map {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "map {name} is full (capacity {capacity}); raise its size in the agent config \
         or reduce what is installed; nothing of this change was applied"
    )]
    Full { name: &'static str, capacity: u32 },
    #[error("writing map {name}: {source}")]
    Write {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}
