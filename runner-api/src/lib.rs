//! The Runner contract: how the node asks a runner to prepare a project, discover its test
//! modules and run one task (a batch of modules) under limits, and the per-test report it gets
//! back. Every runner — built in (`local`, `docker`) or loaded from a native plugin — speaks it.

pub mod abi;
mod outcome;
pub mod plan;
mod report;
pub mod requirement;
mod runner;

pub use outcome::{Counts, Outcome, round2};
pub use report::{
    Attempt, MAX_ATTEMPT_MESSAGE, MAX_ATTEMPTS, ModuleReport, TaskReport, TestResult, clip_message,
};
/// Hex sha256 of `bytes`: project content hashes, archive checks and plugin pins all use it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub use runner::{Chunk, Limits, PreparedProject, ProjectSource, Rlimits, Runner, RunnerError, TaskSpec};
