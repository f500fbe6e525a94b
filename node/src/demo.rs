//! `cdtester demo`: a local network of 3 nodes (child processes of this binary on 127.0.0.1)
//! evaluating the bundled example projects (node/demo: passing, failing, skipped, erroring and
//! xfailed tests), with live progress and the graded table; then a clean shutdown.
//!
//! [`LocalCluster`] (start, kill -9, restart node processes) is shared with the end-to-end tests
//! and `cdtester bench cluster`; a [`Placement`] puts a node elsewhere than 127.0.0.1 (another
//! address, its own network namespace, advertised addresses).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_config::Config;
use serde_json::Value;

use crate::client::{self, Client};

/// The bundled example projects: (path inside the upload, contents).
pub const EXAMPLES: &[(&str, &str)] = &[
    ("calc/calc.py", include_str!("../demo/calc/calc.py")),
    ("calc/tests/test_add.py", include_str!("../demo/calc/tests/test_add.py")),
    ("calc/tests/test_sub.py", include_str!("../demo/calc/tests/test_sub.py")),
    ("strs/tests/test_upper.py", include_str!("../demo/strs/tests/test_upper.py")),
    ("strs/tests/test_fixture_error.py", include_str!("../demo/strs/tests/test_fixture_error.py")),
    ("shapes/shapes.py", include_str!("../demo/shapes/shapes.py")),
    ("shapes/tests/test_area.py", include_str!("../demo/shapes/tests/test_area.py")),
    ("shapes/tests/test_perimeter.py", include_str!("../demo/shapes/tests/test_perimeter.py")),
];

/// Writes the example projects under `dir` (one folder per project).
pub fn write_examples(dir: &Path) -> std::io::Result<()> {
    for (rel, text) in EXAMPLES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// `cdtester demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Keep the nodes' data and logs in this folder (default: a temporary folder, removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A free port on 127.0.0.1 for TCP and one for UDP.
pub fn free_ports() -> std::io::Result<(u16, u16)> {
    let udp = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let tcp = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok((udp, tcp))
}

/// Where and how a node process runs: a command prefix (e.g. `ip netns exec HOST` for a node
/// in its own network namespace), the addresses it binds and the ones it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Program and arguments the node command is run under; empty = run directly.
    pub wrapper: Vec<String>,
    /// `--bind` and `--http`.
    pub bind: SocketAddr,
    pub http: SocketAddr,
    /// `--advertise` and `--http-advertise`; unset = the node decides.
    pub advertise: Option<SocketAddr>,
    pub http_advertise: Option<SocketAddr>,
    /// Where peers and clients reach the node (its UDP identity and HTTP API).
    pub udp_at: SocketAddr,
    pub http_at: SocketAddr,
}

impl Placement {
    /// A node on 127.0.0.1 at these ports.
    pub fn loopback(udp: u16, http: u16) -> Placement {
        Placement::at(SocketAddr::from(([127, 0, 0, 1], udp)), SocketAddr::from(([127, 0, 0, 1], http)))
    }

    /// A node binding and advertising exactly these addresses, started directly.
    pub fn at(udp: SocketAddr, http: SocketAddr) -> Placement {
        Placement {
            wrapper: Vec::new(),
            bind: udp,
            http,
            advertise: None,
            http_advertise: None,
            udp_at: udp,
            http_at: http,
        }
    }
}

/// One node process.
pub struct NodeProc {
    /// The node's advertised UDP address (its identity in /network and /stats).
    pub udp: SocketAddr,
    /// The node's advertised HTTP API address.
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    placement: Placement,
    join: Option<SocketAddr>,
    child: Option<Child>,
}

impl NodeProc {
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Node processes of this binary (on 127.0.0.1 unless placed elsewhere).
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// The cluster secret every node is given (`None` when `env` makes the network insecure).
    secret: Option<String>,
    pub nodes: Vec<NodeProc>,
}

impl LocalCluster {
    /// A cluster whose nodes keep their data under `dir`; `env` is added to every node's
    /// environment (e.g. `CDT_RUNNER__LOCAL__VENV_DIR`, timers).
    /// Nodes get a fresh cluster secret unless `env` sets `CDT_NODE__INSECURE` or a secret.
    pub fn new(exe: PathBuf, dir: PathBuf, env: Vec<(String, String)>) -> LocalCluster {
        let given = |k: &str| env.iter().find(|(e, _)| e == k).map(|(_, v)| v.clone());
        let secret = match (given("CDT_NODE__SECRET"), given("CDT_NODE__INSECURE")) {
            (Some(s), _) => Some(s),
            (None, Some(v)) if v == "true" => None,
            _ => Some(hex::encode(rand::random::<[u8; 32]>())),
        };
        LocalCluster { exe, dir, env, secret, nodes: Vec::new() }
    }

