use clap::Parser;
use precompute::cli::{Cli, Command};

fn main() {
    // `precompute inspect DIR | head`: a closed pipe ends the process quietly, as it does `cat`,
    // instead of println! panicking with "Broken pipe" (Rust ignores SIGPIPE by default).
    // SAFETY: called first in main, before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text, not escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Inspect { dir, max_rows }) => precompute::inspect::inspect(dir, *max_rows).map(|r| r.print()),
        None if cli.run.decode_only => precompute::decode_only(&cli.run).map(|s| s.print()),
        None => precompute::run(&cli.run).map(|s| s.print()),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
