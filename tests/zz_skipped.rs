//! The count of end-to-end tests skipped in this run, printed after the
//! other test binaries of this package (a plain `main`, not a test).
//!
//! Why it runs after them: `cargo test` sorts the test binaries it runs by
//! package name, then target kind (library, binaries, integration tests),
//! then target name, so `zz_skipped` comes after every other test binary of
//! `propeller-tests`, the package of every end-to-end test; the unit tests
//! of `proplet` and `proxy` and the doc tests follow it, and skip nothing.
//! (`cargo test --workspace --no-run` lists the binaries in that order.)
//! Should the order change, the count is still right for the binaries that
//! ran before, and every skip line says how many were skipped so far.
//!
//! Under CI (`CI` set) a skip already fails its test; this fails too, in
//! case a skip path forgot to.

use std::io::Write;

fn main() {
    let skipped = propeller_tests::skips::take();
    let mut stderr = std::io::stderr();
    if skipped.is_empty() {
        let _ = writeln!(stderr, "end-to-end tests: none skipped in this run");
        return;
    }
    let _ = writeln!(
        stderr,
        "end-to-end tests: {} SKIPPED in this run, which is not a full one:",
        skipped.len()
    );
    for message in &skipped {
        let _ = writeln!(stderr, "  {message}");
    }
    if std::env::var_os("CI").is_some() {
        let _ = writeln!(stderr, "CI requires every end-to-end test to run");
        std::process::exit(1);
    }
}
