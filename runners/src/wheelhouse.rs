//! Building environments without the package index: a *wheelhouse* is a directory of wheels
//! (made where the index is reachable, by `cdtester env prepare`) that every pip the runners start
//! installs or downloads from instead of the index (`--no-index --find-links <dir>`).
//!
//! Without one, a host that cannot reach the index fails every project that needs an environment
//! with pip's name-resolution error; [`explain`] turns that into an error that says what to do.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where pip finds packages: the index (default) or only a wheelhouse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageSource {
    wheelhouse: Option<PathBuf>,
}

/// Text of pip's output when it could not reach an index (with `--quiet`, pip only says that it
/// found no version at all).
const UNREACHABLE: &[&str] = &[
    "(from versions: none)",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Failed to establish a new connection",
    "Network is unreachable",
    "Connection refused",
];

impl PackageSource {
    /// The index, or only `wheelhouse` when one is configured; the directory must exist.
    pub fn new(wheelhouse: Option<&Path>) -> std::io::Result<PackageSource> {
        let wheelhouse = match wheelhouse {
            None => None,
            Some(dir) => {
                let dir = std::fs::canonicalize(dir)?;
                if !dir.is_dir() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "runner.wheelhouse is not a directory",
                    ));
                }
                Some(dir)
            }
        };
        Ok(PackageSource { wheelhouse })
    }

    /// The wheelhouse, when one is configured.
    pub fn wheelhouse(&self) -> Option<&Path> {
        self.wheelhouse.as_deref()
    }

    /// pip options (for `install` and `download`) that select this source: nothing for the
    /// index, `--no-index --find-links <dir>` for a wheelhouse. pip hands them on to the
    /// isolated environment it makes to build a project, so build backends come from there too.
    pub fn pip_args(&self) -> Vec<OsString> {
        match &self.wheelhouse {
            None => Vec::new(),
            Some(dir) => vec!["--no-index".into(), "--find-links".into(), dir.clone().into_os_string()],
        }
    }

    /// `message` (a failed pip's error) followed by what to do about it, when pip could not reach
    /// the index or the wheelhouse lacks a package. Names no host path.
    pub fn explain(&self, message: String) -> String {
        let unreachable = UNREACHABLE.iter().any(|m| message.contains(m));
        match &self.wheelhouse {
            None if unreachable => format!(
                "{message}\n(if this node cannot reach the package index, build its environments from \
                 a wheelhouse: see `cdtester env prepare` and runner.wheelhouse)"
            ),
            Some(_) if message.contains("No matching distribution found") => format!(
                "{message}\n(the node's wheelhouse lacks a package this project needs: run \
                 `cdtester env prepare` for it where the index is reachable)"
            ),
            _ => message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_needs_no_options_and_a_wheelhouse_replaces_it() {
        assert!(PackageSource::default().pip_args().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let source = PackageSource::new(Some(dir.path())).unwrap();
        let args = source.pip_args();
        assert_eq!(args[..2], [OsString::from("--no-index"), OsString::from("--find-links")]);
        assert_eq!(Path::new(&args[2]), std::fs::canonicalize(dir.path()).unwrap());
        assert!(PackageSource::new(Some(&dir.path().join("missing"))).is_err());
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(PackageSource::new(Some(&file)).is_err());
    }

    #[test]
    fn an_unreachable_index_or_a_short_wheelhouse_is_explained_without_paths() {
        let pip = "ERROR: ... [Errno -3] Temporary failure in name resolution".to_string();
        let explained = PackageSource::default().explain(pip.clone());
        assert!(explained.starts_with(&pip) && explained.contains("cdtester env prepare"), "{explained}");
        let dir = tempfile::tempdir().unwrap();
        let source = PackageSource::new(Some(dir.path())).unwrap();
        let missing = "ERROR: No matching distribution found for six==1.17.0".to_string();
        let explained = source.explain(missing);
        assert!(
            explained.contains("wheelhouse lacks") && !explained.contains(&*dir.path().to_string_lossy())
        );
        assert_eq!(source.explain("other".into()), "other");
        assert_eq!(PackageSource::default().explain("other".into()), "other");
    }
}
