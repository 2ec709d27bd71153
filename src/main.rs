//! The `keyfs` binary: parse flags, run, map the error to an exit code.

use clap::Parser;
use keyfs::cli::{init_logging, run, Cli};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose);
    if let Err(e) = run(&cli) {
        eprintln!("keyfs: {e}");
        std::process::exit(e.exit_code());
    }
}
