//! The `kfrtrl` command line: `serve`, `train`, `experiment`, `bench`, `load` and `healthcheck`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
