//! The `kfrtrl` command line: `serve`, `train`, `experiment` and `bench`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
