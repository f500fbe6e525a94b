//! Obtaining projects: git repositories (git2: local paths, `file://`, `git://`, and `https://`
//! with a token) and zip uploads, and packing a project tree into the canonical archive that
//! `GET /file/<project id>` serves and whose sha256 identifies the project's content.
//!
//! Tokens are used only for the clone on the node that received the submission: they are never
//! stored, logged, replicated or returned (URLs are stored with any credentials removed).

use std::io::Write;
use std::path::{Path, PathBuf};

use cdtester_runner_api::sha256_hex;

use crate::archive::{self, ArchiveError};

/// Directories never packed into a project archive (VCS data and caches).
const SKIP_DIRS: &[&str] = &[".git", "__pycache__", ".pytest_cache", ".hypothesis", ".tox", ".nox", ".venv"];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot clone {url}: {reason}")]
    Clone { url: String, reason: String },
    #[error("not a git URL or path: {0}")]
    BadUrl(String),
    #[error("invalid archive: {0}")]
    Archive(#[from] ArchiveError),
    #[error("the archive holds no project folder (expected one top-level folder per project)")]
    NoProjects,
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("packing the project failed: {0}")]
    Pack(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_path_buf(), source }
}

/// A project ready to be registered: its name and its canonical archive.
#[derive(Debug, Clone)]
pub struct FetchedProject {
    pub name: String,
    pub url: Option<String>,
    pub archive: Vec<u8>,
    pub sha256: String,
}

/// `url` without user name, password or token (`https://tok@host/x` -> `https://host/x`).
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map(|(a, p)| (a, Some(p))).unwrap_or((rest, None));
            let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
            match path {
                Some(p) => format!("{scheme}://{host}/{p}"),
                None => format!("{scheme}://{host}"),
            }
        }
        None => url.to_string(),
    }
}

/// The project name a repository URL implies: its last path component without `.git`.
pub fn name_from_url(url: &str) -> Option<String> {
    let trimmed = url.trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// Clones `url` (default branch, working tree only) into `dest` (must not exist or be empty).
/// `token` authenticates https clones (as the password of user `x-access-token`, which GitHub,
/// GitLab and Gitea accept).
pub fn clone_repo(url: &str, token: Option<&str>, dest: &Path) -> Result<(), FetchError> {
    let shown = redact_url(url);
    let is_remote = url.contains("://");
    if !is_remote && !Path::new(url).exists() {
        return Err(FetchError::Clone { url: shown, reason: "no such path".into() });
    }
    let mut callbacks = git2::RemoteCallbacks::new();
    let secret = token.map(str::to_string);
    let mut tried = false;
    callbacks.credentials(move |_url, _user, allowed| match &secret {
        Some(t) if !tried && allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) => {
            tried = true;
            git2::Cred::userpass_plaintext("x-access-token", t)
        }
        _ => Err(git2::Error::from_str("authentication failed")),
    });
    let mut fetch = git2::FetchOptions::new();
    fetch.remote_callbacks(callbacks).depth(1);
    let mut builder = git2::build::RepoBuilder::new();
    builder.fetch_options(fetch);
    // `depth` is not supported by the local transport; plain local clones are cheap anyway.
    let result = builder.clone(url, dest).or_else(|e| {
        if is_remote && !url.starts_with("file://") {
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(dest);
        git2::build::RepoBuilder::new().clone(url, dest)
    });
    result.map(|_| ()).map_err(|e| {
        // libgit2 may quote the URL (with any credentials in it) or echo the token.
        let mut reason = e.message().replace(url, &shown);
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            reason = reason.replace(t, "***");
        }
        FetchError::Clone { url: shown, reason }
    })
}

/// Clones a repository and packs it: the project named after the repository.
pub fn fetch_git(url: &str, token: Option<&str>, work: &Path) -> Result<FetchedProject, FetchError> {
    let name = name_from_url(url).ok_or_else(|| FetchError::BadUrl(redact_url(url)))?;
    let dest = tempfile::tempdir_in(work).map_err(io_err(work))?;
    let checkout = dest.path().join("repo");
    clone_repo(url, token, &checkout)?;
    let archive = pack_dir(&checkout)?;
    let sha256 = sha256_hex(&archive);
    Ok(FetchedProject { name, url: Some(redact_url(url)), archive, sha256 })
}

/// Splits an uploaded zip into projects, one per top-level folder (hidden folders and
/// `__MACOSX` are ignored; a zip of a single project's files is one project named `project`),
/// extracting safely (see [`crate::archive`]).
pub fn projects_from_zip(upload: &[u8], work: &Path) -> Result<Vec<FetchedProject>, FetchError> {
    let dir = tempfile::tempdir_in(work).map_err(io_err(work))?;
    archive::extract_zip(upload, dir.path())?;
    let found = archive::split_projects(dir.path()).map_err(io_err(dir.path()))?;
    let names: Vec<(String, PathBuf)> = found
        .into_iter()
        .map(|(name, path)| if path == dir.path() { ("project".to_string(), path) } else { (name, path) })
        .collect();
    if names.iter().all(|(_, path)| std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(true)) {
        return Err(FetchError::NoProjects);
    }
    names
        .into_iter()
        .map(|(name, path)| {
            let archive = pack_dir(&path)?;
            let sha256 = sha256_hex(&archive);
            Ok(FetchedProject { name, url: None, archive, sha256 })
        })
        .collect()
}

