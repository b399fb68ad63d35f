// Embeds the rpath of the libpython that pyo3 was configured with, so the binary loads
// the same interpreter as the reference venv (pyenv's), not Debian's (docs/traps.md).
//
// Also sets `cfg(lockstep_live)` when the reference environment exists ($LOCKSTEP_VENV, else
// the repository's .venv): the live-reference tests of tests/cli.rs run then, and are
// listed as ignored, with the command that enables them, where it does not (a machine with
// no Python reference environment still runs every replay of tests/replay.rs). `make test`
// creates the environment and sets LOCKSTEP_REQUIRE_LIVE=1, under which a missing
// environment is a test failure, not an ignored test.
//
// And writes `$OUT_DIR/embedded.rs` (read by src/embedded.rs): the files an installed
// binary needs outside the checkout (the Python references, scripts/setup_env.sh and
// scripts/fetch_models.sh, the tiny fixture models and adapters), included as bytes, and two
// identities:
// - LOCKSTEP_BUNDLE_ID: a hash of those files (the name of the directory they are written to);
// - LOCKSTEP_SOURCE_ID: a hash of the engine's and the harness's sources, Cargo.lock, the
//   compiler's version and the bundle: `lockstep report` resumes a case only when it was
//   run by the same code (a rebuild of the same code keeps it).
use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// The checkout-relative trees embedded in the binary (directories are walked).
const EMBEDDED: &[&str] = &["references", "scripts/setup_env.sh", "scripts/fetch_models.sh", "snapshots/models", "snapshots/adapters"];
/// The checkout-relative sources of the engine and the harness (directories are walked).
const SOURCES: &[&str] = &["src", "Cargo.toml", "Cargo.lock", "harness/src", "harness/Cargo.toml", "harness/build.rs"];

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo::rustc-check-cfg=cfg(lockstep_live)");
    println!("cargo::rerun-if-env-changed=LOCKSTEP_VENV");
    println!("cargo::rerun-if-changed=build.rs");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let venv = match std::env::var_os("LOCKSTEP_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => manifest.join("../.venv"),
    };
    let python = venv.join("bin/python");
    if python.exists() {
        // Watched only while it exists: a missing path would make cargo rebuild every time.
        println!("cargo::rerun-if-changed={}", python.display());
        println!("cargo::rustc-cfg=lockstep_live");
    }

    // The Python this binary embeds (what `lockstep doctor` compares the venv's with).
    let cfg = pyo3_build_config::get();
    println!("cargo::rustc-env=LOCKSTEP_BUILD_PYTHON={}.{}", cfg.version().major, cfg.version().minor);
    println!("cargo::rustc-env=LOCKSTEP_BUILD_PYTHON_EXE={}", cfg.executable().unwrap_or_default());

    let repo = manifest.parent().expect("harness/ has a parent").to_path_buf();
    let mut embedded = vec![];
    for rel in EMBEDDED {
        println!("cargo::rerun-if-changed={}", repo.join(rel).display());
        walk(&repo, Path::new(rel), &mut embedded);
    }
    embedded.sort();
    let mut sources = vec![];
    for rel in SOURCES {
        println!("cargo::rerun-if-changed={}", repo.join(rel).display());
        walk(&repo, Path::new(rel), &mut sources);
    }
    sources.sort();

    let bundle = hash_files(&repo, &embedded, 0);
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let rustc_version = std::process::Command::new(rustc).arg("-V").output().map(|o| o.stdout).unwrap_or_default();
    let mut h = std::hash::DefaultHasher::new();
    h.write_u64(hash_files(&repo, &sources, 1));
    h.write_u64(bundle);
    h.write(&rustc_version);
    println!("cargo::rustc-env=LOCKSTEP_BUNDLE_ID={bundle:016x}");
    println!("cargo::rustc-env=LOCKSTEP_SOURCE_ID={:016x}", h.finish());

    let mut code = String::from("/// (checkout-relative path, contents) of every embedded file.\npub static FILES: &[(&str, &[u8])] = &[\n");
    for rel in &embedded {
        let abs = repo.join(rel);
        code.push_str(&format!("    ({:?}, include_bytes!({:?})),\n", rel, abs.display().to_string()));
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("embedded.rs");
    std::fs::write(&out, code).expect("writing embedded.rs");
}

/// The files under `repo/rel` (or `rel` itself), as checkout-relative paths with `/`:
/// Python's bytecode caches are left out.
fn walk(repo: &Path, rel: &Path, out: &mut Vec<String>) {
    let abs = repo.join(rel);
    if abs.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&abs).expect("reading an embedded directory").flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "__pycache__" || name.ends_with(".pyc") || name.starts_with('.') {
                continue;
            }
            walk(repo, &rel.join(name), out);
        }
    } else if abs.is_file() {
        out.push(rel.to_string_lossy().replace('\\', "/"));
    }
}

/// One hash over the files' names and contents (SipHash with fixed keys: the same bytes give
/// the same identity on every build with this compiler, which is all an identity needs).
fn hash_files(repo: &Path, files: &[String], salt: u64) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write_u64(salt);
    for rel in files {
        let bytes = std::fs::read(repo.join(rel)).expect("reading a file to hash");
        h.write(rel.as_bytes());
        h.write_u64(bytes.len() as u64);
        h.write(&bytes);
    }
    h.finish()
}
