//! A project's Python environment for the docker runner, made without network in any container.
//!
//! Two things may be needed on top of the image: the extra requirements the configuration asks
//! for (test-only dependencies such as hypothesis), and the project itself when it uses a src
//! layout that pytest cannot import uninstalled (`pip install --no-deps .`).
//!
//! How (nothing the submitter wrote is an argument of a host process, no untrusted code runs on
//! the host, no container has network):
//! 1. Every requirement, the configured ones and the project's `[build-system].requires`, must be
//!    a strict PEP 508 `name[extras] <specifiers> ; <marker>` ([`cdtester_runner_api::requirement`]):
//!    no URL, path, `@` or leading `-`. Anything else refuses the project.
//! 2. On the host, `pip download --only-binary=:all: --no-cache-dir` fetches wheels, never
//!    sdists, for the image's Python and platform, with the requirements (in canonical form)
//!    after `--`, in an empty working directory, under a size cap (its temporary files
//!    included) and a timeout. A requirement that has no wheel
//!    is refused: nothing is ever built on the host.
//! 3. In a sandbox with the usual profile (network none) whose bind mounts are all read-only
//!    (the project at `/project`, the wheels at `/wheels`), the image's own pip installs from those
//!    wheels only (`--no-index --find-links`) into `/tmp/work/env` on the container's tmpfs,
//!    which is `runner.docker.env_mb` large; the project is built there from a copy, so its
//!    (untrusted) build backend runs only inside the sandbox.
//! 4. The result is streamed out as a tar and unpacked on the host by [`unpack_checked`]: at most
//!    `env_mb` MiB of file data and [`MAX_FILES`] entries ([`OutputCaps`]), only directories, regular files and
//!    symlinks that stay inside the environment. It is then mounted read-only at `/env` and put
//!    on `PYTHONPATH` for every run.
//!
//! Environments are cached by a key over the image, the requirements and (when the project is
//! installed) the project's content hash, and published atomically by a rename.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use cdtester_runner_api::RunnerError;
use cdtester_runner_api::requirement::{self, Requirement};
use sha2::{Digest, Sha256};

use crate::wheelhouse::PackageSource;

/// Most entries (files, directories, links) a built environment may hold.
pub const MAX_FILES: u64 = 100_000;

/// What a project needs on top of the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvPlan {
    /// Extra requirements, installed with their dependencies.
    pub requirements: Vec<Requirement>,
    /// Whether the project itself must be installed (`pip install --no-deps .`).
    pub install_project: bool,
    /// Wheels needed to build the project (only when `install_project`).
    pub build_requires: Vec<Requirement>,
}

impl EnvPlan {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty() && !self.install_project
    }

    /// Cache key of the environment this plan makes from `image_id` for a project whose files
    /// hash to `content_hash`.
    pub fn key(&self, image_id: &str, content_hash: &str) -> String {
        let mut h = Sha256::new();
        h.update(image_id.as_bytes());
        for r in &self.requirements {
            h.update([0]);
            h.update(r.to_string().as_bytes());
        }
        if self.install_project {
            h.update(b"\0install\0");
            h.update(content_hash.as_bytes());
            for r in &self.build_requires {
                h.update([0]);
                h.update(r.to_string().as_bytes());
            }
        }
        hex::encode(&h.finalize()[..12])
    }
}

/// The plan for the project at `root` with the configured `extra` requirements; refused when a
/// requirement is not a strict PEP 508 requirement.
pub fn plan(root: &Path, extra: &[String]) -> Result<EnvPlan, RunnerError> {
    let extra: Vec<&str> = extra.iter().map(|r| r.trim()).filter(|r| !r.is_empty()).collect();
    let mut requirements =
        requirement::parse_all(&extra).map_err(|e| RunnerError::Prepare(format!("extra {e}")))?;
    sort_unique(&mut requirements);
    let install_project = crate::local::needs_install(root);
    let build_requires = if install_project {
        requirement::parse_all(&build_requires(root))
            .map_err(|e| RunnerError::Prepare(format!("build {e}")))?
    } else {
        Vec::new()
    };
    Ok(EnvPlan { requirements, install_project, build_requires })
}

