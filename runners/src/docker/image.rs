//! `cdtester image build`: the docker runner's base image, built with no image registry.
//!
//! Recipe: `debootstrap --variant=minbase --include=python3 bookworm` from the machine's Debian
//! mirror into a scratch root file system; pytest and its dependencies as pinned wheels fetched
//! on the host with `pip download` and installed offline *by the root file system's own
//! interpreter* (in a chroot, so their bytecode is compiled for it: the container's root is
//! read-only and could not cache it later); apt caches, package lists, docs, man pages and
//! locales removed; the tree streamed as a tar into the engine's import API (`fromSrc=-`).
//!
//! The image is tagged `cdtester-runner:<version>`, where the version is a hash of the recipe
//! (suite, packages, pinned wheels, removals, image settings), and also with the configured tag
//! (`cdtester-runner:latest` by default). A build whose version tag already exists only
//! re-points the configured tag and returns.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptionsBuilder, TagImageOptionsBuilder};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::DockerError;

/// Repository name of the runner image.
pub const IMAGE_REPO: &str = "cdtester-runner";
/// Image label holding the image's Python `major.minor` (per-project wheels must match it).
pub const PYTHON_LABEL: &str = "cdtester.python";
/// Image label holding the recipe version.
pub const VERSION_LABEL: &str = "cdtester.image.version";
/// The Debian release the image is made from.
pub const SUITE: &str = "bookworm";
/// Python `major.minor` of `SUITE`'s `python3`.
pub const PYTHON_VERSION: &str = "3.11";
/// Debian packages on top of `minbase`.
const PACKAGES: &[&str] = &["python3"];
/// Wheels installed into the image, every one pinned (pytest 9.2.0 is the version the corpus
/// expectations were measured with; pip is there to install per-project wheels offline).
pub const WHEELS: &[&str] = &[
    "pytest==9.2.0",
    "iniconfig==2.3.1",
    "packaging==26.3",
    "pluggy==1.7.0",
    "pygments==2.21.0",
    "pip==25.3",
];
/// Paths (relative to the root) emptied before import.
const STRIP: &[&str] = &[
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
];
/// Where the wheels go inside the root (Debian's `python3` has it on `sys.path`).
const SITE: &str = "usr/local/lib/python3.11/dist-packages";
/// Bumped whenever the build steps change in a way the lists above do not show.
const RECIPE_FORMAT: u32 = 1;
/// Image settings applied at import (`docker import --change`).
const CHANGES: &[&str] = &["CMD [\"/bin/sleep\", \"infinity\"]", "ENV LANG=C.UTF-8"];

/// What `build_image` needs from its caller.
#[derive(Debug, Clone)]
pub struct ImageBuildOptions {
    /// Tag to point at the built image (`runner.docker.image`).
    pub tag: String,
    /// Debian mirror; `None` reads the machine's apt sources (falling back to deb.debian.org).
    pub mirror: Option<String>,
    /// Host interpreter used for `pip download`.
    pub python: PathBuf,
    /// Scratch space for the root file system (about 300 MiB).
    pub work_dir: PathBuf,
    /// Rebuild even if the version tag exists.
    pub force: bool,
}

/// What `build_image` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuilt {
    /// `cdtester-runner:<version>`.
    pub versioned_tag: String,
    /// The configured tag, now pointing at the same image.
    pub tag: String,
    /// Engine image id.
    pub id: String,
    /// False when the version already existed and nothing was built.
    pub built: bool,
}

/// The recipe's content version: 16 hex digits of a sha256 over every build input.
pub fn recipe_version() -> String {
    let mut h = Sha256::new();
    let mut feed = |part: &str| {
        h.update(part.as_bytes());
        h.update([0]);
    };
    feed(&RECIPE_FORMAT.to_string());
    feed(SUITE);
    feed("minbase");
    PACKAGES.iter().for_each(|p| feed(p));
    feed("wheels");
    WHEELS.iter().for_each(|w| feed(w));
    feed("strip");
    STRIP.iter().for_each(|s| feed(s));
    feed(SITE);
    CHANGES.iter().for_each(|c| feed(c));
    hex::encode(&h.finalize()[..8])
}

/// `cdtester-runner:<recipe version>`.
pub fn versioned_tag() -> String {
    format!("{IMAGE_REPO}:{}", recipe_version())
}

