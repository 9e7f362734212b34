//! Log lines on stderr through one `tracing` filter. The default shows
//! cairn's own warnings and hides its dependencies' (the AWS SDK's, for
//! one, logs each failed credentials provider at WARN); `-v`, `-q` and
//! `CAIRN_LOG` (a full `tracing` filter, e.g. `debug` or
//! `cairn_engine=trace,aws_config=warn`) change it. No ANSI colour unless
//! stderr is a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// cairn's crates, by their names in log targets.
const OURS: [&str; 3] = ["cairn", "cairn_engine", "cairn_vmm_glue"];

/// The filter for `-v` counted `verbose` times, or `-q`.
pub fn default_filter(verbose: u8, quiet: bool) -> String {
    let (ours, theirs) = match (quiet, verbose) {
        (true, _) => ("error", "off"),
        (false, 0) => ("warn", "off"),
        (false, 1) => ("info", "off"),
        (false, 2) => ("debug", "warn"),
        (false, _) => ("trace", "debug"),
    };
    let mut filter = theirs.to_owned();
    for krate in OURS {
        filter.push_str(&format!(",{krate}={ours}"));
    }
    filter
}

pub fn init(verbose: u8, quiet: bool) {
    let filter = EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose, quiet)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_shows_our_warnings_and_hides_dependencies() {
        assert_eq!(
            default_filter(0, false),
            "off,cairn=warn,cairn_engine=warn,cairn_vmm_glue=warn"
        );
        assert!(default_filter(0, true).contains("cairn_engine=error"));
        assert!(default_filter(2, false).starts_with("warn,"));
        for f in [default_filter(0, false), default_filter(3, false)] {
            EnvFilter::try_new(&f).unwrap();
        }
    }
}
