//! The `flotilla` command line. Its subcommands (`validate`, `plan`, `apply`, `status`,
//! `events`, `trigger`, `agent`, `demo`) arrive with the issues that build them.

fn main() {
    eprintln!(
        "flotilla {}: no subcommands are available in this build yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(64);
}
