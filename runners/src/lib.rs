//! Built-in runners: `local` (pytest in a subprocess) and `docker` (pytest in a locked-down
//! container).
