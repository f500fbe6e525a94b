//! Obtaining projects: git repositories (git2: `https://` with a token, `git://` and, when the
//! operator allows it, local paths and `file://`) and zip uploads, and packing a project tree into
//! the canonical archive that `GET /file/<project id>` serves and whose sha256 identifies the
//! project's content.
//!
//! Everything here handles hostile input: URLs are checked against an [`UrlPolicy`] before any
//! clone; clones run under [`CloneLimits`] (a wall-clock deadline, a download cap, and file and
//! byte caps on the tree, checked before anything is checked out); uploads are received into
//! [`Upload`] files on disk and extracted under [`archive::Caps`].
//!
//! Tokens are used only for the clone on the node that received the submission: they are never
//! stored, logged, replicated or returned (URLs are stored as [`redact_url`] gives them).

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use cdtester_config::IntakeConfig;
use cdtester_runner_api::sha256_hex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::archive::{self, ArchiveError, Caps};

/// Directories never packed into a project archive (VCS data and caches).
const SKIP_DIRS: &[&str] = &[".git", "__pycache__", ".pytest_cache", ".hypothesis", ".tox", ".nox", ".venv"];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot clone {url}: {reason}")]
    Clone { url: String, reason: String },
    #[error("not a git URL or path: {0}")]
    BadUrl(String),
    #[error("{url}: {reason}")]
    NotAllowed { url: String, reason: &'static str },
    #[error("at most {limit} git URLs per submission")]
    TooManyUrls { limit: usize },
    #[error("invalid archive: {0}")]
    Archive(#[from] ArchiveError),
    #[error("the archive holds no project folder (expected one top-level folder per project)")]
    NoProjects,
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("packing the project failed: {0}")]
    Pack(String),
}

impl FetchError {
    /// Whether this is the node's own failure (disk, I/O) rather than the submission's: its
    /// message names host paths, so it is logged, not shown to the client.
    pub fn is_local(&self) -> bool {
        matches!(self, FetchError::Io { .. } | FetchError::Archive(ArchiveError::Io { .. }))
    }
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

/// `url` as it may be stored, shown and replicated: without user name, password or token
/// (`https://tok@host/x` -> `https://host/x`) and without query or fragment
/// (`https://host/x?access_token=t` -> `https://host/x`).
pub fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
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
    let redacted = redact_url(url);
    let trimmed = redacted.trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// Which git URLs a submission may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Local paths and `file://` (only the command line, or an operator's explicit setting).
    pub allow_local: bool,
    /// `git://` besides `https://`.
    pub allow_git_protocol: bool,
    /// URLs per submission.
    pub max_urls: usize,
}

impl UrlPolicy {
    /// The policy of the HTTP API.
    pub fn from_config(intake: &IntakeConfig) -> UrlPolicy {
        UrlPolicy {
            allow_local: intake.allow_local_urls,
            allow_git_protocol: intake.allow_git_protocol,
            max_urls: intake.max_urls,
        }
    }

    /// Checks every URL of a submission before anything is cloned.
    pub fn check_all(&self, urls: &[String]) -> Result<(), FetchError> {
        if urls.len() > self.max_urls {
            return Err(FetchError::TooManyUrls { limit: self.max_urls });
        }
        urls.iter().try_for_each(|u| self.check(u))
    }

    /// Checks one URL: `https://` always, `git://` and local ones only when allowed; anything
    /// else (`http://`, `ssh://`, `git@host:path`, transports of libgit2's own) is refused.
    pub fn check(&self, url: &str) -> Result<(), FetchError> {
        let refuse = |reason| Err(FetchError::NotAllowed { url: redact_url(url), reason });
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return refuse("a git URL holds no spaces or control characters");
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            if self.allow_local {
                return Ok(());
            }
            return refuse(
                "local paths and scp-style addresses are not accepted over HTTP: send an https:// URL, or upload a zip",
            );
        };
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        match scheme.to_ascii_lowercase().as_str() {
            "https" if !host.is_empty() => Ok(()),
            "git" if !host.is_empty() && self.allow_git_protocol => Ok(()),
            "git" if !host.is_empty() => refuse(
                "git:// URLs are not accepted by this node (intake.allow_git_protocol); send an https:// URL",
            ),
            "file" if self.allow_local => Ok(()),
            "file" => refuse(
                "file:// URLs are not accepted over HTTP (intake.allow_local_urls); send an https:// URL, or upload a zip",
            ),
            _ => refuse("only https:// git URLs are accepted"),
        }
    }
}

