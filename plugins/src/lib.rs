//! Extension points: WASM policy plugins and native runner plugins.
