//! Ctrl-C. The commands that run references (run, bisect, record, report, ...) stop at the
//! next step boundary with [`HarnessError::Interrupted`] (exit code 130) and write nothing
//! half-done: every file lockstep writes is written to a temporary name and renamed.
//!
//! A SIGINT handler of ours sets a flag, which the step loops poll ([`check`]), and asks the
//! embedded Python to raise `KeyboardInterrupt` at its next bytecode (`PyErr_SetInterrupt`), so
//! a reference busy loading a model stops too; the harness turns that exception into the same
//! error ([`crate::reference::pycall::py_err`]). A second Ctrl-C exits at once (130).
//!
//! Python's own SIGINT handler, installed when its `signal` module starts, would otherwise
//! replace ours: [`reinstall`] puts ours back after the interpreter starts.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::HarnessError;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static PYTHON: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // The second Ctrl-C: the user does not want to wait for the step to end.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    if PYTHON.load(Ordering::SeqCst) {
        // SAFETY: documented as async-signal-safe; only trips a flag the interpreter polls.
        unsafe { pyo3::ffi::PyErr_SetInterrupt() };
    }
}

fn set_handler() {
    // SAFETY: a plain sigaction with a handler that only touches atomics, _exit and
    // PyErr_SetInterrupt.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Installs the handler (for the commands that poll [`check`]).
pub fn install() {
    INSTALLED.store(true, Ordering::SeqCst);
    set_handler();
}

/// Whether this process polls for Ctrl-C (the CLI's commands that run references).
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::SeqCst)
}

/// Called once the embedded interpreter has started (and again after anything that may have
/// installed Python's handler): ours is the process's handler, and Python is told of Ctrl-C.
pub fn reinstall_after_python() {
    PYTHON.store(true, Ordering::SeqCst);
    if INSTALLED.load(Ordering::SeqCst) {
        set_handler();
    }
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once Ctrl-C was pressed: the step loops call it at every boundary.
pub fn check() -> Result<(), HarnessError> {
    if interrupted() {
        Err(HarnessError::Interrupted)
    } else {
        Ok(())
    }
}
