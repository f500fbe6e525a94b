//! sha256 pinning of plugin files: a plugin is read once, hashed, and refused unless the hash is
//! the one the configuration names.

use std::path::{Path, PathBuf};

use cdtester_runner_api::sha256_hex;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot read plugin file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "plugin file {path} has sha256 {actual}, but the configuration pins {expected}: refusing to load it"
    )]
    Mismatch { path: PathBuf, expected: String, actual: String },
}

/// Reads `path` and checks it against the pinned hex `sha256` (case-insensitive).
pub fn read_pinned(path: &Path, sha256: &str) -> Result<Vec<u8>, PinError> {
    let bytes = std::fs::read(path).map_err(|source| PinError::Read { path: path.to_path_buf(), source })?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(PinError::Mismatch {
            path: path.to_path_buf(),
            expected: sha256.to_ascii_lowercase(),
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_pinned_hash_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.wasm");
        std::fs::write(&path, b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(read_pinned(&path, &good.to_uppercase()).unwrap(), b"abc");
        let err = read_pinned(&path, &"0".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("pins 0000") && err.contains(good), "{err}");
        let err = read_pinned(&dir.path().join("missing"), good).unwrap_err();
        assert!(matches!(err, PinError::Read { .. }));
    }
}
