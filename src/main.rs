//! The `kfrtrl` command line: `bench` (and, as the service grows, `serve`, `train`, `experiment`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
