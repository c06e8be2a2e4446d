//! The `twinblade` binary: parses the command line and runs the chosen subcommand.

fn main() {
    std::process::exit(twinblade::cli::main());
}
