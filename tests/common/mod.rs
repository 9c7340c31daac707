//! Helpers shared by the integration tests: `mod common;` in a test file.

pub mod craft;
pub mod faultproxy;
pub mod sshd;
pub mod tree;
