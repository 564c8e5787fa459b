//! `filterdb`: the command-line client of a FilterDB server.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(code) => code,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS, // `filterdb filters ... | head`
        Err(e) => {
            // gRPC errors render as `CODE: message`, connection failures as
            // `cannot reach FilterDB at URL: ...`, other errors with their context chain.
            eprintln!("error: {}", cli::render_error(&e));
            ExitCode::FAILURE
        }
    }
}