fn sort_unique(reqs: &mut Vec<Requirement>) {
    reqs.sort_by_cached_key(Requirement::to_string);
    reqs.dedup();
}

/// `[build-system].requires` of pyproject.toml; setuptools' defaults when it is absent. `wheel`
/// is always added (older setuptools asks for it dynamically).
pub fn build_requires(root: &Path) -> Vec<String> {
    let declared = std::fs::read_to_string(root.join("pyproject.toml"))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            let reqs = t.get("build-system")?.get("requires")?.as_array()?.clone();
            Some(reqs.into_iter().filter_map(|v| v.as_str().map(str::to_string)).collect::<Vec<_>>())
        });
    let mut reqs = declared.unwrap_or_else(|| vec!["setuptools>=40.8.0".to_string()]);
    reqs.push("wheel".into());
    reqs.sort();
    reqs.dedup();
    reqs
}

/// `pip download` arguments that select wheels, never sdists, for the image's interpreter on this
/// machine's architecture (glibc 2.36 in bookworm: every manylinux tag up to it), followed by
/// `--` and `reqs` in canonical form.
pub fn download_args(
    python_version: &str,
    source: &PackageSource,
    dest: &Path,
    reqs: &[Requirement],
) -> Vec<String> {
    let arch = std::env::consts::ARCH;
    let mut args: Vec<String> = [
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--only-binary=:all:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--python-version".into(),
        python_version.to_string(),
        "--implementation".into(),
        "cp".into(),
    ]);
    for minor in (17..=36).rev() {
        args.extend(["--platform".into(), format!("manylinux_2_{minor}_{arch}")]);
    }
    for legacy in ["manylinux2014", "manylinux2010", "manylinux1"] {
        args.extend(["--platform".into(), format!("{legacy}_{arch}")]);
    }
    args.extend(source.pip_args().into_iter().map(|a| a.to_string_lossy().into_owned()));
    args.extend(["--dest".into(), dest.to_string_lossy().into_owned()]);
    args.extend(requirement::pip_requirement_args(reqs));
    args
}

/// Bytes of file data under `dir` (symlinks not followed). Entries that vanish during the walk
/// (a running pip moves and removes its temporary files) count as nothing.
pub fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let meta = match entry.and_then(|e| e.metadata().map(|m| (e.path(), m))) {
                Ok(found) => found,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            match meta {
                (path, m) if m.is_dir() => stack.push(path),
                (_, m) => total += m.len(),
            }
        }
    }
    Ok(total)
}

/// How much a built environment may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCaps {
    /// MiB of file data (sizes as declared, so a sparse file counts in full).
    pub mib: u64,
    /// Entries: files, directories and links.
    pub files: u64,
}

/// Why a built environment was not kept.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("environment build output over {0} MiB (runner.docker.env_mb)")]
    TooBig(u64),
    #[error("environment build output has over {0} entries")]
    TooManyFiles(u64),
    #[error("environment build output refused: {path}: {why}")]
    Refused { path: String, why: &'static str },
    #[error("environment build output is not a readable tar stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Unpacks the tar stream `archive` (a built environment, made by untrusted code) into `dest`,
/// which must not exist, keeping only what is safe to mount: directories, regular files (modes
/// reduced to 0644 or 0755) and symlinks whose target is relative and only descends (no `..`,
/// so no chain of links can leave `dest`), with relative entry paths free of `..`, within
/// `caps`. On error `dest` may hold a partial tree; the caller removes it.
pub fn unpack_checked(archive: impl Read, dest: &Path, caps: OutputCaps) -> Result<(), OutputError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(dest)?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    let max_bytes = caps.mib.saturating_mul(1 << 20);
    // Headers and long names count too (1 KiB per entry, plus slack).
    let stream_cap = max_bytes.saturating_add(caps.files.saturating_mul(1 << 10)).saturating_add(16 << 20);
    let mut tar = tar::Archive::new(Capped { inner: archive, left: stream_cap, hit: false });
    let result = unpack_entries(&mut tar, dest, caps, max_bytes);
    if tar.into_inner().hit {
        return Err(OutputError::TooBig(caps.mib));
    }
    result
}

