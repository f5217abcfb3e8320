//! The `lillm` command.

fn main() -> std::process::ExitCode {
    lillm_cli::main()
}
