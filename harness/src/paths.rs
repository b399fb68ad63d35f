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

/// Writes `data` to `path` through a temporary file in the same directory and a rename: an
/// interrupted or killed run leaves the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), crate::error::HarnessError> {
    let io = |p: &Path, e: std::io::Error| crate::error::HarnessError::Io { path: p.display().to_string(), message: e.to_string() };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, e)
    })
}

/// `-` as an output path (`--json -`, `--junit -`): standard output.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Writes a report file: to standard output when `path` is `-` (the command line then sends
/// its human output to stderr), else as [`write_atomic`]. A closed pipe is no error (the
/// reader has what it wanted).
pub fn write_output(path: &Path, data: &[u8]) -> Result<(), crate::error::HarnessError> {
    use std::io::Write as _;
    if !is_stdout(path) {
        return write_atomic(path, data);
    }
    let mut o = std::io::stdout().lock();
    match o.write_all(data).and_then(|_| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(crate::error::HarnessError::Io { path: "standard output".into(), message: e.to_string() })
        }
        _ => Ok(()),
    }
}