fn unpack_entries<R: Read>(
    tar: &mut tar::Archive<R>,
    dest: &Path,
    caps: OutputCaps,
    max_bytes: u64,
) -> Result<(), OutputError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut links: Vec<PathBuf> = Vec::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        entries += 1;
        if entries > caps.files {
            return Err(OutputError::TooManyFiles(caps.files));
        }
        let raw = entry.path()?.into_owned();
        let shown = raw.to_string_lossy().chars().take(200).collect::<String>();
        let refuse = |why| Err(OutputError::Refused { path: shown.clone(), why });
        let Some(rel) = relative_descending(&raw) else {
            return refuse("absolute path or `..` in the archive");
        };
        if rel.as_os_str().is_empty() {
            continue; // the archive's root, `.`
        }
        if links.iter().any(|l| rel.starts_with(l)) {
            return refuse("written through a symlink");
        }
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if kind.is_dir() {
            match std::fs::create_dir(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                other => other?,
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse() {
            bytes = bytes.saturating_add(entry.size());
            if bytes > max_bytes {
                return Err(OutputError::TooBig(caps.mib));
            }
            let exec = entry.header().mode().unwrap_or(0) & 0o111 != 0;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if exec { 0o755 } else { 0o644 })
                .open(&path)?;
            let copied = std::io::copy(&mut (&mut entry).take(max_bytes), &mut file)?;
            if copied != entry.size() {
                return refuse("file data shorter than its header says");
            }
        } else if kind.is_symlink() {
            let target = entry.link_name()?.map(|t| t.into_owned()).unwrap_or_default();
            let descends = relative_descending(&target).is_some_and(|t| !t.as_os_str().is_empty());
            if !descends {
                return refuse("symlink pointing outside the environment (absolute or with `..`)");
            }
            std::os::unix::fs::symlink(&target, &path)?;
            links.push(rel);
        } else {
            return refuse("not a directory, regular file or symlink (hard link, device or fifo)");
        }
    }
    Ok(())
}

