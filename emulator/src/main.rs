//! The `emulator` binary: parses the command line and hands it to
//! [`emulator::cli`], which runs it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    emulator::cli::run(emulator::cli::Cli::parse())
}
