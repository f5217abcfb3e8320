//! The `lillm` command.

fn main() {
    lillm_cli::main()
}