/// Limits of one submission's clones.
#[derive(Debug, Clone, Copy)]
pub struct CloneLimits {
    /// When the clones of the submission must have finished.
    pub deadline: Instant,
    /// Bytes one clone may download.
    pub max_download: u64,
    /// Entries (files and folders) and file bytes of the checked-out tree.
    pub tree: Caps,
}

impl CloneLimits {
    pub fn from_config(intake: &IntakeConfig, deadline: Instant) -> CloneLimits {
        CloneLimits { deadline, max_download: intake.max_clone_bytes, tree: Caps::from_config(intake) }
    }

    /// Objects a shallow clone of a tree within the caps can hold (trees, blobs, the commit).
    fn max_objects(&self) -> usize {
        self.tree.max_files.saturating_mul(2).saturating_add(64)
    }
}

/// Why a clone was stopped by its limits.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deadline,
    Download(u64),
    Objects(usize),
}

impl Stop {
    fn reason(self) -> String {
        match self {
            Stop::Deadline => "the clone did not finish in time (intake.clone_timeout_s)".into(),
            Stop::Download(n) => format!("the repository is larger than {n} bytes (intake.max_clone_bytes)"),
            Stop::Objects(n) => format!("the repository holds more than {n} objects (intake.max_files)"),
        }
    }
}

/// Network timeouts of libgit2's sockets (connect, and each read or write): a server that
/// accepts and then says nothing fails the clone instead of holding it. Process-wide, set once
/// before the first clone.
fn set_socket_timeouts(timeout: Duration) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: runs once, before any clone of this process (every clone goes through here and
        // `Once` makes concurrent callers wait), so no git operation runs concurrently.
        let set = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(ms)
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(ms))
        };
        if let Err(e) = set {
            tracing::warn!("cannot set git socket timeouts: {e}");
        }
    });
}

/// Clones `url` (default branch, working tree only) into `dest` (must not exist or be empty)
/// under `limits`: the download stops at the deadline or past the byte or object cap, and the
/// fetched tree is measured (entries and blob sizes, from object headers) before anything is
/// checked out. `token` authenticates https clones (as the password of user `x-access-token`,
/// which GitHub, GitLab and Gitea accept). Check the URL with an [`UrlPolicy`] first.
pub fn clone_repo(
    url: &str,
    token: Option<&str>,
    dest: &Path,
    limits: &CloneLimits,
) -> Result<(), FetchError> {
    let shown = redact_url(url);
    let fail = |reason: String| {
        // libgit2 may quote the URL (with any credentials in it) or echo the token.
        let mut reason = reason.replace(url, &shown);
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            reason = reason.replace(t, "***");
        }
        FetchError::Clone { url: shown.clone(), reason }
    };
    let is_local = !url.contains("://") || url.starts_with("file://");
    if !url.contains("://") && !Path::new(url).exists() {
        return Err(fail("no such path".into()));
    }
    set_socket_timeouts(
        limits.deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(30)),
    );
    let stop: Cell<Option<Stop>> = Cell::new(None);
    let builder = |depth: bool| {
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
        callbacks.transfer_progress(|p| {
            let over = if Instant::now() >= limits.deadline {
                Some(Stop::Deadline)
            } else if p.received_bytes() as u64 > limits.max_download {
                Some(Stop::Download(limits.max_download))
            } else if p.total_objects() > limits.max_objects() {
                Some(Stop::Objects(limits.max_objects()))
            } else {
                None
            };
            stop.set(stop.get().or(over));
            over.is_none()
        });
        callbacks.sideband_progress(|_| {
            let late = Instant::now() >= limits.deadline;
            if late {
                stop.set(Some(Stop::Deadline));
            }
            !late
        });
        let mut fetch = git2::FetchOptions::new();
        fetch.remote_callbacks(callbacks);
        if depth {
            fetch.depth(1);
        }
        let mut checkout = git2::build::CheckoutBuilder::new();
        checkout.dry_run();
        let mut b = git2::build::RepoBuilder::new();
        b.fetch_options(fetch).with_checkout(checkout);
        b
    };
    // `depth` is not supported by the local transport; plain local clones are cheap anyway.
    let cloned = builder(true).clone(url, dest).or_else(|e| {
        if !is_local || stop.get().is_some() {
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(dest);
        builder(false).clone(url, dest)
    });
    let repo =
        cloned.map_err(|e| fail(stop.get().map(Stop::reason).unwrap_or_else(|| e.message().to_string())))?;
    check_tree(&repo, &limits.tree).map_err(|e| fail(e.to_string()))?;
    repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
        .map_err(|e| fail(e.message().into()))
}

