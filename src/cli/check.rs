//! `twinblade check-config [-c FILE] [--node NAME] [--offline] [-q]`: validates the
//! configuration for this node and its peer without running anything, and prints the effective
//! settings (see [`crate::config::check`]).
//!
//! The node is picked as `twinblade run` picks it (`--node`, `$TWINBLADE_NODE`, the host
//! name). `--offline` checks the file alone, not this machine (for CI or a build host); the
//! node is then optional. Problems go to stderr, one a line, `error: FILE: KEY: PROBLEM` or
//! `warning: FILE: KEY: PROBLEM`; the settings go to stdout (not with `-q`, nor when there are
//! errors).
//!
//! Exit status: 0 valid (warnings allowed); 1 the file is valid but this machine does not fit
//! it (an interface, address, disk or secret file); 2 the file is invalid (or unreadable, or
//! names no node for this machine) or the command line is wrong. Nothing is created, opened for
//! writing or started.

use std::path::PathBuf;

use super::exit::ExitCode;
use crate::config::check::{check, dump, Severity, ThisMachine};
use crate::config::Config;

/// Arguments of `twinblade check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// Configuration file.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// The node to check it for (default: $TWINBLADE_NODE, else the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Check the file only, not this machine (interfaces, addresses, disks, secret file).
    #[arg(long)]
    pub offline: bool,
    /// Print only the problems, not the effective settings.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Runs `twinblade check-config`; returns the exit status.
pub fn run(args: CheckConfigArgs) -> i32 {
    let file = args.config.display().to_string();
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {file}: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let config = match Config::parse(&text, &args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let node = match (config.this_node(args.node.as_deref()), args.offline) {
        (Ok(n), _) => Some(n),
        (Err(_), true) if args.node.is_none() => None,
        (Err(e), _) => {
            eprintln!("error: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let host = (!args.offline).then_some(&ThisMachine as &dyn crate::config::check::Host);
    let checked = check(&config, node, host);
    let mut code = ExitCode::Ok;
    let (mut errors, mut warnings) = (0, 0);
    for f in &checked.findings {
        let word = match f.severity {
            Severity::FileError => {
                code = ExitCode::Usage;
                "error"
            }
            Severity::HostError => {
                if code == ExitCode::Ok {
                    code = ExitCode::Failure;
                }
                "error"
            }
            Severity::Warning => "warning",
        };
        if word == "error" {
            errors += 1;
        } else {
            warnings += 1;
        }
        eprintln!("{word}: {file}: {}: {}", f.key, f.problem);
    }
    let against = match (node, args.offline) {
        (Some(n), false) => format!("node {n} on this machine"),
        (Some(n), true) => format!("node {n} (file only)"),
        (None, _) => "the file only".to_string(),
    };
    if code == ExitCode::Ok {
        if !args.quiet {
            print!("{}", dump(&config, node, &checked.facts));
        }
        eprintln!("{file}: valid for {against} ({warnings} warning(s))");
    } else {
        eprintln!("{file}: {errors} error(s), {warnings} warning(s) for {against}");
    }
    code as i32
}
