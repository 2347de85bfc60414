//! The `flotilla` command line: a thin layer over the library. Each subcommand lives in
//! its own module under `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
