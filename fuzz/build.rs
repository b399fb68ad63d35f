// The targets link the harness, which links libpython through pyo3 (never started here): the
// binaries need the same rpath as the harness's own (see docs/traps.md), else the dynamic
// loader may pick another libpython3.11 or none.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
