//! Strict PEP 508 requirements: the only form a requirement may take before it is handed to pip
//! on the host.
//!
//! Accepted: `name[extra,...] <specifiers> ; <marker>`, where the name and extras are PEP 508
//! identifiers, every specifier is a PEP 440 comparison (`~=`, `==`, `!=`, `<=`, `>=`, `<`, `>`;
//! not `===`), and the marker compares the PEP 508 environment variables with plain quoted
//! strings. Refused: direct references (`name @ url`), URLs, paths and archive file names, and
//! anything starting with `-` (a pip option such as `-r/etc/passwd`). A requirement is handed on
//! only in its canonical form ([`Requirement`]'s `Display`), rebuilt from the parsed parts, and
//! always after `--` on pip's command line ([`pip_requirement_args`]).

use std::fmt;

/// Longest requirement accepted, in bytes.
pub const MAX_LEN: usize = 256;

/// Environment marker variables (PEP 508).
const MARKER_VARIABLES: &[&str] = &[
    "python_version",
    "python_full_version",
    "os_name",
    "sys_platform",
    "platform_release",
    "platform_system",
    "platform_version",
    "platform_machine",
    "platform_python_implementation",
    "implementation_name",
    "implementation_version",
    "extra",
];

/// File name endings pip takes for a local archive rather than a project name.
const ARCHIVE_SUFFIXES: &[&str] = &[
    ".zip",
    ".whl",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz",
    ".tar.xz",
    ".txz",
    ".tlz",
    ".tar.lz",
    ".tar.lzma",
];

/// Why a requirement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requirement {shown} refused: {why}")]
pub struct RequirementError {
    /// The requirement as written (escaped, cut to 80 characters).
    pub shown: String,
    pub why: &'static str,
}

impl RequirementError {
    fn new(text: &str, why: &'static str) -> RequirementError {
        let mut shown: String = text.chars().take(80).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        RequirementError { shown: format!("{shown:?}"), why }
    }
}

/// A version comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Compatible,
    Equal,
    NotEqual,
    LessEqual,
    GreaterEqual,
    Less,
    Greater,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Compatible => "~=",
            Op::Equal => "==",
            Op::NotEqual => "!=",
            Op::LessEqual => "<=",
            Op::GreaterEqual => ">=",
            Op::Less => "<",
            Op::Greater => ">",
        }
    }
}

/// A parsed, validated requirement. `Display` gives its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub name: String,
    pub extras: Vec<String>,
    pub specifiers: Vec<(Op, String)>,
    /// The marker, re-serialised from its parsed form.
    pub marker: Option<String>,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.extras.is_empty() {
            write!(f, "[{}]", self.extras.join(","))?;
        }
        for (i, (op, version)) in self.specifiers.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{version}", op.as_str())?;
        }
        if let Some(m) = &self.marker {
            write!(f, "; {m}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Requirement {
    type Err = RequirementError;

    fn from_str(text: &str) -> Result<Requirement, RequirementError> {
        parse(text)
    }
}

/// Parses `text` as a strict requirement (see the module documentation).
pub fn parse(text: &str) -> Result<Requirement, RequirementError> {
    parse_strict(text).map_err(|why| RequirementError::new(text, why))
}

/// Why `text` is refused before parsing: empty, a pip option, too long, a URL or a path.
fn surface_refusal(text: &str) -> Option<&'static str> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        Some("it is empty")
    } else if trimmed.starts_with('-') {
        Some("it starts with '-' (a pip option)")
    } else if text.len() > MAX_LEN {
        Some("it is longer than 256 bytes")
    } else if trimmed.contains("://") || trimmed.contains('@') {
        Some("direct references (`name @ url`) and URLs are not allowed; name the project and its versions")
    } else if trimmed.starts_with(['/', '.', '\\', '~']) || trimmed.contains(['/', '\\']) {
        Some("paths are not allowed; name the project and its versions")
    } else {
        None
    }
}