/// The first Debian mirror of the machine's apt configuration (deb822 `URIs:` or a one-line
/// `deb URI SUITE` entry), ignoring the security archive.
pub fn configured_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).find_map(|text| mirror_in(&text))
}

fn mirror_in(sources: &str) -> Option<String> {
    sources.lines().map(str::trim).find_map(|line| {
        let uri = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().next()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace().find(|w| !w.starts_with('['))
        } else {
            None
        }?;
        (uri.starts_with("http") && !uri.contains("security")).then(|| uri.to_string())
    })
}

/// Builds (or finds) the runner image and points `opts.tag` at it.
pub async fn build_image(docker: &Docker, opts: &ImageBuildOptions) -> Result<ImageBuilt, DockerError> {
    let versioned = versioned_tag();
    if !opts.force
        && let Ok(found) = docker.inspect_image(&versioned).await
    {
        let id = found.id.unwrap_or_default();
        tag_as(docker, &versioned, &opts.tag).await?;
        tracing::info!(image = %versioned, "runner image already built; nothing to do");
        return Ok(ImageBuilt { versioned_tag: versioned, tag: opts.tag.clone(), id, built: false });
    }
    let mirror = opts
        .mirror
        .clone()
        .or_else(configured_mirror)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string());
    std::fs::create_dir_all(&opts.work_dir)?;
    let scratch = tempfile::Builder::new().prefix("cdtester-image-").tempdir_in(&opts.work_dir)?;
    let rootfs = scratch.path().join("rootfs");
    let wheels = scratch.path().join("wheels");

    tracing::info!(%mirror, suite = SUITE, "debootstrap (about 40 s)");
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase").arg(format!("--include={}", PACKAGES.join(","))).arg(SUITE);
    cmd.arg(&rootfs).arg(&mirror);
    run(cmd, "debootstrap").await?;

    tracing::info!("downloading pinned wheels on the host");
    let mut cmd = Command::new(&opts.python);
    cmd.args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]);
    cmd.args(["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]);
    cmd.arg("--dest").arg(&wheels).args(WHEELS);
    run(cmd, "pip download").await?;

    install_wheels(&rootfs, &wheels).await?;
    strip(&rootfs)?;

    tracing::info!(image = %versioned, "importing the root file system");
    let id = import(docker, &rootfs, &versioned).await?;
    tag_as(docker, &versioned, &opts.tag).await?;
    drop(scratch);
    Ok(ImageBuilt { versioned_tag: versioned, tag: opts.tag.clone(), id, built: true })
}

/// Installs the downloaded wheels with the root's own Python (in a chroot, clean environment).
async fn install_wheels(rootfs: &Path, wheels: &Path) -> Result<(), DockerError> {
    let inside = rootfs.join("tmp/cdtester-wheels");
    std::fs::create_dir_all(&inside)?;
    let mut pip_wheel = None;
    for entry in std::fs::read_dir(wheels)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        std::fs::copy(entry.path(), inside.join(&name))?;
        if name.starts_with("pip-") {
            pip_wheel = Some(name);
        }
    }
    let pip_wheel =
        pip_wheel.ok_or_else(|| DockerError::Image("pip download fetched no pip wheel".into()))?;
    let mut cmd = Command::new("chroot");
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("LANG", "C.UTF-8");
    cmd.arg(rootfs).arg("/usr/bin/python3").arg(format!("/tmp/cdtester-wheels/{pip_wheel}/pip"));
    cmd.args(["install", "--quiet", "--no-index", "--find-links", "/tmp/cdtester-wheels", "--no-deps"]);
    cmd.args(["--break-system-packages", "--root-user-action=ignore", "--disable-pip-version-check"]);
    cmd.args(WHEELS);
    run(cmd, "pip install (chroot)").await?;
    std::fs::remove_dir_all(&inside)?;
    if !rootfs.join(SITE).join("pytest").is_dir() {
        return Err(DockerError::Image(format!("pytest did not land in /{SITE}")));
    }
    Ok(())
}

