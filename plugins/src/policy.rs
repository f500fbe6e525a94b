//! Typed policy hooks on top of [`PolicyPlugin::call`], and [`PolicySet`]: the configured
//! plugins plus the chain logic with fallbacks that the node applies to each project.

use std::collections::BTreeMap;
use std::path::Path;

use cdtester_config::{LimitsOverride, PluginsConfig};
use cdtester_runner_api::{Counts, Limits, TestResult, round2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::wasm::{CallFailure, Hook, PolicyError, PolicyPlugin, WasmHost};

/// What policies know about a project (input of `select_runner` and `admit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectMeta {
    /// Project name (top-level folder or repository name).
    pub name: String,
    /// Where it was fetched from (git URL), if anywhere.
    pub url: Option<String>,
    /// Total size of its files, bytes.
    pub size_bytes: u64,
    /// Number of files.
    pub file_count: u64,
}

impl ProjectMeta {
    /// Measures the project in `root` (regular files, symlinks not followed).
    pub fn from_dir(name: &str, url: Option<&str>, root: &Path) -> std::io::Result<ProjectMeta> {
        let mut meta =
            ProjectMeta { name: name.into(), url: url.map(Into::into), size_bytes: 0, file_count: 0 };
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let ty = entry.file_type()?;
                if ty.is_dir() {
                    stack.push(entry.path());
                } else if ty.is_file() {
                    meta.size_bytes += entry.metadata()?.len();
                    meta.file_count += 1;
                }
            }
        }
        Ok(meta)
    }
}

/// Which runner runs a project and under which limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerChoice {
    pub runner: String,
    pub limits: Limits,
}

/// Whether a project is accepted for evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Accept,
    Reject { reason: String },
}

#[derive(Serialize)]
struct SelectRunnerIn<'a> {
    project: &'a ProjectMeta,
    runner: &'a str,
    limits: &'a Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectRunnerOut {
    #[serde(default)]
    runner: Option<String>,
    #[serde(default)]
    limits: Option<LimitsOverride>,
}

#[derive(Serialize)]
struct AdmitIn<'a> {
    project: &'a ProjectMeta,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmitOut {
    admit: bool,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize)]
struct GradeIn<'a> {
    project: &'a str,
    tests: &'a [TestResult],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GradeOut {
    grade: f64,
}

impl PolicyPlugin {
    fn typed<I: Serialize, O: DeserializeOwned>(
        &self,
        hook: Hook,
        input: &I,
    ) -> Result<Option<O>, PolicyError> {
        let bad = |why: String| PolicyError::Call {
            name: self.name().into(),
            hook,
            failure: CallFailure::BadOutput(why),
        };
        let input = serde_json::to_vec(input).map_err(|e| bad(format!("cannot encode input: {e}")))?;
        match self.call(hook, &input)? {
            None => Ok(None),
            Some(out) => serde_json::from_slice(&out).map(Some).map_err(|e| {
                let shown = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
                bad(format!("{e} in {shown:?}"))
            }),
        }
    }

    /// `select_runner`: given the project and the configured runner and limits, the runner and
    /// limits the plugin wants (`None`: no opinion).
    pub fn select_runner(
        &self,
        meta: &ProjectMeta,
        current: &RunnerChoice,
    ) -> Result<Option<RunnerChoice>, PolicyError> {
        let input = SelectRunnerIn { project: meta, runner: &current.runner, limits: &current.limits };
        let out: Option<SelectRunnerOut> = self.typed(Hook::SelectRunner, &input)?;
        Ok(out.and_then(|o| {
            if o.runner.is_none() && o.limits.is_none() {
                return None;
            }
            Some(RunnerChoice {
                runner: o.runner.unwrap_or_else(|| current.runner.clone()),
                limits: o.limits.map(|l| l.apply(&current.limits)).unwrap_or_else(|| current.limits.clone()),
            })
        }))
    }

    /// `admit`: accept or reject the project (`None`: no opinion).
    pub fn admit(&self, meta: &ProjectMeta) -> Result<Option<Admission>, PolicyError> {
        let out: Option<AdmitOut> = self.typed(Hook::Admit, &AdmitIn { project: meta })?;
        Ok(out.map(|o| match o.admit {
            true => Admission::Accept,
            false => Admission::Reject {
                reason: o.reason.unwrap_or_else(|| format!("rejected by policy {}", self.name())),
            },
        }))
    }

    /// `grade`: the project's grade on 0..20 from its per-test results (`None`: no opinion).
    pub fn grade(&self, project: &str, tests: &[TestResult]) -> Result<Option<f64>, PolicyError> {
        let out: Option<GradeOut> = self.typed(Hook::Grade, &GradeIn { project, tests })?;
        match out {
            None => Ok(None),
            Some(GradeOut { grade }) if grade.is_finite() && (0.0..=20.0).contains(&grade) => {
                Ok(Some(round2(grade)))
            }
            Some(GradeOut { grade }) => Err(PolicyError::Call {
                name: self.name().into(),
                hook: Hook::Grade,
                failure: CallFailure::BadOutput(format!("grade {grade} is outside 0..20")),
            }),
        }
    }
}