fn parse_strict(text: &str) -> Result<Requirement, &'static str> {
    if let Some(why) = surface_refusal(text) {
        return Err(why);
    }
    let mut p = Parser { s: text.trim().as_bytes(), i: 0 };
    let name = p.identifier().ok_or("it does not start with a project name")?;
    p.ws();
    let extras = p.extras()?;
    let specifiers = p.specifiers()?;
    p.ws();
    let marker = if p.eat(";") {
        p.ws();
        let m = p.marker_or().ok_or("the environment marker is not valid")?;
        p.ws();
        Some(m)
    } else {
        None
    };
    if !p.done() {
        return Err("it is not `name[extras] <version specifiers> ; <marker>`");
    }
    let req = Requirement { name, extras, specifiers, marker };
    let head = req.to_string();
    let head = head.split(';').next().unwrap_or_default().to_ascii_lowercase();
    let name = req.name.to_ascii_lowercase();
    if ARCHIVE_SUFFIXES.iter().any(|s| head.ends_with(s) || name.ends_with(s)) {
        return Err("it looks like an archive file name");
    }
    Ok(req)
}

/// Parses every requirement, in order; the first refusal stops.
pub fn parse_all<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Requirement>, RequirementError> {
    texts.iter().map(|t| parse(t.as_ref())).collect()
}

/// pip's positional arguments for `reqs`: `--` (nothing after it is an option), then each
/// requirement in canonical form.
pub fn pip_requirement_args(reqs: &[Requirement]) -> Vec<String> {
    std::iter::once("--".to_string()).chain(reqs.iter().map(Requirement::to_string)).collect()
}

/// A PEP 440 version for `op` (public versions; local versions and `.*` only with `==`/`!=`;
/// `~=` needs two release numbers).
fn valid_version(op: Op, v: &str) -> bool {
    let lower = v.to_ascii_lowercase();
    let (body, wildcard) = match lower.strip_suffix(".*") {
        Some(b) => (b, true),
        None => (lower.as_str(), false),
    };
    let (public, local) = match body.split_once('+') {
        Some((p, l)) => (p, Some(l)),
        None => (body, None),
    };
    let equality = matches!(op, Op::Equal | Op::NotEqual);
    if (wildcard || local.is_some()) && !equality || wildcard && local.is_some() {
        return false;
    }
    if let Some(l) = local
        && !l
            .split(['.', '-', '_'])
            .all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return false;
    }
    match public_release_count(public) {
        Some(n) => op != Op::Compatible || n >= 2,
        None => false,
    }
}

