// A binary (or test) that embeds lockstep embeds CPython: the rpath of the libpython that pyo3
// was configured with (the reference environment's), so that it does not load another
// libpython and then fail to import the environment's packages.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo::rerun-if-changed=build.rs");
}
