//! Built-in runners: `local` (pytest in a subprocess) and `docker` (pytest in a locked-down
//! container).
pub mod docker;
pub mod local;
pub mod pytest;
pub mod wheelhouse;
