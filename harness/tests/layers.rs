//! The harness's layering, checked from its source: no import cycle between harness modules
//! (files), and the harness names no concrete engine type.
//!
//! An edge `a -> b` is any `crate::...` path in file `a` that resolves to module `b`
//! (`use` lines and inline paths alike; `super::` is resolved too). A folder's `mod.rs`
//! re-exporting its own children (`pub use` lines) is its face, not a dependency, and is not
//! an edge; anything else it takes from a child is. The test prints every cycle it finds,
//! file by file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `reference/python.rs` -> `reference::python`; `reference/mod.rs` -> `reference`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        return String::new();
    }
    parts.join("::")
}

/// Paths after `crate::` (or `super::`, resolved against `module`), with `{a, b::c}` groups
/// expanded one level, comments dropped.
fn referenced_paths(text: &str, module: &str, is_mod_rs: bool) -> Vec<String> {
    // Unit tests (`#[cfg(test)] mod tests`, at the end of a file) use `super::` of their own.
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    let code: String = text
        .lines()
        .filter(|l| !(is_mod_rs && l.trim_start().starts_with("pub use ")))
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = vec![];
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    for (prefix, base) in [("crate::", String::new()), ("super::", parent_of(module, is_mod_rs))] {
        let mut from = 0;
        while let Some(i) = code[from..].find(prefix) {
            let start = from + i;
            from = start + prefix.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let rest = &code[from..];
            let join = |p: &str| if base.is_empty() { p.to_string() } else { format!("{base}::{p}") };
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let item: String = item.trim().bytes().take_while(|&c| ident(c)).map(char::from).collect();
                    if !item.is_empty() {
                        out.push(join(&item));
                    }
                }
                continue;
            }
            let path: String = rest.bytes().take_while(|&c| ident(c)).map(char::from).collect();
            let path = path.trim_end_matches(':');
            if !path.is_empty() {
                out.push(join(path));
            }
        }
    }
    out
}

/// What `super::` names in a file of `module` (`a/b.rs` and `a/b/mod.rs` alike: `a`).
fn parent_of(module: &str, _is_mod_rs: bool) -> String {
    module.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default()
}

/// The module graph of the crate whose sources are in `src` (the harness's `harness/src`, the
/// engine's `src`).
fn graph_of(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = vec![];
    rs_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, f) in &modules {
        if m.is_empty() {
            continue; // lib.rs / main.rs: the crate root declares every module
        }
        let is_mod_rs = f.file_name().is_some_and(|n| n == "mod.rs");
        let text = std::fs::read_to_string(f).unwrap();
        let edges = g.entry(m.clone()).or_default();
        for p in referenced_paths(&text, m, is_mod_rs) {
            // The longest module prefix of the path.
            let mut target = p.as_str();
            let hit = loop {
                if modules.contains_key(target) && !target.is_empty() {
                    break Some(target.to_string());
                }
                match target.rsplit_once("::") {
                    Some((head, _)) => target = head,
                    None => break None,
                }
            };
            let Some(t) = hit else { continue };
            if t != *m {
                edges.insert(t);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct St<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = vec![];
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = St { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn harness_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn engine_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("src")
}

/// Fails with every cycle of the module graph of `src`, module by module.
fn assert_no_cycle(src: &Path, crate_name: &str) {
    let g = graph_of(src);
    let found = cycles(&g);
    let mut msg = String::new();
    for c in &found {
        msg.push_str(&format!("cycle of {} modules:\n", c.len()));
        for m in c {
            let inside: Vec<&String> = g[m].iter().filter(|t| c.contains(t)).collect();
            msg.push_str(&format!("  {m} -> {}\n", inside.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")));
        }
    }
    assert!(found.is_empty(), "import cycles among {crate_name} modules (arrows must point one way, down):\n{msg}");
}

#[test]
fn no_import_cycle_between_harness_modules() {
    assert_no_cycle(&harness_src(), "harness");
}

/// The engine (`src/`) too: a family file does not reach into another family's file, the
/// config does not call back into the loader.
#[test]
fn no_import_cycle_between_engine_modules() {
    assert_no_cycle(&engine_src(), "engine");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    // The checker itself: a two-module loop and a mod.rs re-exporting its child.
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("c".to_string(), BTreeSet::new());
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
    let paths = referenced_paths("use crate::{x::Y, z};\nlet v = super::w::f(); // crate::ignored\n", "p::q", false);
    assert_eq!(paths, ["x::Y", "z", "p::w::f"]);
}

#[test]
fn the_harness_names_no_concrete_engine_type() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rs_files(&src, &mut files);
    let mut hits = vec![];
    for f in files {
        for (i, line) in std::fs::read_to_string(&f).unwrap().lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let named = code
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w == "Llama" || w == "LlamaWeights" || w == "LayerWeights");
            if named {
                hits.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(hits.is_empty(), "the harness drives the engine only through `Decoder`; it names a family's types:\n{}", hits.join("\n"));
}

#[test]
fn the_check_finds_a_cycle_between_two_made_up_module_files() {
    // Two files of a made-up crate that import each other, and a third that only imports:
    // the same reading of sources as the engine's and the harness's checks.
    let dir = std::env::temp_dir().join(format!("lockstep-layers-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("models")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod config;\npub mod models;\npub mod weights;\n").unwrap();
    std::fs::write(src.join("config.rs"), "use crate::weights::check_sizes;\n").unwrap();
    std::fs::write(src.join("weights.rs"), "pub fn f() { crate::config::Config::default(); }\n").unwrap();
    std::fs::write(src.join("models/mod.rs"), "pub mod llama;\npub use llama::Llama;\n").unwrap();
    std::fs::write(src.join("models/llama.rs"), "use crate::{config::Config, weights};\n").unwrap();
    let g = graph_of(&src);
    assert_eq!(cycles(&g), vec![vec!["config".to_string(), "weights".to_string()]]);
    assert!(g["models::llama"].contains("config") && g["models::llama"].contains("weights"));
    assert!(g["models"].is_empty(), "a mod.rs re-exporting its child is not an edge: {:?}", g["models"]);
    let _ = std::fs::remove_dir_all(&dir);
}
