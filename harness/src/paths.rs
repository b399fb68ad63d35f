//! Where things are: the repository this binary was built from, the reference environment
//! (the Python venv) and the `references/` directory.

use std::path::{Path, PathBuf};

/// Where the reference environment is: `$LOCKSTEP_VENV`, else `.venv` in the repository.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => repo_dir().join(".venv"),
    }
}

/// The repository this binary was built from.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("harness/ has a parent").to_path_buf()
}

/// The `references/` directory: `$LOCKSTEP_REFERENCES`, else the repository's.
pub fn references_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_REFERENCES") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => repo_dir().join("references"),
    }
}


/// The directory of the model store: `$LOCKSTEP_MODELS`, else `~/.cache/lockstep/models`
/// (`make models` fills it: scripts/fetch_models.sh).
pub fn models_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_MODELS") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/")).join(".cache/lockstep/models"),
    }
}
