//! The cdtester node: protocol core, membership, scheduling, HTTP API, storage and the CLI.