/// Packs the tree under `root` into a deterministic zip (sorted entries, fixed timestamps,
/// paths relative to `root`), skipping VCS and cache folders and anything not a regular file or
/// directory, so equal trees give byte-equal archives and equal hashes.
pub fn pack_dir(root: &Path) -> Result<Vec<u8>, FetchError> {
    pack_trees(&[(String::new(), root.to_path_buf())])
}

/// Packs several trees into one zip, each under its own top-level folder (`name/...`): the
/// upload format of `POST /evaluation`, one folder per project.
pub fn pack_projects(projects: &[(String, PathBuf)]) -> Result<Vec<u8>, FetchError> {
    let prefixed: Vec<(String, PathBuf)> =
        projects.iter().map(|(n, p)| (format!("{n}/"), p.clone())).collect();
    pack_trees(&prefixed)
}

fn pack_trees(trees: &[(String, PathBuf)]) -> Result<Vec<u8>, FetchError> {
    let mut files = Vec::new();
    for (prefix, root) in trees {
        let mut rels = Vec::new();
        collect_files(root, root, &mut rels)?;
        files.extend(rels.into_iter().map(|rel| (format!("{prefix}{rel}"), root.join(&rel))));
    }
    files.sort();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let pack = |e: zip::result::ZipError| FetchError::Pack(e.to_string());
    for (rel, path) in files {
        let data = std::fs::read(&path).map_err(io_err(&path))?;
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&path).map_err(io_err(&path))?.permissions().mode()
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(if mode & 0o111 != 0 { 0o755 } else { 0o644 });
        zip.start_file(rel.as_str(), options).map_err(pack)?;
        zip.write_all(&data).map_err(|e| FetchError::Pack(e.to_string()))?;
    }
    Ok(zip.finish().map_err(pack)?.into_inner())
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), FetchError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let ty = entry.file_type().map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if ty.is_dir() {
            if !SKIP_DIRS.contains(&name.as_str()) && !name.ends_with(".egg-info") {
                collect_files(root, &entry.path(), out)?;
            }
        } else if ty.is_file() && !name.ends_with(".pyc") {
            let path = entry.path();
            let rel = path.strip_prefix(root).map_err(|e| FetchError::Pack(e.to_string()))?;
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn urls_are_redacted_and_named() {
        assert_eq!(redact_url("https://user:tok@github.com/a/b.git"), "https://github.com/a/b.git");
        assert_eq!(redact_url("git://127.0.0.1:9418/proj.git"), "git://127.0.0.1:9418/proj.git");
        assert_eq!(redact_url("/srv/repo"), "/srv/repo");
        assert_eq!(name_from_url("https://github.com/a/calc.git/").as_deref(), Some("calc"));
        assert_eq!(name_from_url("file:///tmp/x/strs").as_deref(), Some("strs"));
        assert_eq!(name_from_url("https://host/"), Some("host".into()));
        assert_eq!(name_from_url(".."), None);
    }

    #[test]
    fn packing_is_deterministic_and_skips_caches() {
        let a = tempfile::tempdir().unwrap();
        write(a.path(), "tests/test_x.py", "def test_x(): pass\n");
        write(a.path(), "tests/__pycache__/x.pyc", "junk");
        write(a.path(), ".git/HEAD", "ref");
        let one = pack_dir(a.path()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(a.path(), "tests/__pycache__/y.pyc", "more junk");
        let two = pack_dir(a.path()).unwrap();
        assert_eq!(sha256_hex(&one), sha256_hex(&two));
        let names: Vec<String> = zip::ZipArchive::new(std::io::Cursor::new(one))
            .unwrap()
            .file_names()
            .map(|n| n.unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["tests/test_x.py".to_string()]);
    }

    #[test]
    fn zip_uploads_split_into_projects_and_git_repos_clone() {
        let work = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        write(src.path(), "calc/tests/test_a.py", "def test_a(): pass\n");
        write(src.path(), "strs/tests/test_b.py", "def test_b(): assert 0\n");
        write(src.path(), "README", "loose file");
        let upload = pack_dir(src.path()).unwrap();
        let projects = projects_from_zip(&upload, work.path()).unwrap();
        let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["calc", "strs"]);
        assert!(matches!(projects_from_zip(b"not a zip", work.path()), Err(FetchError::Archive(_))));

        let repo_dir = src.path().join("calc");
        let repo = git2::Repository::init(&repo_dir).unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("tests/test_a.py")).unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[]).unwrap();
        let url = format!("file://{}", repo_dir.display());
        let p = fetch_git(&url, Some("secret-token"), work.path()).unwrap();
        assert_eq!(p.name, "calc");
        assert_eq!(p.sha256, projects[0].sha256, "same tree, same archive");
        let err = fetch_git("git://127.0.0.1:1/nothing.git", None, work.path()).unwrap_err();
        assert!(err.to_string().contains("cannot clone git://127.0.0.1:1/nothing.git"), "{err}");
        let err =
            fetch_git("https://user:tok123@127.0.0.1:1/x.git", Some("tok123"), work.path()).unwrap_err();
        assert!(err.to_string().starts_with("cannot clone https://127.0.0.1:1/x.git"), "{err}");
        assert!(!err.to_string().contains("tok123"), "{err}");
        let err = fetch_git("/nonexistent/repo", None, work.path()).unwrap_err();
        assert!(matches!(err, FetchError::Clone { .. }));
    }
}