/// Number of release segments of a PEP 440 public version, `None` if it is not one.
fn public_release_count(v: &str) -> Option<usize> {
    let mut p = Parser { s: v.as_bytes(), i: 0 };
    p.eat("v");
    // Epoch.
    let save = p.i;
    if p.digits().is_none() || !p.eat("!") {
        p.i = save;
    }
    let mut release = 0;
    loop {
        p.digits()?;
        release += 1;
        let save = p.i;
        if !(p.eat(".") && p.peek().is_some_and(|b| b.is_ascii_digit())) {
            p.i = save;
            break;
        }
    }
    let sep = |p: &mut Parser| {
        let _ = p.eat(".") || p.eat("-") || p.eat("_");
    };
    // Pre-release.
    let save = p.i;
    sep(&mut p);
    if ["alpha", "beta", "preview", "pre", "rc", "a", "b", "c"].iter().any(|w| p.eat(w)) {
        sep(&mut p);
        p.digits();
    } else {
        p.i = save;
    }
    // Post-release.
    let save = p.i;
    let implicit_post = p.eat("-") && p.digits().is_some();
    if !implicit_post {
        p.i = save;
        sep(&mut p);
        if ["post", "rev", "r"].iter().any(|w| p.eat(w)) {
            sep(&mut p);
            p.digits();
        } else {
            p.i = save;
        }
    }
    // Development release.
    let save = p.i;
    sep(&mut p);
    if p.eat("dev") {
        sep(&mut p);
        p.digits();
    } else {
        p.i = save;
    }
    p.done().then_some(release)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    /// `[extra, ...]` (optional), then whitespace.
    fn extras(&mut self) -> Result<Vec<String>, &'static str> {
        let mut extras = Vec::new();
        if !self.eat("[") {
            return Ok(extras);
        }
        self.ws();
        if !self.eat("]") {
            loop {
                self.ws();
                extras.push(self.identifier().ok_or("an extra is not a valid name")?);
                self.ws();
                if self.eat("]") {
                    break;
                }
                if !self.eat(",") {
                    return Err("the extras are not a bracketed, comma-separated list of names");
                }
            }
        }
        self.ws();
        Ok(extras)
    }

    /// Comma-separated version specifiers, optionally in parentheses.
    fn specifiers(&mut self) -> Result<Vec<(Op, String)>, &'static str> {
        let parenthesised = self.eat("(");
        self.ws();
        let mut specifiers = Vec::new();
        while let Some(op) = self.op() {
            self.ws();
            let version = self.version_token().ok_or("a version specifier has no version")?;
            if !valid_version(op, &version) {
                return Err("a version specifier is not a PEP 440 comparison (`===` is not allowed)");
            }
            specifiers.push((op, version));
            self.ws();
            if !self.eat(",") {
                break;
            }
            self.ws();
        }
        if parenthesised && !self.eat(")") {
            return Err("an opening parenthesis is not closed");
        }
        Ok(specifiers)
    }

    fn done(&self) -> bool {
        self.i == self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }

    /// A PEP 508 name: letters and digits, with `.`, `_`, `-` only between them.
    fn identifier(&mut self) -> Option<String> {
        let start = self.i;
        if !self.peek().is_some_and(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        while self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            self.i += 1;
        }
        while self.i > start && !self.s[self.i - 1].is_ascii_alphanumeric() {
            self.i -= 1;
        }
        Some(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn op(&mut self) -> Option<Op> {
        if self.s[self.i..].starts_with(b"===") {
            return None;
        }
        let ops = [
            ("~=", Op::Compatible),
            ("==", Op::Equal),
            ("!=", Op::NotEqual),
            ("<=", Op::LessEqual),
            (">=", Op::GreaterEqual),
            ("<", Op::Less),
            (">", Op::Greater),
        ];
        ops.iter().find(|(s, _)| self.eat(s)).map(|(_, op)| *op)
    }

    /// The characters a version may consist of (checked by [`valid_version`] afterwards).
    fn version_token(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'!' | b'*')
        }) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn marker_or(&mut self) -> Option<String> {
        let mut out = self.marker_and()?;
        loop {
            let save = self.i;
            self.ws();
            if self.keyword("or") {
                self.ws();
                out = format!("{out} or {}", self.marker_and()?);
            } else {
                self.i = save;
                return Some(out);
            }
        }
    }

    fn marker_and(&mut self) -> Option<String> {
        let mut out = self.marker_atom()?;
        loop {
            let save = self.i;
            self.ws();
            if self.keyword("and") {
                self.ws();
                out = format!("{out} and {}", self.marker_atom()?);
            } else {
                self.i = save;
                return Some(out);
            }
        }
    }

    fn marker_atom(&mut self) -> Option<String> {
        if self.eat("(") {
            self.ws();
            let inner = self.marker_or()?;
            self.ws();
            return self.eat(")").then(|| format!("({inner})"));
        }
        let left = self.marker_value()?;
        self.ws();
        let op = self.marker_op()?;
        self.ws();
        let right = self.marker_value()?;
        Some(format!("{left} {op} {right}"))
    }

    /// A word that is not the start of a longer identifier.
    fn keyword(&mut self, word: &str) -> bool {
        let save = self.i;
        if self.eat(word) && !self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return true;
        }
        self.i = save;
        false
    }

    fn marker_op(&mut self) -> Option<&'static str> {
        if self.keyword("in") {
            return Some("in");
        }
        if self.keyword("not") {
            self.ws();
            return self.keyword("in").then_some("not in");
        }
        if self.s[self.i..].starts_with(b"===") {
            return None;
        }
        ["~=", "==", "!=", "<=", ">=", "<", ">"].into_iter().find(|op| self.eat(op))
    }

    /// An environment variable, or a quoted string of letters, digits, spaces and `._-*+!~`.
    fn marker_value(&mut self) -> Option<String> {
        if let Some(q @ (b'"' | b'\'')) = self.peek() {
            self.i += 1;
            let start = self.i;
            while self.peek().is_some_and(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b' ' | b'.' | b'_' | b'-' | b'*' | b'+' | b'!' | b'~')
            }) {
                self.i += 1;
            }
            let value = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
            return (self.peek() == Some(q)).then(|| {
                self.i += 1;
                format!("\"{value}\"")
            });
        }
        let var = MARKER_VARIABLES.iter().find(|v| self.keyword(v))?;
        Some(var.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).to_string()
    }

    #[test]
    fn ordinary_requirements_are_accepted_in_canonical_form() {
        assert_eq!(ok("flit_core >=3.11,<4"), "flit_core>=3.11,<4");
        assert_eq!(ok("setuptools>=40.8.0"), "setuptools>=40.8.0");
        assert_eq!(ok("wheel"), "wheel");
        assert_eq!(ok("  hypothesis==6.170.15 "), "hypothesis==6.170.15");
        assert_eq!(
            ok("requests [security, socks] (>=2.8.1, ==2.8.*)"),
            "requests[security,socks]>=2.8.1,==2.8.*"
        );
        assert_eq!(ok("hatch-vcs~=0.4"), "hatch-vcs~=0.4");
        assert_eq!(ok("pkg==1!2.0.post1.dev3+local.7"), "pkg==1!2.0.post1.dev3+local.7");
        assert_eq!(ok("pkg>=1.0rc1"), "pkg>=1.0rc1");
        assert_eq!(ok("tomli>=1.1.0; python_version < \"3.11\""), "tomli>=1.1.0; python_version < \"3.11\"");
        assert_eq!(
            ok("x;(os_name=='nt' or sys_platform == 'win32')and extra=='test'"),
            "x; (os_name == \"nt\" or sys_platform == \"win32\") and extra == \"test\""
        );
        assert_eq!(
            ok("cffi; platform_python_implementation not in 'PyPy'"),
            "cffi; platform_python_implementation not in \"PyPy\""
        );
    }

    #[test]
    fn urls_paths_and_options_are_refused() {
        for bad in [
            "evil @ http://127.0.0.1:8000/evil-1.0.tar.gz",
            "evil@https://host/evil.whl",
            "http://host/evil-1.0.tar.gz",
            "git+https://host/repo",
            "file:///tmp/evil",
            "-r/etc/passwd",
            "--requirement=/etc/passwd",
            "  -e .",
            "--index-url=http://host/simple",
            "-c/etc/shadow",
            "./evil-1.0.tar.gz",
            "/abs/path",
            "../up",
            "evil-1.0.tar.gz",
            "evil.whl",
            "pkg==1.0+x.zip",
            "pkg.zip[x]",
            "~/x",
            "sub/dir",
            "C:\\evil",
            "",
            "   ",
            "pkg===anything",
            "pkg==",
            "pkg >= 1.0 extra words",
            "pkg; python_version < \"3.11\" and os.system('x')",
            "pkg; python_version < \"/etc\"",
            "pkg; __import__('os') == '1'",
            "pkg[ev/il]",
            "pkg (>=1.0",
            "pkg~=1",
            "pkg>=1.0.*",
            "pkg>=1.0+local",
            "pkg\n--index-url=x",
            "pkg==1.0 # comment",
            "pkg==1.0 --hash=sha256:00",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused, got {:?}", parse(bad));
        }
        let e = parse("-r/etc/passwd").unwrap_err();
        assert!(e.to_string().contains("pip option"), "{e}");
        let e = parse("evil @ http://h/e.tar.gz").unwrap_err();
        assert!(e.to_string().contains("direct references"), "{e}");
        assert!(parse(&"a".repeat(300)).is_err());
    }

    #[test]
    fn pip_arguments_end_options_first() {
        let reqs = parse_all(&["a>=1", "b[x]"]).unwrap();
        assert_eq!(pip_requirement_args(&reqs), ["--", "a>=1", "b[x]"]);
        assert!(parse_all(&["ok", "-r/etc/passwd"]).is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?"
        }

        fn requirement() -> impl Strategy<Value = Requirement> {
            let op = prop::sample::select(vec![
                Op::Compatible,
                Op::Equal,
                Op::NotEqual,
                Op::LessEqual,
                Op::GreaterEqual,
                Op::Less,
                Op::Greater,
            ]);
            let spec = (op, "[0-9]{1,3}(\\.[0-9]{1,3}){1,3}(rc[0-9]|\\.post[0-9]|\\.dev[0-9])?");
            let marker = prop::option::of(
                (
                    prop::sample::select(MARKER_VARIABLES.to_vec()),
                    prop::sample::select(vec!["==", "!=", "<", ">=", "in", "not in"]),
                    "[a-z0-9. ]{0,8}",
                )
                    .prop_map(|(v, op, s)| format!("{v} {op} \"{s}\"")),
            );
            (name(), prop::collection::vec(name(), 0..3), prop::collection::vec(spec, 0..3), marker)
                .prop_map(|(name, extras, specifiers, marker)| Requirement {
                    name,
                    extras,
                    specifiers,
                    marker,
                })
                .prop_filter("not an archive name", |r| {
                    let name = r.name.to_ascii_lowercase();
                    !ARCHIVE_SUFFIXES.iter().any(|s| name.ends_with(s))
                })
        }

        /// Text built from the characters that matter to pip and shells.
        fn hostile() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop::sample::select(vec![
                    "a",
                    "Z",
                    "0",
                    "9",
                    ".",
                    "-",
                    "_",
                    "@",
                    ":",
                    "/",
                    "\\",
                    " ",
                    ";",
                    "=",
                    "<",
                    ">",
                    "~",
                    "!",
                    "*",
                    "+",
                    "[",
                    "]",
                    "(",
                    ")",
                    ",",
                    "'",
                    "\"",
                    "#",
                    "$",
                    "\n",
                    "\t",
                    "://",
                    "http",
                    "file",
                    "-r",
                    "--",
                    "evil",
                    "==1.0",
                    ">=2",
                    "python_version",
                    " and ",
                    " or ",
                    "extra",
                    "é",
                ]),
                0..24,
            )
            .prop_map(|parts| parts.concat())
        }

        fn safe(text: &str) -> bool {
            let t = text.trim();
            !t.contains('@')
                && !t.contains("://")
                && !t.starts_with(['/', '\\', '.', '~', '-'])
                && !t.contains(['/', '\\', '\n', '#', '$'])
        }

        proptest! {
            #[test]
            fn nothing_accepted_is_a_url_a_path_or_an_option(text in hostile()) {
                if let Ok(req) = parse(&text) {
                    prop_assert!(safe(&text), "accepted {text:?}");
                    let canonical = req.to_string();
                    prop_assert!(safe(&canonical), "canonical {canonical:?}");
                    prop_assert_eq!(parse(&canonical), Ok(req));
                }
            }

            #[test]
            fn arbitrary_text_never_gets_through(text in "\\PC{0,40}") {
                if let Ok(req) = parse(&text) {
                    prop_assert!(safe(&text), "accepted {text:?}");
                    prop_assert!(safe(&req.to_string()));
                }
            }

            #[test]
            fn valid_requirements_round_trip(req in requirement()) {
                let text = req.to_string();
                prop_assert_eq!(parse(&text), Ok(req));
                prop_assert!(safe(&text));
            }
        }
    }
}