    /// The cluster secret of the nodes (for tests that make internal calls).
    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// Starts `n` more nodes on 127.0.0.1; the first node of the cluster starts the network, the
    /// others join it.
    pub fn start(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let (udp, http) = free_ports().context("finding free ports")?;
            self.start_at(Placement::loopback(udp, http))?;
        }
        Ok(())
    }

    /// Starts one more node placed as given; it joins the cluster's first node (at its
    /// advertised address) unless it is the first.
    pub fn start_at(&mut self, placement: Placement) -> anyhow::Result<()> {
        let i = self.nodes.len();
        let join = self.nodes.first().map(|first| first.udp);
        let mut node = NodeProc {
            udp: placement.udp_at,
            http: placement.http_at,
            data_dir: self.dir.join(format!("node{}", i + 1)),
            log: self.dir.join(format!("node{}.log", i + 1)),
            placement,
            join,
            child: None,
        };
        self.spawn(&mut node)?;
        self.nodes.push(node);
        Ok(())
    }

    fn spawn(&self, node: &mut NodeProc) -> anyhow::Result<()> {
        std::fs::create_dir_all(&node.data_dir)
            .with_context(|| format!("creating {}", node.data_dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let place = &node.placement;
        let mut cmd = match place.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.exe);
                cmd
            }
            None => Command::new(&self.exe),
        };
        cmd.arg("node")
            .arg("--bind")
            .arg(place.bind.to_string())
            .arg("--http")
            .arg(place.http.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir);
        for (flag, addr) in [("--advertise", place.advertise), ("--http-advertise", place.http_advertise)] {
            if let Some(a) = addr {
                cmd.arg(flag).arg(a.to_string());
            }
        }
        if let Some(j) = node.join {
            cmd.arg("--join").arg(j.to_string());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(secret) = &self.secret {
            cmd.env("CDT_NODE__SECRET", secret);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        node.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.exe.display()))?);
        Ok(())
    }

    /// Kills node `i` with SIGKILL (no goodbye).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node `i` with SIGTERM (graceful leave), waiting up to 10 s.
    pub fn terminate(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: kill(2) on a child process id we own; no memory is involved.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again with the same addresses and data directory. It joins through
    /// `via` (another live node) when given.
    pub fn restart(&mut self, i: usize, via: Option<usize>) -> anyhow::Result<()> {
        let join = via.map(|v| self.nodes[v].udp);
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            NodeProc {
                udp: SocketAddr::from(([127, 0, 0, 1], 0)),
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                data_dir: PathBuf::new(),
                log: PathBuf::new(),
                placement: Placement::loopback(0, 0),
                join: None,
                child: None,
            },
        );
        node.join = join;
        let r = self.spawn(&mut node);
        self.nodes[i] = node;
        r
    }

    /// Waits until every running node's `/network` lists all running nodes as peers.
    pub async fn wait_mesh(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut live: Vec<(SocketAddr, SocketAddr)> = Vec::new();
            for n in &mut self.nodes {
                if n.is_running() {
                    live.push((n.udp, n.http));
                } else if n.child.is_some() {
                    bail!("node {} exited; see {}", n.udp, n.log.display());
                }
            }
            let mut ok = true;
            for (udp, http) in &live {
                let c = crate::peer_http::client::HttpClient::new(Default::default(), None);
                let net: Result<std::collections::BTreeMap<String, Vec<String>>, _> =
                    c.get_json(*http, "/network", Duration::from_secs(2)).await;
                let Ok(net) = net else {
                    ok = false;
                    continue;
                };
                let peers = net.get(&udp.to_string()).cloned().unwrap_or_default();
                if live.iter().any(|(u, _)| u != udp && !peers.contains(&u.to_string())) {
                    ok = false;
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nodes did not form a full mesh within {timeout:?}; logs in {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every node gracefully.
    pub fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.terminate(i);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Where node processes share Python environments between runs.
pub fn shared_venv_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("cdtester").join("venvs")
}

/// `cdtester demo`.
pub fn main(config: Config, args: DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let projects = dir.join("examples");
    write_examples(&projects).context("writing the example projects")?;
    let exe = std::env::current_exe().context("locating the cdtester binary")?;
    let venvs = config.runner.local.venv_dir.clone().unwrap_or_else(shared_venv_dir);
    let env = vec![
        ("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), venvs.to_string_lossy().into_owned()),
        ("CDT_LOG".to_string(), "warn".to_string()),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut cluster = LocalCluster::new(exe, dir.clone(), env);
    println!("starting {} nodes on 127.0.0.1 (data and logs in {})", args.nodes, dir.display());
    cluster.start(args.nodes)?;
    let result = runtime.block_on(async {
        cluster.wait_mesh(Duration::from_secs(30)).await?;
        for n in &cluster.nodes {
            println!("  node udp {}  http {}", n.udp, n.http);
        }
        let client = Client::new(cluster.nodes[0].http);
        let sources: Vec<String> = ["calc", "strs", "shapes"]
            .iter()
            .map(|p| projects.join(p).to_string_lossy().into_owned())
            .collect();
        let (zip, name) = client::local_upload(&sources)?;
        let id = client.submit_zip(zip, &name).await.context("submitting the examples")?;
        println!("submitted the examples (calc, strs, shapes) to {}: evaluation {id}", cluster.nodes[0].http);
        println!("(first run: the nodes build a Python environment with pytest; later runs reuse it)");
        let report = client.wait(id, false).await?;
        client::print_table(&report);
        // Another node's /stats, once replication has brought it every result (bounded wait).
        let totals = (Value::from(report.summary.total_passed), Value::from(report.summary.total_failed));
        let http = crate::peer_http::client::HttpClient::new(Default::default(), None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let stats = loop {
            let stats = http
                .send(
                    hyper::Method::GET,
                    cluster.nodes[args.nodes - 1].http,
                    "/stats",
                    None,
                    Duration::from_secs(5),
                )
                .await?;
            let v: Value = serde_json::from_slice(&stats.body).unwrap_or_default();
            if (v["all"]["passed"].clone(), v["all"]["failed"].clone()) == totals
                || tokio::time::Instant::now() >= deadline
            {
                break stats;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!("GET /stats on another node: {}", String::from_utf8_lossy(&stats.body));
        anyhow::Ok(())
    });
    println!("shutting the nodes down");
    cluster.shutdown();
    result
}
