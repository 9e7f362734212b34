//! The `cairn` command: arguments in, a validated config, `run`, an exit code.
//! No storage logic lives here; it is all in `cairn-engine`.

mod cli;
mod commands;
mod context;
mod daemon;
mod errors;
mod faults;
mod logging;
mod output;
mod size;

use std::process::ExitCode;

use clap::Parser;

/// Bad usage: a malformed argument or a missing one.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // Before parsing: a usage error is reported as JSON when --json is
    // among the arguments, even if the rest does not parse.
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            errors::print_json("usage", first.trim_start_matches("error: "), &text);
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => e.exit(),
    };
    logging::init(cli.global.verbose, cli.global.quiet);
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) if json => {
            errors::print_json(errors::kind_of(&e), &e.to_string(), &format!("{e:#}"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
