//! `trainer`: a trainer actor, i.e. `lillm train` (usually with `--coordinator`).

fn main() -> std::process::ExitCode {
    lillm_cli::main()
}
