use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use train::cli::Cli;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text, not escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The environment switches, read once and handed to the libraries.
    let switched = train::switches::apply_from_env();
    if !switched.is_empty() {
        eprintln!("switches set: {}", switched.join(", "));
    }
    let result = match &cli.command {
        Some(c) => train::cli::command(c),
        None => {
            // First Ctrl-C / SIGTERM: checkpoint at the end of the current step and exit; a
            // second one exits at once. A repeat within a second counts as the same interrupt:
            // senders such as GNU `timeout` signal the process and then its whole group.
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let first = std::sync::OnceLock::<std::time::Instant>::new();
            let handler = ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    if first.get().is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
                        return;
                    }
                    eprintln!("\nsecond interrupt: exiting without a checkpoint");
                    std::process::exit(130);
                }
                let _ = first.set(std::time::Instant::now());
                eprintln!("\ninterrupt: saving a checkpoint after this step (interrupt again to quit at once)");
            });
            if let Err(e) = handler {
                eprintln!("warning: cannot install the Ctrl-C handler ({e}); an interrupt will not checkpoint");
            }
            // The launcher's variables (torchrun, Slurm, `--gpus`), read once here.
            match (cli.train.gpus, train::dist::World::from_vars(|k| std::env::var(k).ok())) {
                (Some(n), _) => {
                    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                    std::env::current_exe().map_err(anyhow::Error::from).and_then(|exe| {
                        train::dist::launch::launch(&exe, &train::dist::launch::strip_gpus(&args), n, stop)
                    })
                }
                (None, Ok(world)) => train::cli::train(&cli.train, stop, &world),
                (None, Err(e)) => Err(e.context("the data-parallel launch variables")),
            }
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
