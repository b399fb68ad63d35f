//! Where things are. A `lockstep` binary runs either from the checkout it was built in (its
//! target directory: `cargo build`, `cargo test`) or installed (`cargo install --path
//! harness`, a copied binary), and finds each thing in this order:
//!
//! | what | lookup order |
//! |---|---|
//! | Python references | `$LOCKSTEP_REFERENCES`; the checkout's `references/`; the copy embedded in the binary |
//! | fixtures and adapters (`tiny`, …) | the checkout's `snapshots/`; the copy embedded in the binary |
//! | reference environment | `$LOCKSTEP_VENV`; the checkout's `.venv`; `~/.cache/lockstep/venv` |
//! | traces | `$LOCKSTEP_TRACES`; the checkout's `snapshots/traces`; `$XDG_DATA_HOME/lockstep/traces` (`~/.local/share/lockstep/traces`) |
//! | model store | `$LOCKSTEP_MODELS`; `~/.cache/lockstep/models` |
//!
//! The embedded copy is written once to `~/.cache/lockstep/embedded/VERSION-BUNDLE/`
//! (`crate::embedded`), with the checkout's layout. docs/install.md is the user's page of it.

use std::path::{Path, PathBuf};

/// The checkout this binary runs from: the repository it was built from, when the running
/// executable lives in the target directory of that build (so `cargo install`ed or copied
/// binaries never read the directory they were compiled in) and the repository is still there.
pub fn checkout_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
        // OUT_DIR is TARGET/PROFILE/build/lockstep-HASH/out: the profile directory holds the
        // binary, the test executables (deps/) and the examples.
        let profile = Path::new(env!("OUT_DIR")).ancestors().nth(3)?;
        let exe = std::fs::canonicalize(std::env::current_exe().ok()?).ok()?;
        let profile = std::fs::canonicalize(profile).ok()?;
        (exe.starts_with(&profile) && repo.join("references/protocol.py").is_file()).then_some(repo)
    })
    .clone()
}

/// Where lockstep's own files are read from (references, fixtures, adapters, setup script,
/// with the checkout's layout): the checkout this binary runs from, else the copy embedded in
/// the binary. Paths that traces and suites give relative (`snapshots/models/tiny-llama`,
/// `snapshots/adapters/tiny-peft`) are relative to it.
pub fn data_dir() -> PathBuf {
    if let Some(c) = checkout_dir() {
        return c;
    }
    match crate::embedded::dir() {
        Ok(d) => d,
        Err(e) => {
            // Reported once; what then fails to open names the path it expected.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("warning: {e}"));
            crate::embedded::target_dir()
        }
    }
}

/// Where the reference environment is: `$LOCKSTEP_VENV`, else the checkout's `.venv` (what
/// `make setup` creates), else `~/.cache/lockstep/venv`.
pub fn venv_dir() -> PathBuf {
    venv_source().0
}

/// The reference environment's directory, and what chose it (for `lockstep doctor`).
pub fn venv_source() -> (PathBuf, &'static str) {
    match std::env::var_os("LOCKSTEP_VENV") {
        Some(v) if !v.is_empty() => (PathBuf::from(v), "$LOCKSTEP_VENV"),
        _ => match checkout_dir() {
            Some(c) => (c.join(".venv"), "the checkout's"),
            None => (home().join(".cache/lockstep/venv"), "the default"),
        },
    }
}

/// The `references/` directory: `$LOCKSTEP_REFERENCES`, else the checkout's, else the copy
/// embedded in the binary.
pub fn references_dir() -> PathBuf {
    references_source().0
}

/// The `references/` directory, and what chose it.
pub fn references_source() -> (PathBuf, &'static str) {
    match std::env::var_os("LOCKSTEP_REFERENCES") {
        Some(v) if !v.is_empty() => (PathBuf::from(v), "$LOCKSTEP_REFERENCES"),
        _ => (data_dir().join("references"), if checkout_dir().is_some() { "the checkout's" } else { "embedded in the binary" }),
    }
}

/// Where traces are read and `record` writes: `$LOCKSTEP_TRACES`, else the checkout's
/// `snapshots/traces`, else `$XDG_DATA_HOME/lockstep/traces` (`~/.local/share/lockstep/traces`).
pub fn traces_dir() -> PathBuf {
    traces_source().0
}

/// The traces directory, and what chose it.
pub fn traces_source() -> (PathBuf, &'static str) {
    match std::env::var_os("LOCKSTEP_TRACES") {
        Some(v) if !v.is_empty() => (PathBuf::from(v), "$LOCKSTEP_TRACES"),
        _ => match checkout_dir() {
            Some(c) => (c.join("snapshots/traces"), "the checkout's"),
            None => {
                let data = match std::env::var_os("XDG_DATA_HOME") {
                    Some(d) if !d.is_empty() && Path::new(&d).is_absolute() => PathBuf::from(d),
                    _ => home().join(".local/share"),
                };
                (data.join("lockstep/traces"), "the default")
            }
        },
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// The directory of the model store: `$LOCKSTEP_MODELS`, else `~/.cache/lockstep/models`
/// (`make models` fills it: scripts/fetch_models.sh).
pub fn models_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_MODELS") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => home().join(".cache/lockstep/models"),
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

/// Checks, before a run, that `path` (an output file, `-` for standard output) can be written:
/// its directory exists and takes a file. A run of minutes must not end in "cannot write".
pub fn check_writable_file(path: &Path, flag: &str) -> Result<(), crate::error::HarnessError> {
    if is_stdout(path) {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_writable_dir(&dir, &format!("{flag} {}", path.display()))
}

/// Checks, before a run, that files can be created in `dir` (`what` names the option in the
/// message).
pub fn check_writable_dir(dir: &Path, what: &str) -> Result<(), crate::error::HarnessError> {
    let err = |m: String| crate::error::HarnessError::Io { path: dir.display().to_string(), message: format!("{m} ({what}): nothing was run") };
    if !dir.is_dir() {
        return Err(err("no such directory: create it first, or write elsewhere".into()));
    }
    let probe = dir.join(format!(".lockstep-write-check.{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(err(format!("cannot create a file here: {e}"))),
    }
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
