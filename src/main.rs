//! The `kloset` binary: everything happens in `kloset::cli`.

fn main() {
    std::process::exit(kloset::cli::main());
}
