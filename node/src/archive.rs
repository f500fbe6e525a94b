//! Safe zip extraction and splitting an extracted tree into projects.
//!
//! Extraction refuses the whole archive (nothing is left half-trusted) when an entry's path is
//! absolute or leaves the destination (zip-slip), when an entry is a symbolic link, when the
//! archive has more entries than [`Caps::max_files`], or when the bytes actually written would
//! exceed [`Caps::max_total_bytes`] (sizes declared in the archive are not trusted).
//!
//! The entry count and the size of the central directory are read from the end-of-central-
//! directory records and checked before the directory is parsed (parsing keeps every entry in
//! memory), and the parser cannot read more than that size anyway.

use std::cell::Cell;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use cdtester_config::IntakeConfig;

/// Extraction limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Total uncompressed bytes written.
    pub max_total_bytes: u64,
    /// Entries (files and directories).
    pub max_files: usize,
    /// Bytes of the central directory (the list of entries).
    pub max_central_dir_bytes: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Caps::from_config(&IntakeConfig::default())
    }
}

impl Caps {
    /// The caps the intake configuration sets.
    pub fn from_config(intake: &IntakeConfig) -> Caps {
        Caps {
            max_total_bytes: intake.max_tree_bytes,
            max_files: intake.max_files,
            max_central_dir_bytes: intake.max_central_dir_bytes,
        }
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
    #[error("archive's central directory is larger than {limit} bytes")]
    DirectoryTooLarge { limit: u64 },
    #[error("I/O error extracting to {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_path_buf(), source }
}

/// Extracts `bytes` (a zip) into `dest` with the default [`Caps`]. Returns the number of files.
pub fn extract_zip(bytes: &[u8], dest: &Path) -> Result<usize, ArchiveError> {
    extract_zip_with(std::io::Cursor::new(bytes), dest, Caps::default())
}

/// Signatures of the zip records read before the central directory is parsed.
const EOCD_SIG: u64 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u64 = 0x0706_4b50;
const EOCD64_SIG: u64 = 0x0606_4b50;
/// Fixed size of the end-of-central-directory record; it is followed by a comment of at most
/// 64 KiB, so it starts within the last `EOCD_LEN + 4 + 65536` bytes (the window the zip reader
/// searches too).
const EOCD_LEN: u64 = 22;
const EOCD_WINDOW: u64 = EOCD_LEN + 4 + (1 << 16);

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2).map(|s| u64::from(u16::from_le_bytes([s[0], s[1]]))).unwrap_or(0)
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map(|s| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))).unwrap_or(0)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Checks what every end-of-central-directory record in the archive's tail (and the zip64
/// record a zip64 locator points to) claims, entry count and directory size, against `caps`,
/// before anything parses the directory. Every candidate is checked, so a stray signature in a
/// comment cannot hide the record the parser will use.
fn check_directory<R: Read + Seek>(reader: &mut R, caps: &Caps) -> Result<(), ArchiveError> {
    let io = |e: std::io::Error| ArchiveError::Malformed(e.to_string());
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    let start = len.saturating_sub(EOCD_WINDOW);
    reader.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut tail = Vec::new();
    reader.by_ref().take(EOCD_WINDOW).read_to_end(&mut tail).map_err(io)?;
    let mut found = false;
    for pos in (0..tail.len().saturating_sub(EOCD_LEN as usize - 1)).rev() {
        if le32(&tail, pos) != EOCD_SIG {
            continue;
        }
        found = true;
        let mut claims = vec![(le16(&tail, pos + 8).max(le16(&tail, pos + 10)), le32(&tail, pos + 12))];
        if let Some(loc) = pos.checked_sub(20)
            && le32(&tail, loc) == EOCD64_LOCATOR_SIG
        {
            let mut rec = [0u8; 56];
            reader.seek(SeekFrom::Start(le64(&tail, loc + 8))).map_err(io)?;
            if reader.read_exact(&mut rec).is_ok() && le32(&rec, 0) == EOCD64_SIG {
                claims.push((le64(&rec, 24).max(le64(&rec, 32)), le64(&rec, 40)));
            }
        }
        for (entries, size) in claims {
            if entries > caps.max_files as u64 {
                return Err(ArchiveError::TooManyFiles { limit: caps.max_files });
            }
            if size > caps.max_central_dir_bytes {
                return Err(ArchiveError::DirectoryTooLarge { limit: caps.max_central_dir_bytes });
            }
        }
    }
    if !found {
        return Err(ArchiveError::Malformed("no end of central directory record (not a zip file)".into()));
    }
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(())
}

/// A reader that fails once it has returned `budget` bytes: opening an archive reads the tail
/// and the central directory, so this bounds what the parser can see whatever the records say.
struct Budgeted<R> {
    inner: R,
    /// Bytes left; `None` once the archive is open (no limit for extraction, which is capped
    /// by bytes written).
    left: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(left) = self.left.get() {
            let Some(rest) = left.checked_sub(n as u64) else {
                self.left.set(Some(0));
                return Err(std::io::Error::other("the central directory is larger than the configured cap"));
            };
            self.left.set(Some(rest));
        }
        Ok(n)
    }
}

impl<R: Seek> Seek for Budgeted<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Extracts a zip into `dest` under `caps`. Returns the number of files written. On a size
/// error `dest` may hold part of the archive: extract into a temporary folder.
pub fn extract_zip_with<R: Read + Seek>(
    mut reader: R,
    dest: &Path,
    caps: Caps,
) -> Result<usize, ArchiveError> {
    check_directory(&mut reader, &caps)?;
    // The parser may read the directory twice (looking for its first header, then parsing it).
    let budget = caps.max_central_dir_bytes.saturating_mul(2).saturating_add(2 * EOCD_WINDOW);
    let left = Rc::new(Cell::new(Some(budget)));
    let budgeted = Budgeted { inner: reader, left: left.clone() };
    let mut zip = zip::ZipArchive::new(budgeted).map_err(|e| match left.get() {
        Some(0) => ArchiveError::DirectoryTooLarge { limit: caps.max_central_dir_bytes },
        _ => ArchiveError::Malformed(e.to_string()),
    })?;
    left.set(None);
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
        let caps = Caps { max_total_bytes: 1024 * 1024, max_files: 10, ..Caps::default() };
        let err =
            extract_zip_with(std::io::Cursor::new(zip_of(&[("bomb.bin", &big)])), &d.path().join("o"), caps)
                .unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge { .. }), "{err}");
        let many: Vec<(String, &[u8])> = (0..11).map(|i| (format!("f{i}"), &b"x"[..])).collect();
        let refs: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let err =
            extract_zip_with(std::io::Cursor::new(zip_of(&refs)), &d.path().join("o2"), caps).unwrap_err();
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
