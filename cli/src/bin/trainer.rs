//! `trainer`: a trainer actor, i.e. `lillm train` (usually with `--coordinator`).

fn main() {
    lillm_cli::main()
}
