//! kloset: encrypted, deduplicated backups over SSH.
//!
//! `store` is the engine (a library), `cli` parses and dispatches the command line.
//! `main.rs` only calls [`cli::main`].

pub mod cli;
pub mod fs;
pub mod sftp;
pub mod store;
pub mod trace;
