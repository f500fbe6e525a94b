//! A project's Python environment for the docker runner, made without network in any container.
//!
//! Two things may be needed on top of the image: the extra requirements the configuration asks
//! for (test-only dependencies such as hypothesis), and the project itself when it uses a src
//! layout that pytest cannot import uninstalled (`pip install --no-deps .`).
//!
//! How (no untrusted code runs on the host, no container has network):
//! 1. On the host, `pip download --only-binary=:all:` fetches wheels, never sdists, for the
//!    image's Python and platform: the requirements with their dependencies, and the project's
//!    declared build requirements (`[build-system].requires` of its pyproject.toml, or setuptools
//!    and wheel for a setup.py project). Downloading wheels executes nothing.
//! 2. In a sandbox with the usual profile (network none), whose only writable bind mount is the
//!    environment's output directory, the image's own pip installs from those wheels only
//!    (`--no-index --find-links`) into that directory with `--target`; the project is built
//!    there too, so its (untrusted) build backend runs inside the sandbox.
//! 3. The directory is then mounted read-only at `/env` and put on `PYTHONPATH` for every run.
//!
//! Environments are cached by a key over the image, the requirements and (when the project is
//! installed) the project's content hash, and published atomically by a rename.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What a project needs on top of the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvPlan {
    /// Extra requirements, installed with their dependencies.
    pub requirements: Vec<String>,
    /// Whether the project itself must be installed (`pip install --no-deps .`).
    pub install_project: bool,
    /// Wheels needed to build the project (only when `install_project`).
    pub build_requires: Vec<String>,
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
            h.update(r.as_bytes());
        }
        if self.install_project {
            h.update(b"\0install\0");
            h.update(content_hash.as_bytes());
            for r in &self.build_requires {
                h.update([0]);
                h.update(r.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..12])
    }
}

/// The plan for the project at `root` with the configured `extra` requirements.
pub fn plan(root: &Path, extra: &[String]) -> EnvPlan {
    let mut requirements: Vec<String> =
        extra.iter().map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect();
    requirements.sort();
    requirements.dedup();
    let install_project = crate::local::needs_install(root);
    let build_requires = if install_project { build_requires(root) } else { Vec::new() };
    EnvPlan { requirements, install_project, build_requires }
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

/// `pip download` arguments that select wheels for the image's interpreter on this machine's
/// architecture (glibc 2.36 in bookworm: every manylinux tag up to it).
pub fn download_args(python_version: &str, dest: &Path) -> Vec<String> {
    let arch = std::env::consts::ARCH;
    let mut args: Vec<String> =
        ["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:"]
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
    args.extend(["--dest".into(), dest.to_string_lossy().into_owned()]);
    args
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

    #[test]
    fn plan_keys_change_with_inputs() {
        let a = EnvPlan { requirements: vec!["hypothesis==6.170.15".into()], ..Default::default() };
        let b = EnvPlan { requirements: vec!["hypothesis==6.170.14".into()], ..Default::default() };
        assert_ne!(a.key("img", "h1"), b.key("img", "h1"));
        assert_ne!(a.key("img", "h1"), a.key("img2", "h1"));
        assert_eq!(a.key("img", "h1"), a.key("img", "h2"), "not installed: content does not matter");
        let c = EnvPlan { install_project: true, ..a.clone() };
        assert_ne!(c.key("img", "h1"), c.key("img", "h2"));
        assert!(EnvPlan::default().is_empty());
    }

    #[test]
    fn download_args_select_wheels_for_the_image() {
        let args = download_args("3.11", Path::new("/w"));
        assert!(args.contains(&"--only-binary=:all:".to_string()));
        assert!(args.iter().any(|a| a.starts_with("manylinux_2_17_")));
        assert_eq!(args.last().map(String::as_str), Some("/w"));
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
