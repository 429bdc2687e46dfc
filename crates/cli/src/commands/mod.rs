//! # The client subcommands
//!
//! One module per subcommand family. Each owns its flags, the requests it makes and how its
//! results are shown; each returns the process exit code (or an error, which `main` reports
//! and turns into exit code 1). None of them may talk to the network except through
//! [`crate::client::Client`], so error mapping stays in one place, or print errors itself.

pub mod events;
pub mod export;
pub mod ingest;
pub mod libraries;
pub mod search;
