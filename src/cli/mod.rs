//! Command-line parsing and the subcommands' front ends.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod experiment;
mod feed;
mod healthcheck;
mod load;
mod migrate;
mod serve;
mod train;

/// Online next-token learning with Kronecker-factored RTRL.
#[derive(Debug, Parser)]
#[command(name = "kfrtrl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the throughput of one online learning step.
    Bench(bench::BenchArgs),
    /// Train online on a corpus and report bits per symbol.
    // Boxed, as `Serve`: its flags outgrew the other variants.
    Train(Box<train::TrainArgs>),
    /// Serve the online-learning HTTP and WebSocket API.
    // Boxed: its many settings would make every other variant as large.
    Serve(Box<serve::ServeArgs>),
    /// Drive a running server with concurrent streams and report throughput and latency.
    Load(load::LoadArgs),
    /// Stream a file or standard input into a stream of a running server and watch it learn.
    Feed(feed::FeedArgs),
    /// Move models from one running server to another with their streams (freeze, export,
    /// import, verify, delete).
    Migrate(migrate::MigrateArgs),
    /// Run one of the paper's experiments (gradient variance, copy task).
    Experiment(experiment::ExperimentArgs),
    /// Exit 0 when the local server is ready, 1 when not (for container health checks).
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Experiment(args) => experiment::run(args),
        Command::Load(args) => load::run(args),
        Command::Feed(args) => feed::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Healthcheck(args) => return healthcheck::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kfrtrl: {e}");
            ExitCode::from(2)
        }
    }
}
