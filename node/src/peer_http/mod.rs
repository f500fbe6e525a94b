//! HTTP between members and from the CLI, apart from the server: the cluster MAC that signs and
//! verifies internal calls ([`auth`]) and the small client that makes them ([`client`]). The
//! application and the CLI use these; the server shell (`crate::http`) verifies with [`auth`].

pub mod auth;
pub mod client;
