//! The identity of the code that runs a case: what `lockstep report` keys its resume on (with
//! the case's own fingerprint). It changes when the code changes, not when the same code is
//! rebuilt, copied or installed elsewhere (a binary's size and mtime would re-run every case
//! after a rebuild):
//!
//! - the engine's and the harness's sources, Cargo.lock, the compiler's version and the
//!   embedded files (`LOCKSTEP_SOURCE_ID`, hashed by harness/build.rs);
//! - the Python references this run reads (`crate::paths::references_dir`, hashed here:
//!   `$LOCKSTEP_REFERENCES` or a checkout's edited file counts without a rebuild);
//! - the engine under test: `bundled`; for `python:PATH` the sha256 of that file; for a
//!   Rust plug-in its name and the sha256 of the running executable (its code is in it).

use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::plugin::EngineSpec;

/// The build-time identity of the engine's and the harness's code.
pub const SOURCE_ID: &str = env!("LOCKSTEP_SOURCE_ID");

/// The identity of the engine under test and the code around it (16 hex digits).
pub fn engine_identity() -> String {
    engine_identity_of(&EngineSpec::under_test())
}

/// [`engine_identity`] for `spec`.
pub fn engine_identity_of(spec: &EngineSpec) -> String {
    let engine = match spec {
        EngineSpec::Bundled => "bundled".to_string(),
        EngineSpec::Python { path, factory } => format!("python {factory} {}", file_sha256(path)),
        EngineSpec::Plugin(p) => format!("plugin {} {}", p.name, exe_sha256()),
    };
    let text = format!("{SOURCE_ID}\nreferences {}\nengine {engine}\n", references_sha256());
    hex16(&Sha256::digest(text.as_bytes()))
}

fn hex16(d: &[u8]) -> String {
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => format!("{:x}", Sha256::digest(&b)),
        // Unreadable: the load says so; the identity then names the path only.
        Err(_) => format!("unreadable {}", path.display()),
    }
}

/// The files of the references directory (not its subdirectories), names and contents.
fn references_sha256() -> String {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| {
        let dir = crate::paths::references_dir();
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default();
        files.sort();
        let mut h = Sha256::new();
        for f in files {
            h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            h.update(b"\0");
            h.update(std::fs::read(&f).unwrap_or_default());
            h.update(b"\0");
        }
        format!("{:x}", h.finalize())
    })
    .clone()
}

fn exe_sha256() -> String {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| std::env::current_exe().map(|p| file_sha256(&p)).unwrap_or_else(|_| "unknown".into())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_engine_is_identified_by_its_file_contents() {
        let dir = std::env::temp_dir().join(format!("lockstep-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.py"), dir.join("b.py"));
        std::fs::write(&a, "def load(model, **kw): pass\n").unwrap();
        std::fs::write(&b, "def load(model, **kw): pass\n").unwrap();
        let py = |p: &Path| EngineSpec::Python { path: p.to_path_buf(), factory: "load".into() };
        let bundled = engine_identity_of(&EngineSpec::Bundled);
        assert_eq!(bundled.len(), 16);
        assert_eq!(engine_identity_of(&py(&a)), engine_identity_of(&py(&b)), "same bytes, another path");
        assert_ne!(engine_identity_of(&py(&a)), bundled);
        std::fs::write(&b, "def load(model, **kw): return None\n").unwrap();
        assert_ne!(engine_identity_of(&py(&a)), engine_identity_of(&py(&b)), "changed code");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
