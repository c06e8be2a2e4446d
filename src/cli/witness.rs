//! `twinblade witness`: the witness service in the foreground ([`crate::ha::witness`]), and
//! `twinblade witness-ask`, an admin's look at what a witness holds (a query, or with
//! `--claim` a claim, for tests and for an operator who knows the peer is gone).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::exit::{cancel_on_signal, ExitCode};
use crate::ha::witness::{ask, Request, WitnessConfig, WitnessServer};
use crate::wire::witness::Verdict;

/// `twinblade witness` arguments.
#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// The witness's configuration (listen address, book file, one [pair.NAME] per pair).
    #[arg(short = 'c', long, default_value = "/etc/twinblade/witness.toml")]
    pub config: PathBuf,
}

/// `twinblade witness-ask` arguments.
#[derive(Debug, Args)]
pub struct WitnessAskArgs {
    /// The witness, ADDRESS:PORT.
    #[arg(long)]
    pub witness: SocketAddr,
    /// The file holding the pair's shared secret (mode 0600).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// The pair's name (its `[cluster] name`).
    #[arg(long)]
    pub pair: String,
    /// The asking node.
    #[arg(long)]
    pub node: String,
    /// The resource.
    #[arg(long)]
    pub resource: String,
    /// The data generation, in hex (as `dump-md` prints the current UUID).
    #[arg(long, value_parser = parse_generation)]
    pub generation: u64,
    /// Claim the grant instead of asking who holds it.
    #[arg(long)]
    pub claim: bool,
    /// Seconds to wait for each of three tries.
    #[arg(long, default_value_t = 1.0)]
    pub timeout: f64,
}

fn parse_generation(text: &str) -> Result<u64, String> {
    let digits = text.trim_start_matches("0x").trim_start_matches("0X");
    u64::from_str_radix(digits, 16).map_err(|_| format!("{text:?} is not a hex generation"))
}

/// Serves until SIGINT or SIGTERM.
pub fn run(args: WitnessArgs) -> i32 {
    let config = match WitnessConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("twinblade witness: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let server = match WitnessServer::bind(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("twinblade witness: {e}");
            return ExitCode::Failure as i32;
        }
    };
    let cancel = match cancel_on_signal() {
        Ok(cancel) => cancel,
        Err(code) => return code as i32,
    };
    server.run(cancel);
    ExitCode::Ok as i32
}

/// Asks once (three tries) and prints the verdict: `granted NODE`, `held NODE`, `free`.
/// Exit 0 when granted or free, 1 when held by another node or unreachable, 2 on bad input.
pub fn ask_once(args: WitnessAskArgs) -> i32 {
    let secret = match crate::config::secret::read_secret_file(&args.secret_file) {
        Ok(secret) => secret,
        Err(problem) => {
            eprintln!("twinblade witness-ask: --secret-file: {problem}");
            return ExitCode::Usage as i32;
        }
    };
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        eprintln!("twinblade witness-ask: --timeout must be a positive number of seconds");
        return ExitCode::Usage as i32;
    }
    let request = Request {
        claim: args.claim,
        pair: &args.pair,
        node: &args.node,
        resource: &args.resource,
        generation: args.generation,
    };
    match ask(
        args.witness,
        secret.as_bytes(),
        &request,
        Duration::from_secs_f64(args.timeout),
        3,
    ) {
        Ok(answer) => match answer.verdict {
            Verdict::Granted => {
                println!("granted {}", answer.holder);
                ExitCode::Ok as i32
            }
            Verdict::Free => {
                println!("free");
                ExitCode::Ok as i32
            }
            Verdict::Held => {
                println!("held {}", answer.holder);
                ExitCode::Failure as i32
            }
        },
        Err(e) => {
            eprintln!("twinblade witness-ask: {e}");
            ExitCode::Failure as i32
        }
    }
}
