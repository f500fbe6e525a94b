//! Safe zip extraction and splitting an extracted tree into projects.
//!
//! Extraction refuses the whole archive (nothing is left half-trusted) when an entry's path is
//! absolute or leaves the destination (zip-slip), when an entry is a symbolic link, when the
//! archive has more entries than [`Caps::max_files`], or when the bytes actually written would
//! exceed [`Caps::max_total_bytes`] (sizes declared in the archive are not trusted).

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// Extraction limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Total uncompressed bytes written.
    pub max_total_bytes: u64,
    /// Entries (files and directories).
    pub max_files: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps { max_total_bytes: 512 * 1024 * 1024, max_files: 50_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a valid zip archive: {0}")]
    Malformed(String),
    #[error("unsafe path in archive: {0:?} is absolute or leaves the extraction folder (zip-slip)")]
    UnsafePath(String),
    #[error("archive entry {0:?} is a symbolic link; links are not accepted")]
    Symlink(String),
    #[error("archive expands to more than {limit} bytes (zip bomb?)")]
    TooLarge { limit: u64 },
    #[error("archive has more than {limit} entries")]
    TooManyFiles { limit: usize },
    #[error("I/O error extracting to {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_path_buf(), source }
}

/// Extracts `bytes` (a zip) into `dest` with the default [`Caps`]. Returns the number of files.
pub fn extract_zip(bytes: &[u8], dest: &Path) -> Result<usize, ArchiveError> {
    extract_zip_with(bytes, dest, Caps::default())
}

/// Extracts `bytes` (a zip) into `dest` under `caps`. Returns the number of files written. On a
/// size error `dest` may hold part of the archive: extract into a temporary folder.
pub fn extract_zip_with(bytes: &[u8], dest: &Path, caps: Caps) -> Result<usize, ArchiveError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| ArchiveError::Malformed(e.to_string()))?;
    if zip.len() > caps.max_files {
        return Err(ArchiveError::TooManyFiles { limit: caps.max_files });
    }
    // Check every name first, so an unsafe archive writes nothing at all.
    let mut names = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        let raw = entry.name().map_err(|e| ArchiveError::Malformed(e.to_string()))?.to_string();
        let rel = safe_relative(&raw).ok_or_else(|| ArchiveError::UnsafePath(raw.clone()))?;
        if entry.is_symlink() {
            return Err(ArchiveError::Symlink(raw));
        }
        names.push((rel, entry.is_dir(), entry.unix_mode()));
    }
    std::fs::create_dir_all(dest).map_err(io_at(dest))?;
    let mut written: u64 = 0;
    let mut files = 0;
    for (i, (rel, is_dir, mode)) in names.into_iter().enumerate() {
        let path = dest.join(&rel);
        if is_dir {
            std::fs::create_dir_all(&path).map_err(io_at(&path))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        let mut entry = zip.by_index(i).map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        let mut out = std::fs::File::create(&path).map_err(io_at(&path))?;
        let room = caps.max_total_bytes - written;
        let mut limited = (&mut entry).take(room + 1);
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| ArchiveError::Malformed(format!("{}: {e}", rel.display())))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > caps.max_total_bytes {
                return Err(ArchiveError::TooLarge { limit: caps.max_total_bytes });
            }
            out.write_all(&buf[..n]).map_err(io_at(&path))?;
        }
        if let Some(mode) = mode
            && mode & 0o111 != 0
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io_at(&path))?;
        }
        files += 1;
    }
    Ok(files)
}

/// `name` as a relative path that stays inside the extraction folder, or `None`.
fn safe_relative(name: &str) -> Option<PathBuf> {
    if name.contains('\0') || name.starts_with('/') || name.starts_with('\\') || name.contains(":\\") {
        return None;
    }
    let mut out = PathBuf::new();
    for comp in Path::new(&name.replace('\\', "/")).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Files whose presence at a folder's top level makes the folder itself one project.
const PROJECT_MARKERS: &[&str] =
    &["pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini", "conftest.py", "requirements.txt"];

/// The projects in a folder: the folder itself when it looks like one project (a packaging or
/// pytest file, a Python file or a `tests`/`test` folder at its top level), else each top-level
/// folder (hidden folders and `__MACOSX` ignored). Names are folder names; sorted.
pub fn split_projects(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut folders = Vec::new();
    let mut is_project = false;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ty = entry.file_type()?;
        if ty.is_file() && (PROJECT_MARKERS.contains(&name.as_str()) || name.ends_with(".py")) {
            is_project = true;
        }
        if ty.is_dir() {
            if name == "tests" || name == "test" {
                is_project = true;
            }
            if !name.starts_with('.') && name != "__MACOSX" && name != "__pycache__" {
                folders.push((name, entry.path()));
            }
        }
    }
    if is_project || folders.is_empty() {
        let name = root
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "project".into());
        return Ok(vec![(name, root.to_path_buf())]);
    }
    folders.sort();
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn extracts_nested_files() {
        let d = tempfile::tempdir().unwrap();
        let n =
            extract_zip(&zip_of(&[("p/a.py", b"x=1"), ("p/tests/test_a.py", b"def test(): pass")]), d.path())
                .unwrap();
        assert_eq!(n, 2);
        assert_eq!(std::fs::read_to_string(d.path().join("p/tests/test_a.py")).unwrap(), "def test(): pass");
    }

    #[test]
    fn zip_slip_and_absolute_paths_are_refused_before_writing_anything() {
        for bad in ["../evil.py", "p/../../evil.py", "/etc/evil", "..\\evil.py", "C:\\evil"] {
            let d = tempfile::tempdir().unwrap();
            let err =
                extract_zip(&zip_of(&[("p/ok.py", b"1"), (bad, b"2")]), &d.path().join("out")).unwrap_err();
            assert!(matches!(err, ArchiveError::UnsafePath(_)), "{bad}: {err}");
            assert!(!d.path().join("out/p/ok.py").exists(), "{bad}: nothing is extracted");
        }
    }

    #[test]
    fn bombs_and_too_many_entries_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![0u8; 3 * 1024 * 1024];
        let caps = Caps { max_total_bytes: 1024 * 1024, max_files: 10 };
        let err = extract_zip_with(&zip_of(&[("bomb.bin", &big)]), &d.path().join("o"), caps).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge { .. }), "{err}");
        let many: Vec<(String, &[u8])> = (0..11).map(|i| (format!("f{i}"), &b"x"[..])).collect();
        let refs: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let err = extract_zip_with(&zip_of(&refs), &d.path().join("o2"), caps).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyFiles { limit: 10 }), "{err}");
    }

    #[test]
    fn garbage_is_malformed() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(extract_zip(b"not a zip", d.path()), Err(ArchiveError::Malformed(_))));
    }

    #[test]
    fn projects_are_the_root_or_its_folders() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/tests")).unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::create_dir_all(d.path().join("__MACOSX")).unwrap();
        let names: Vec<String> = split_projects(d.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        std::fs::write(d.path().join("pyproject.toml"), "").unwrap();
        let one = split_projects(d.path()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].1, d.path());
    }
}