/// Measures the tree of `HEAD` against `caps` without inflating any blob.
fn check_tree(repo: &git2::Repository, caps: &Caps) -> Result<(), ArchiveError> {
    let malformed = |e: git2::Error| ArchiveError::Malformed(e.message().to_string());
    let Ok(head) = repo.head() else {
        return Ok(()); // an empty repository: nothing to check out
    };
    let tree = head.peel_to_tree().map_err(malformed)?;
    let odb = repo.odb().map_err(malformed)?;
    let (mut entries, mut bytes, mut over) = (0usize, 0u64, None);
    let walked = tree.walk(git2::TreeWalkMode::PreOrder, |_, entry| {
        entries += 1;
        if entries > caps.max_files {
            over = Some(ArchiveError::TooManyFiles { limit: caps.max_files });
            return git2::TreeWalkResult::Abort;
        }
        if entry.kind() == Some(git2::ObjectType::Blob) {
            match odb.read_header(entry.id()) {
                Ok((size, _)) => bytes = bytes.saturating_add(size as u64),
                Err(e) => {
                    over = Some(malformed(e));
                    return git2::TreeWalkResult::Abort;
                }
            }
            if bytes > caps.max_total_bytes {
                over = Some(ArchiveError::TooLarge { limit: caps.max_total_bytes });
                return git2::TreeWalkResult::Abort;
            }
        }
        git2::TreeWalkResult::Ok
    });
    match over {
        Some(e) => Err(e),
        None => walked.map_err(malformed),
    }
}

/// Clones a repository and packs it: the project named after the repository.
pub fn fetch_git(
    url: &str,
    token: Option<&str>,
    work: &Path,
    limits: &CloneLimits,
) -> Result<FetchedProject, FetchError> {
    let name = name_from_url(url).ok_or_else(|| FetchError::BadUrl(redact_url(url)))?;
    let dest = tempfile::tempdir_in(work).map_err(io_err(work))?;
    let checkout = dest.path().join("repo");
    clone_repo(url, token, &checkout, limits)?;
    let archive = pack_dir(&checkout)?;
    let sha256 = sha256_hex(&archive);
    Ok(FetchedProject { name, url: Some(redact_url(url)), archive, sha256 })
}

/// The concurrency caps of the intake: clones and uploads in progress. A request that finds no
/// free slot is refused at once (503), never queued.
#[derive(Debug)]
pub struct IntakeSlots {
    clones: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
}