/// The outcome of applying a project's policy chain.
#[derive(Debug)]
pub struct Decision<T> {
    /// The decision: a plugin's, or the fallback when none had an opinion (or all failed).
    pub value: T,
    /// The policy that decided, `None` for the fallback.
    pub decided_by: Option<String>,
    /// Failures of plugins in the chain (already logged); the chain went on past each.
    pub errors: Vec<PolicyError>,
}

/// All configured WASM policy plugins, by name.
#[derive(Clone)]
pub struct PolicySet {
    host: WasmHost,
    plugins: BTreeMap<String, PolicyPlugin>,
    /// A failing plugin refuses the project during admission and runner choice.
    fail_closed: bool,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet").field("plugins", &self.plugins).finish()
    }
}

impl PolicySet {
    /// Loads every `[[plugins.wasm]]` entry (sha256 pin, compile, ABI check). Any bad plugin
    /// fails the whole load, naming the plugin and the reason.
    pub fn load(config: &PluginsConfig) -> Result<PolicySet, PolicyError> {
        Self::load_with(WasmHost::new()?, config)
    }

    /// Like [`PolicySet::load`] on an existing host (sharing its module cache).
    pub fn load_with(host: WasmHost, config: &PluginsConfig) -> Result<PolicySet, PolicyError> {
        let mut plugins = BTreeMap::new();
        for p in &config.wasm {
            plugins.insert(p.name.clone(), host.load_configured(p)?);
        }
        Ok(PolicySet { host, plugins, fail_closed: config.fail_closed })
    }

    pub fn host(&self) -> &WasmHost {
        &self.host
    }

    pub fn get(&self, name: &str) -> Option<&PolicyPlugin> {
        self.plugins.get(name)
    }

    pub fn plugins(&self) -> impl Iterator<Item = &PolicyPlugin> {
        self.plugins.values()
    }

    /// Runs `ask` on each named policy in order until one has an opinion; failures are logged,
    /// collected and skipped; `fallback` applies when no policy decides.
    fn chain<T>(
        &self,
        policies: &[String],
        fallback: impl FnOnce() -> T,
        mut ask: impl FnMut(&PolicyPlugin) -> Result<Option<T>, PolicyError>,
    ) -> Decision<T> {
        let mut errors = Vec::new();
        for name in policies {
            let result = match self.plugins.get(name) {
                Some(plugin) => ask(plugin),
                None => Err(PolicyError::Unknown(name.clone())),
            };
            match result {
                Ok(Some(value)) => return Decision { value, decided_by: Some(name.clone()), errors },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}; applying the next policy or the default");
                    errors.push(e);
                }
            }
        }
        Decision { value: fallback(), decided_by: None, errors }
    }

    /// The runner and limits for a project: the first policy with an opinion decides; otherwise
    /// the configured choice (`configured`, from `Config::project_settings`) stands.
    pub fn select_runner(
        &self,
        policies: &[String],
        meta: &ProjectMeta,
        configured: RunnerChoice,
    ) -> Decision<RunnerChoice> {
        let fallback = configured.clone();
        self.chain(policies, move || fallback, |p| p.select_runner(meta, &configured))
    }

    /// Admission, then the runner choice: the runner and limits a project runs with, or why a
    /// policy refused it. Every caller (node, `cdtester run`) decides through this.
    pub fn decide(
        &self,
        policies: &[String],
        meta: &ProjectMeta,
        configured: RunnerChoice,
    ) -> Result<RunnerChoice, String> {
        let admission = self.admit(policies, meta);
        self.closed_on_failure(&admission)?;
        if let Admission::Reject { reason } = admission.value {
            return Err(format!("refused by policy: {reason}"));
        }
        let choice = self.select_runner(policies, meta, configured);
        self.closed_on_failure(&choice)?;
        Ok(choice.value)
    }

    /// With `plugins.fail_closed`, a decision reached past a failing plugin is a refusal.
    fn closed_on_failure<T>(&self, d: &Decision<T>) -> Result<(), String> {
        match d.errors.first() {
            Some(e) if self.fail_closed => Err(format!("refused: {e} (plugins.fail_closed)")),
            _ => Ok(()),
        }
    }

    /// Admission: the first policy with an opinion decides; by default a project is accepted.
    pub fn admit(&self, policies: &[String], meta: &ProjectMeta) -> Decision<Admission> {
        self.chain(policies, || Admission::Accept, |p| p.admit(meta))
    }

    /// The grade on 0..20: the first policy with an opinion decides; by default
    /// [`Counts::grade`] (passes / (passes + failures) * 20), `None` when nothing gradable ran.
    pub fn grade(&self, policies: &[String], project: &str, tests: &[TestResult]) -> Decision<Option<f64>> {
        let fallback = || {
            let mut counts = Counts::default();
            tests.iter().for_each(|t| counts.add(t.outcome));
            counts.grade()
        };
        self.chain(policies, fallback, |p| p.grade(project, tests).map(|g| g.map(Some)))
    }
}

