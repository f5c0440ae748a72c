//! The `kfrtrl` command line: `train` and `bench` (the server comes with the service).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
