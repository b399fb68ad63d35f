//! The files of the checkout that an installed binary needs (`cargo install` installs only the
//! binary): the Python references, scripts/setup_env.sh and fetch_models.sh, the tiny fixture models and LoRA
//! adapters. `harness/build.rs` includes them as bytes; [`dir`] writes them out, once per
//! bundle, to `~/.cache/lockstep/embedded/VERSION-BUNDLE/` with the checkout's layout
//! (`references/`, `scripts/setup_env.sh`, `snapshots/models/`, `snapshots/adapters/`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::HarnessError;

mod files {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

pub use files::FILES;

/// A hash of the embedded files (build.rs).
pub const BUNDLE_ID: &str = env!("LOCKSTEP_BUNDLE_ID");

/// Written last into a complete copy: a directory without it is a copy in progress or
/// interrupted, and is not used.
const COMPLETE: &str = ".complete";

/// Where this binary's embedded files are (or will be) written: `~/.cache/lockstep/embedded/VERSION-BUNDLE`.
pub fn target_dir() -> PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/lockstep/embedded").join(format!("{}-{BUNDLE_ID}", env!("CARGO_PKG_VERSION")))
}

/// The directory holding the embedded files, written out at the first call of a process that
/// finds it missing (a few MB, tens of milliseconds); the same path in every later run.
pub fn dir() -> Result<PathBuf, HarnessError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| write_out(&target_dir()).map_err(|e| e.to_string())).clone().map_err(HarnessError::Env)
}

fn write_out(dir: &Path) -> Result<PathBuf, HarnessError> {
    if dir.join(COMPLETE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let parent = dir.parent().expect("the embedded directory has a parent");
    let io = |p: &Path, e: std::io::Error| HarnessError::Env(format!(
        "writing lockstep's embedded files (Python references, fixtures) to {}: {}: {e}; \
         make HOME writable, or run from a lockstep checkout",
        dir.display(),
        p.display()
    ));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    // Written beside it and renamed into place: two processes starting at once each write
    // their own copy, one rename wins, and neither ever reads half a copy.
    let tmp = parent.join(format!(".{}.{}.tmp", dir.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in FILES {
        let p = tmp.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| io(&p, e))?;
    }
    std::fs::write(tmp.join(COMPLETE), BUNDLE_ID).map_err(|e| io(&tmp, e))?;
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process finished first (or an interrupted copy is in the way).
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(COMPLETE).is_file() {
            let _ = std::fs::remove_dir_all(dir);
            return write_out(dir);
        }
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_holds_what_an_installed_binary_needs() {
        let names: Vec<&str> = FILES.iter().map(|(n, _)| *n).collect();
        for want in ["references/protocol.py", "references/transformers_ref.py", "references/requirements.txt", "scripts/setup_env.sh", "snapshots/models/tiny-llama/config.json", "snapshots/models/tiny-llama.gguf", "snapshots/adapters/tiny-peft/adapter_config.json"] {
            assert!(names.contains(&want), "{want} is not embedded: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("__pycache__") || n.ends_with(".pyc")), "{names:?}");
    }

    #[test]
    fn written_out_files_are_the_embedded_bytes() {
        let dir = std::env::temp_dir().join(format!("lockstep-embedded-test-{}", std::process::id())).join("bundle");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
        let got = write_out(&dir).unwrap();
        assert_eq!(got, dir);
        for (rel, bytes) in FILES {
            assert_eq!(&std::fs::read(dir.join(rel)).unwrap(), bytes, "{rel}");
        }
        // A second call uses the complete copy (a file changed in it stays changed).
        std::fs::write(dir.join("references/protocol.py"), "changed").unwrap();
        write_out(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("references/protocol.py")).unwrap(), "changed");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
