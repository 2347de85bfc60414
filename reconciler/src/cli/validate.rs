//! `flotilla validate`.

use std::process::ExitCode;

use flotilla::render;

use super::desired::{self, DesiredArgs};
use super::Output;

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    desired: DesiredArgs,

    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,

    /// No colours, even on a terminal.
    #[arg(long)]
    no_color: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (result, read) = desired::load(&args.desired)?;
    let result = result.map_err(|e| e.0);
    let text = match args.output {
        Output::Json => render::validation_json(&result, read.commit.as_deref()),
        Output::Text => render::validation_text(&result, super::style(args.no_color)),
    };
    // Errors are the result of `validate`, not a failure of it: they go to stdout.
    print!("{text}");
    Ok(ExitCode::from(if result.is_ok() { 0 } else { 1 }))
}