#[cfg(test)]
mod tests {
    use cdtester_runner_api::Outcome;

    use super::*;
    use crate::wasm::tests::{BAD_JSON, LOOP, constant, limits};

    fn set(plugins: &[(&str, &str)]) -> PolicySet {
        set_closed(plugins, false)
    }

    fn set_closed(plugins: &[(&str, &str)], fail_closed: bool) -> PolicySet {
        let host = WasmHost::new().unwrap();
        let plugins = plugins
            .iter()
            .map(|(n, wat)| (n.to_string(), host.load_bytes(n, wat.as_bytes(), limits()).unwrap()))
            .collect();
        PolicySet { host, plugins, fail_closed }
    }

    #[test]
    fn failing_policies_refuse_the_project_when_closed() {
        let configured = RunnerChoice { runner: "docker".into(), limits: Limits::default() };
        let closed = set_closed(&[("loop", LOOP), ("bad", BAD_JSON)], true);
        for chain in [&["loop"][..], &["bad"], &["missing"]] {
            let err = closed.decide(&names(chain), &meta(), configured.clone()).unwrap_err();
            assert!(err.contains("refused") && err.contains("plugins.fail_closed"), "{chain:?}: {err}");
        }
        assert_eq!(closed.decide(&[], &meta(), configured.clone()), Ok(configured.clone()));
        let open = set_closed(&[("loop", LOOP), ("bad", BAD_JSON)], false);
        assert_eq!(open.decide(&names(&["loop", "bad"]), &meta(), configured.clone()), Ok(configured));
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn meta() -> ProjectMeta {
        ProjectMeta { name: "p".into(), url: None, size_bytes: 10, file_count: 1 }
    }

    fn tests() -> Vec<TestResult> {
        [Outcome::Passed, Outcome::Failed, Outcome::Skipped]
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| TestResult {
                nodeid: format!("t.py::test_{i}"),
                outcome,
                duration: 0.1,
                message: None,
                attempts: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn failing_policies_fall_through_to_the_next_and_then_the_default() {
        let limits_only = constant(r#"{"limits":{"timeout_s":7}}"#);
        let s = set(&[("loop", LOOP), ("bad", BAD_JSON), ("limits", &limits_only)]);
        let configured = RunnerChoice { runner: "local".into(), limits: Limits::default() };

        let d = s.grade(&names(&["loop", "bad", "missing"]), "p", &tests());
        assert_eq!(d.value, Some(10.0), "default grade: 1 pass, 1 fail");
        assert_eq!(d.decided_by, None);
        assert_eq!(d.errors.len(), 3);
        assert!(d.errors[1].to_string().contains("returned bad output: expected value"), "{}", d.errors[1]);
        assert!(matches!(d.errors[2], PolicyError::Unknown(_)));

        let d = s.select_runner(&names(&["loop", "limits"]), &meta(), configured.clone());
        assert_eq!(d.decided_by.as_deref(), Some("limits"));
        assert_eq!(d.value.runner, "local");
        assert_eq!(d.value.limits, Limits { timeout_s: 7, ..Limits::default() });
        assert_eq!(d.errors.len(), 1);

        let d = s.admit(&[], &meta());
        assert_eq!((d.value, d.decided_by, d.errors.len()), (Admission::Accept, None, 0));
    }

    #[test]
    fn typed_outputs_are_validated() {
        let reject = constant(r#"{"admit":false}"#);
        let out_of_range = constant(r#"{"grade":21}"#);
        let typo = constant(r#"{"runer":"docker"}"#);
        let s = set(&[("reject", &reject), ("range", &out_of_range), ("typo", &typo)]);
        let d = s.admit(&names(&["reject"]), &meta());
        assert_eq!(d.value, Admission::Reject { reason: "rejected by policy reject".into() });
        let d = s.grade(&names(&["range"]), "p", &tests());
        assert!(d.errors[0].to_string().contains("grade 21 is outside 0..20"), "{}", d.errors[0]);
        let configured = RunnerChoice { runner: "local".into(), limits: Limits::default() };
        let d = s.select_runner(&names(&["typo"]), &meta(), configured.clone());
        assert_eq!(d.value, configured);
        assert!(d.errors[0].to_string().contains("unknown field `runer`"), "{}", d.errors[0]);
    }

    #[test]
    fn project_meta_measures_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.py"), "12345").unwrap();
        std::fs::write(dir.path().join("sub/b.py"), "123").unwrap();
        let m = ProjectMeta::from_dir("x", Some("file:///x"), dir.path()).unwrap();
        assert_eq!((m.size_bytes, m.file_count, m.url.as_deref()), (8, 2, Some("file:///x")));
    }
}