/// A reader that fails once `left` bytes have been read (and says so in `hit`).
struct Capped<R> {
    inner: R,
    left: u64,
    hit: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            self.hit = true;
            return Err(std::io::Error::other("stream over its cap"));
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// `path` without `.` components, if it is relative and has no `..`.
fn relative_descending(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Copies the project tree at `from` to `to` (which must not exist) so that the container's
/// unprivileged user can read it: directories 0755, files 0644 (0755 if executable by anyone).
/// Symlinks are copied as links; other file types are skipped.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |m: u32| std::fs::Permissions::from_mode(m);
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, mode(0o755))?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(from.join(&rel))? {
            let entry = entry?;
            let rel_path = rel.join(entry.file_name());
            let (src, dst) = (entry.path(), to.join(&rel_path));
            let meta = std::fs::symlink_metadata(&src)?;
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            } else if meta.is_dir() {
                std::fs::create_dir(&dst)?;
                std::fs::set_permissions(&dst, mode(0o755))?;
                stack.push(rel_path);
            } else if meta.is_file() {
                std::fs::copy(&src, &dst)?;
                let exec = meta.permissions().mode() & 0o111 != 0;
                std::fs::set_permissions(&dst, mode(if exec { 0o755 } else { 0o644 }))?;
            }
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
    fn build_requires_come_from_pyproject() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pyproject.toml", "[build-system]\nrequires = [\"flit_core >=3.11,<4\"]\n");
        assert_eq!(build_requires(dir.path()), vec!["flit_core >=3.11,<4".to_string(), "wheel".to_string()]);
    }

    #[test]
    fn setup_py_projects_build_with_setuptools() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "setup.py", "from setuptools import setup\nsetup()\n");
        assert_eq!(build_requires(dir.path()), vec!["setuptools>=40.8.0".to_string(), "wheel".to_string()]);
    }

    fn req(text: &str) -> Requirement {
        requirement::parse(text).unwrap()
    }

    #[test]
    fn plan_keys_change_with_inputs() {
        let a = EnvPlan { requirements: vec![req("hypothesis==6.170.15")], ..Default::default() };
        let b = EnvPlan { requirements: vec![req("hypothesis==6.170.14")], ..Default::default() };
        assert_ne!(a.key("img", "h1"), b.key("img", "h1"));
        assert_ne!(a.key("img", "h1"), a.key("img2", "h1"));
        assert_eq!(a.key("img", "h1"), a.key("img", "h2"), "not installed: content does not matter");
        let c = EnvPlan { install_project: true, ..a.clone() };
        assert_ne!(c.key("img", "h1"), c.key("img", "h2"));
        assert!(EnvPlan::default().is_empty());
    }

    #[test]
    fn plans_refuse_urls_and_options_from_the_project_and_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "src/pkg/__init__.py", "");
        write(dir.path(), "pyproject.toml", "[build-system]\nrequires = [\"hatchling >= 1.26\"]\n");
        let ok = plan(dir.path(), &[" hypothesis==6.170.15 ".into(), String::new()]).unwrap();
        assert_eq!(ok.requirements, vec![req("hypothesis==6.170.15")]);
        assert_eq!(ok.build_requires, vec![req("hatchling>=1.26"), req("wheel")]);
        write(dir.path(), "pyproject.toml", "[build-system]\nrequires = [\"evil @ http://h/e-1.tar.gz\"]\n");
        let err = plan(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("build requirement") && err.contains("refused"), "{err}");
        let err = plan(dir.path(), &["-r/etc/passwd".into()]).unwrap_err().to_string();
        assert!(err.contains("extra requirement") && err.contains("pip option"), "{err}");
    }

    #[test]
    fn download_args_select_wheels_for_the_image_and_end_options() {
        let args = download_args("3.11", &PackageSource::default(), Path::new("/w"), &[req("a>=1")]);
        assert!(args.contains(&"--only-binary=:all:".to_string()));
        assert!(args.iter().any(|a| a.starts_with("manylinux_2_17_")));
        assert_eq!(&args[args.len() - 3..], ["/w", "--", "a>=1"]);
        assert!(!args.contains(&"--no-index".to_string()));
        let house = tempfile::tempdir().unwrap();
        let source = PackageSource::new(Some(house.path())).unwrap();
        let args = download_args("3.11", &source, Path::new("/w"), &[req("a>=1")]);
        let at = args.iter().position(|a| a == "--no-index").expect("offline");
        assert_eq!(args[at + 1], "--find-links");
        assert_eq!(&args[args.len() - 3..], ["/w", "--", "a>=1"]);
    }

    fn caps(mib: u64) -> OutputCaps {
        OutputCaps { mib, files: MAX_FILES }
    }

    /// One archive entry: path, kind, data or link target.
    type Entry<'a> = (&'a str, tar::EntryType, &'a str);

    /// A tar stream with `entries`.
    fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            if kind.is_symlink() || kind.is_hard_link() {
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            } else {
                h.set_size(data.len() as u64);
                // `set_path` refuses `..`; write the raw name to test what an attacker could send.
                let name = &mut h.as_old_mut().name;
                name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn built_environments_unpack_with_safe_modes_and_inward_links() {
        use std::os::unix::fs::PermissionsExt;
        use tar::EntryType::{Directory, Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("env");
        let stream = tar_of(&[
            ("./", Directory, ""),
            ("./pkg/", Directory, ""),
            ("./pkg/mod.py", Regular, "x = 1\n"),
            ("./bin/tool", Regular, "#!/bin/sh\n"),
            ("./alias", Symlink, "pkg/mod.py"),
        ]);
        unpack_checked(stream.as_slice(), &dest, caps(1)).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("alias")).unwrap(), "x = 1\n");
        let mode = |p: &str| std::fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755, "setuid dropped, executable kept");
        assert_eq!(mode("pkg"), 0o755);
    }

    #[test]
    fn escaping_links_paths_and_special_files_are_refused() {
        use tar::EntryType::{Block, Fifo, Link, Regular, Symlink};
        let cases: &[(&[Entry], &str)] = &[
            (&[("host-etc", Symlink, "/etc")], "symlink"),
            (&[("up", Symlink, "../../..")], "symlink"),
            (&[("a/b", Symlink, "../x")], "symlink"),
            (&[("self", Symlink, ".")], "symlink"),
            (&[("../escape.py", Regular, "x")], "`..`"),
            (&[("/abs.py", Regular, "x")], "`..`"),
            (&[("a", Symlink, "sub"), ("a/f.py", Regular, "x")], "through a symlink"),
            (&[("hard", Link, "/etc/passwd")], "hard link"),
            (&[("fifo", Fifo, "")], "fifo"),
            (&[("dev", Block, "")], "device"),
        ];
        for (entries, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let err =
                unpack_checked(tar_of(entries).as_slice(), &dir.path().join("env"), caps(1)).unwrap_err();
            assert!(err.to_string().contains(expected), "{entries:?}: {err}");
            assert!(!dir.path().join("escape.py").exists() && !Path::new("/abs.py").exists());
        }
    }

    #[test]
    fn size_and_entry_caps_hold() {
        use tar::EntryType::Regular;
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(600 << 10);
        let two = tar_of(&[("a", Regular, &big), ("b", Regular, &big)]);
        let err = unpack_checked(two.as_slice(), &dir.path().join("env"), caps(1)).unwrap_err();
        assert!(matches!(err, OutputError::TooBig(1)), "{err}");
        assert!(err.to_string().contains("over 1 MiB"));
        unpack_checked(two.as_slice(), &dir.path().join("env2"), caps(2)).unwrap();
        let few = OutputCaps { mib: 2, files: 1 };
        let err = unpack_checked(two.as_slice(), &dir.path().join("env3"), few).unwrap_err();
        assert!(matches!(err, OutputError::TooManyFiles(1)), "{err}");
        // A header declaring more data than the stream holds (a cut or forged stream).
        let mut cut = tar_of(&[("a", Regular, &big)]);
        cut.truncate(4096);
        assert!(unpack_checked(cut.as_slice(), &dir.path().join("env4"), caps(1)).is_err());
    }

    #[test]
    fn dir_size_counts_files_below_and_tolerates_a_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a/b/c.whl", "12345");
        write(dir.path(), "d.whl", "678");
        assert_eq!(dir_size(dir.path()).unwrap(), 8);
        assert_eq!(dir_size(&dir.path().join("gone")).unwrap(), 0);
    }

    #[test]
    fn copy_is_readable_by_everyone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write(&src, "pkg/mod.py", "x = 1\n");
        write(&src, "run.sh", "#!/bin/sh\n");
        std::fs::set_permissions(src.join("pkg/mod.py"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(src.join("pkg"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("pkg/mod.py", src.join("link.py")).unwrap();
        let to = dir.path().join("copy");
        copy_tree(&src, &to).unwrap();
        let mode = |p: &str| std::fs::metadata(to.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("pkg/mod.py"), 0o644);
        assert_eq!(mode("pkg"), 0o755);
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(std::fs::read_to_string(to.join("link.py")).unwrap(), "x = 1\n");
    }
}
