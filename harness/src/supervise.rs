//! Running user code where its crash is a finding, not lockstep's crash: a command whose
//! engine under test is a Python plug-in (`--engine python:FILE.py`) runs in a worker process
//! that this process supervises (as `lockstep report` runs its cases). The worker's exit code
//! is passed on; a worker that the engine ended (`os._exit(3)`, a segfault in native code, an
//! abort) is reported with exit 2, naming the engine and how the process ended. Signals sent to
//! this process (SIGINT, SIGTERM, SIGHUP) are passed on to the worker, which runs in a process
//! group of its own, and waited for: the worker never outlives the command.

use std::os::unix::process::{CommandExt, ExitStatusExt};

use crate::error::HarnessError;

/// Set in a supervised worker's environment.
pub const ENGINE_WORKER_ENV: &str = "LOCKSTEP_ENGINE_WORKER";

/// Runs this command again in a worker process and waits for it: `Ok(code)` to exit with. The
/// engine's name (`python:FILE.py`) is for the message when the worker dies.
pub fn run_engine_worker(engine: &str) -> Result<u8, HarnessError> {
    let exe = std::env::current_exe().map_err(|e| HarnessError::Env(format!("cannot find the lockstep binary to run the engine in: {e}")))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    forward::install();
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .env(ENGINE_WORKER_ENV, "1")
        .process_group(0)
        .spawn()
        .map_err(|e| HarnessError::Env(format!("cannot start {}: {e}", exe.display())))?;
    forward::set_child(child.id());
    let status = child.wait().map_err(|e| HarnessError::Env(format!("waiting for the engine's process: {e}")))?;
    forward::set_child(0);
    if let Some(sig) = forward::received() {
        return Ok(if sig == libc::SIGINT { 130 } else { (128 + sig) as u8 });
    }
    match (status.code(), status.signal()) {
        // lockstep's own exit codes: pass, diverged, error, interrupted.
        (Some(c), _) if [0, 1, 2, 130].contains(&c) => Ok(c as u8),
        (Some(c), _) => Err(HarnessError::Env(format!(
            "the engine under test ({engine}) ended lockstep's process with exit code {c} (os._exit, sys.exit in a thread, or \
             native code): the run has no verdict; run the engine's Python alone to see why"
        ))),
        (None, Some(s)) => Err(HarnessError::Env(format!(
            "the engine under test ({engine}) crashed lockstep's process: killed by signal {s} ({}), in its own or a library's \
             native code; the run has no verdict; run the engine's Python alone to see why",
            signal_name(s)
        ))),
        (None, None) => Err(HarnessError::Env(format!("the engine under test ({engine}) ended lockstep's process in an unknown way"))),
    }
}

/// The supervisor's signal handling: SIGINT, SIGTERM and SIGHUP are recorded and passed on to
/// the worker (whose own handler stops it at a step boundary on SIGINT).
pub mod forward {
    use std::sync::atomic::{AtomicI32, Ordering};

    static CHILD: AtomicI32 = AtomicI32::new(0);
    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(sig: libc::c_int) {
        RECEIVED.store(sig, Ordering::SeqCst);
        let pid = CHILD.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(pid, sig) };
        }
    }

    pub fn install() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a plain sigaction whose handler touches atomics and calls kill only.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }

    /// The worker signals are passed to (0: none); a signal that came before it was known is
    /// passed on now.
    pub fn set_child(pid: u32) {
        CHILD.store(pid as i32, Ordering::SeqCst);
        let sig = RECEIVED.load(Ordering::SeqCst);
        if pid > 0 && sig != 0 {
            // SAFETY: kill on our own child.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    pub fn received() -> Option<i32> {
        Some(RECEIVED.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }
}


/// What a signal that ended a process usually means.
pub fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGABRT => "SIGABRT: an abort, e.g. a failed allocation",
        libc::SIGSEGV => "SIGSEGV: a crash",
        libc::SIGBUS => "SIGBUS: a crash",
        libc::SIGILL => "SIGILL: an instruction this CPU lacks",
        libc::SIGFPE => "SIGFPE: an arithmetic fault",
        libc::SIGKILL => "SIGKILL: killed, often by the kernel's OOM killer",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