/// A slot of [`IntakeSlots`], held until the work it admitted has really stopped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl IntakeSlots {
    pub fn new(intake: &IntakeConfig) -> IntakeSlots {
        IntakeSlots {
            clones: Arc::new(Semaphore::new(intake.max_concurrent_clones)),
            uploads: Arc::new(Semaphore::new(intake.max_concurrent_uploads)),
        }
    }

    /// A clone slot, if one is free.
    pub fn clone_slot(&self) -> Option<Slot> {
        self.clones.clone().try_acquire_owned().ok().map(|p| Slot { _permit: p })
    }

    /// An upload slot, if one is free.
    pub fn upload_slot(&self) -> Option<Slot> {
        self.uploads.clone().try_acquire_owned().ok().map(|p| Slot { _permit: p })
    }
}

/// An uploaded zip received into a temporary file (removed on drop), with the upload slot it
/// holds until it is dropped.
#[derive(Debug)]
pub struct Upload {
    path: tempfile::TempPath,
    writer: tokio::fs::File,
    written: u64,
    _slot: Slot,
}

impl Upload {
    /// A new empty upload file in `work`.
    pub fn create(work: &Path, slot: Slot) -> Result<Upload, FetchError> {
        let file = tempfile::Builder::new()
            .prefix("upload-")
            .suffix(".zip")
            .tempfile_in(work)
            .map_err(io_err(work))?;
        let (file, path) = file.into_parts();
        Ok(Upload { path, writer: tokio::fs::File::from_std(file), written: 0, _slot: slot })
    }

