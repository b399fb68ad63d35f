// Embeds the rpath of the libpython that pyo3 was configured with, so the binary loads
// the same interpreter as the reference venv (pyenv's), not Debian's (GOTCHAS.md).
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