fn strip(rootfs: &Path) -> Result<(), DockerError> {
    for rel in STRIP {
        let dir = rootfs.join(rel);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// Streams `tar -C rootfs -c .` into `POST /images/create?fromSrc=-` and returns the image id.
async fn import(docker: &Docker, rootfs: &Path, versioned: &str) -> Result<String, DockerError> {
    let (repo, tag) = versioned.split_once(':').unwrap_or((versioned, "latest"));
    let mut child = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DockerError::Command { what: "tar".into(), detail: e.to_string() })?;
    let stdout = child.stdout.take().ok_or_else(|| DockerError::Image("tar has no stdout".into()))?;
    let body = futures_util::stream::unfold(stdout, |mut out| async move {
        let mut buf = vec![0u8; 1 << 20];
        match out.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), out))
            }
            Err(e) => Some((Err(e), out)),
        }
    });
    let python_label = format!("LABEL {PYTHON_LABEL}={PYTHON_VERSION} {VERSION_LABEL}={}", recipe_version());
    let mut changes: Vec<String> = CHANGES.iter().map(|c| c.to_string()).collect();
    changes.push(python_label);
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .message("cdtester image build")
        .changes(changes)
        .build();
    let mut progress = docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
    while let Some(item) = progress.next().await {
        item.map_err(|e| DockerError::engine("importing the image", e))?;
    }
    let status = child.wait().await?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err).await?;
        }
        return Err(DockerError::Command { what: "tar".into(), detail: format!("{status}: {}", err.trim()) });
    }
    let found =
        docker.inspect_image(versioned).await.map_err(|e| DockerError::engine("inspecting the image", e))?;
    Ok(found.id.unwrap_or_default())
}

pub async fn tag_as(docker: &Docker, source: &str, target: &str) -> Result<(), DockerError> {
    if source == target {
        return Ok(());
    }
    let (repo, tag) = match target.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (target, "latest"),
    };
    let options = TagImageOptionsBuilder::default().repo(repo).tag(tag).build();
    docker.tag_image(source, Some(options)).await.map_err(|e| DockerError::engine("tagging the image", e))
}

/// Runs a build step, turning a failure into an error that carries the tail of its stderr.
pub async fn run(mut cmd: Command, what: &str) -> Result<(), DockerError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| DockerError::Command { what: what.into(), detail: format!("cannot start: {e}") })?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(if out.stderr.is_empty() { &out.stdout } else { &out.stderr }).into_owned();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(DockerError::Command { what: what.into(), detail: format!("{}: {}", out.status, tail.join("\n")) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_stable_hex_and_tagged() {
        let v = recipe_version();
        assert_eq!(v.len(), 16);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(v, recipe_version());
        assert_eq!(versioned_tag(), format!("cdtester-runner:{v}"));
    }

    #[test]
    fn pytest_is_pinned_to_the_corpus_version() {
        assert!(WHEELS.contains(&"pytest==9.2.0"));
        assert!(WHEELS.iter().all(|w| w.contains("==")));
    }

    #[test]
    fn mirror_is_read_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/x\nURIs: http://deb.example/debian\nSuites: bookworm\n\
                      \nTypes: deb\nURIs: http://deb.example/debian-security\n";
        assert_eq!(mirror_in(deb822).as_deref(), Some("http://deb.example/debian"));
        let security_first = "URIs: http://deb.example/debian-security\nURIs: http://m.example/debian\n";
        assert_eq!(mirror_in(security_first).as_deref(), Some("http://m.example/debian"));
        let one_line = "# comment\ndeb [arch=amd64] http://ftp.example/debian bookworm main\n";
        assert_eq!(mirror_in(one_line).as_deref(), Some("http://ftp.example/debian"));
        assert_eq!(mirror_in("deb cdrom:[x]/ bookworm main\n"), None);
    }

    #[test]
    fn strip_empties_listed_directories_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/share/doc/pkg")).unwrap();
        std::fs::write(root.join("usr/share/doc/pkg/README"), "x").unwrap();
        std::fs::create_dir_all(root.join("var/cache/apt/archives")).unwrap();
        std::fs::write(root.join("var/cache/apt/archives/a.deb"), "x").unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/python3"), "x").unwrap();
        strip(root).unwrap();
        assert!(root.join("usr/share/doc").is_dir());
        assert_eq!(std::fs::read_dir(root.join("usr/share/doc")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(root.join("var/cache/apt/archives")).unwrap().count(), 0);
        assert!(root.join("usr/bin/python3").is_file());
    }
}
