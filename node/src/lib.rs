//! The cdtester node: protocol core, membership, scheduling, HTTP API, storage and the CLI.

pub mod app;
pub mod archive;
pub mod bench;
pub mod client;
pub mod core;
pub mod corpus;
pub mod course_cmd;
pub mod demo;
pub mod engine;
pub mod env_cmd;
pub mod eval;
pub mod fetch;
pub mod http;
pub mod ids;
pub mod interop;
pub mod metrics;
pub mod node_cmd;
pub mod node_image;
pub mod peer_http;
pub mod registry;
pub mod render;
pub mod run_cmd;
pub mod store;
pub mod udp;
pub mod wire;