    /// Appends received bytes.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(chunk).await.map_err(io_err(&self.path))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Finishes writing; the upload can then be read by [`projects_from_zip`].
    pub async fn finish(&mut self) -> Result<(), FetchError> {
        use tokio::io::AsyncWriteExt;
        self.writer.flush().await.map_err(io_err(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Splits an uploaded zip into projects, one per top-level folder (hidden folders and
/// `__MACOSX` are ignored; a zip of a single project's files is one project named `project`),
/// extracting safely (see [`crate::archive`]).
pub fn projects_from_zip(upload: &Path, work: &Path, caps: Caps) -> Result<Vec<FetchedProject>, FetchError> {
    let dir = tempfile::tempdir_in(work).map_err(io_err(work))?;
    let file = std::fs::File::open(upload).map_err(io_err(upload))?;
    archive::extract_zip_with(file, dir.path(), caps)?;
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
            // `.egg-info` stays: `python -m pytest` in the folder sees it on `sys.path` (entry
            // points such as Markdown's extensions), so the tests of the archive must too.
            if !SKIP_DIRS.contains(&name.as_str()) {
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
        assert_eq!(
            redact_url("https://u:p@host/a/calc.git?access_token=s3cret#frag"),
            "https://host/a/calc.git"
        );
        assert_eq!(name_from_url("https://host/a/calc.git?access_token=s3cret").as_deref(), Some("calc"));
        assert_eq!(name_from_url("https://github.com/a/calc.git/").as_deref(), Some("calc"));
        assert_eq!(name_from_url("file:///tmp/x/strs").as_deref(), Some("strs"));
        assert_eq!(name_from_url("https://host/"), Some("host".into()));
        assert_eq!(name_from_url(".."), None);
    }

    #[test]
    fn http_intake_accepts_https_only_unless_allowed() {
        let http = UrlPolicy { allow_local: false, allow_git_protocol: false, max_urls: 2 };
        assert!(http.check("https://github.com/a/b.git").is_ok());
        for bad in [
            "/srv/repo",
            "repo",
            "../repo",
            "file:///srv/repo",
            "FILE:///srv/repo",
            "git://host/x.git",
            "http://host/x.git",
            "ssh://host/x.git",
            "git@host:x.git",
            "https://",
            "https://host/x y",
        ] {
            assert!(matches!(http.check(bad), Err(FetchError::NotAllowed { .. })), "{bad}");
        }
        let three = vec!["https://h/a".to_string(), "https://h/b".into(), "https://h/c".into()];
        assert!(matches!(http.check_all(&three), Err(FetchError::TooManyUrls { limit: 2 })));
        let trusted = UrlPolicy { allow_local: true, allow_git_protocol: true, max_urls: 2 };
        for ok in ["/srv/repo", "file:///srv/repo", "git://host/x.git"] {
            assert!(trusted.check(ok).is_ok(), "{ok}");
        }
        assert!(trusted.check("ssh://host/x.git").is_err());
    }

    #[test]
    fn packing_is_deterministic_skips_caches_and_keeps_package_metadata() {
        let a = tempfile::tempdir().unwrap();
        write(a.path(), "tests/test_x.py", "def test_x(): pass\n");
        write(a.path(), "tests/__pycache__/x.pyc", "junk");
        write(a.path(), ".git/HEAD", "ref");
        write(a.path(), "calc.egg-info/entry_points.txt", "[calc.ext]\nabbr = calc.abbr:Abbr\n");
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
        assert_eq!(names, ["calc.egg-info/entry_points.txt", "tests/test_x.py"], "package metadata is kept");
    }

    #[test]
    fn zip_uploads_split_into_projects_and_git_repos_clone() {
        let work = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        write(src.path(), "calc/tests/test_a.py", "def test_a(): pass\n");
        write(src.path(), "strs/tests/test_b.py", "def test_b(): assert 0\n");
        write(src.path(), "README", "loose file");
        let upload = pack_dir(src.path()).unwrap();
        let upload_path = work.path().join("upload.zip");
        std::fs::write(&upload_path, &upload).unwrap();
        let projects = projects_from_zip(&upload_path, work.path(), Caps::default()).unwrap();
        let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["calc", "strs"]);
        std::fs::write(&upload_path, b"not a zip").unwrap();
        assert!(matches!(
            projects_from_zip(&upload_path, work.path(), Caps::default()),
            Err(FetchError::Archive(_))
        ));
        let limits =
            CloneLimits::from_config(&IntakeConfig::default(), Instant::now() + Duration::from_secs(60));

        let repo_dir = src.path().join("calc");
        let repo = git2::Repository::init(&repo_dir).unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("tests/test_a.py")).unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[]).unwrap();
        let url = format!("file://{}", repo_dir.display());
        let p = fetch_git(&url, Some("secret-token"), work.path(), &limits).unwrap();
        assert_eq!(p.name, "calc");
        assert_eq!(p.sha256, projects[0].sha256, "same tree, same archive");
        let err = fetch_git("git://127.0.0.1:1/nothing.git", None, work.path(), &limits).unwrap_err();
        assert!(err.to_string().contains("cannot clone git://127.0.0.1:1/nothing.git"), "{err}");
        let err = fetch_git("https://user:tok123@127.0.0.1:1/x.git", Some("tok123"), work.path(), &limits)
            .unwrap_err();
        assert!(err.to_string().starts_with("cannot clone https://127.0.0.1:1/x.git"), "{err}");
        assert!(!err.to_string().contains("tok123"), "{err}");
        let err = fetch_git("/nonexistent/repo", None, work.path(), &limits).unwrap_err();
        assert!(matches!(err, FetchError::Clone { .. }));
        // The tree is measured before checkout: a repository over the file cap is refused and
        // nothing is checked out.
        let tight = CloneLimits { tree: Caps { max_files: 1, ..Caps::default() }, ..limits };
        let dest = work.path().join("tight");
        let err = clone_repo(&url, None, &dest, &tight).unwrap_err();
        assert!(err.to_string().contains("more than 1 entries"), "{err}");
        assert!(!dest.join("tests/test_a.py").exists());
        let tiny = CloneLimits { tree: Caps { max_total_bytes: 4, ..Caps::default() }, ..limits };
        let err = clone_repo(&url, None, &work.path().join("tiny"), &tiny).unwrap_err();
        assert!(err.to_string().contains("expands to more than 4 bytes"), "{err}");
    }
}
