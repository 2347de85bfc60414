//! `vm-sim`: answers vm-bhyve's `vm` command line over a directory, for tests, the demo
//! and benchmarks on hosts without bhyve. See `flotilla_lab::sim`.

fn main() -> std::process::ExitCode {
    let code = flotilla_lab::sim::main();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
