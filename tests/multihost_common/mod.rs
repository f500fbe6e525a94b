//! Hosts with their own IP addresses for the multi-host tests: each host is a Linux network
//! namespace plugged into a bridge that lives in a "switch" namespace of its own, so the
//! machine's firewall (Docker's FORWARD rules) is never involved or changed. The test process
//! reaches the hosts through one more veth from its namespace to the switch (the hosts' default
//! gateway, with no way beyond it: no package index inside). Everything is removed on drop.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use cdtester::demo::Placement;

/// Why these tests cannot run here, if they cannot (not root, no `ip`, no namespaces); checked
/// once per test process.
pub fn unavailable() -> Option<String> {
    static ANSWER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ANSWER.get_or_init(check).clone()
}

fn check() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("iptables", "iptables")] {
        if !ok(&[tool, "--version"]) && !ok(&[tool, "-V"]) {
            return Some(format!("no `{tool}` command ({package})"));
        }
    }
    let probe = format!("cdtprobe{}", std::process::id());
    if !ok(&["ip", "netns", "add", &probe]) {
        return Some("cannot create a network namespace here".into());
    }
    let _ = ok(&["ip", "netns", "del", &probe]);
    None
}

/// Runs a command; true when it succeeded.
fn ok(argv: &[&str]) -> bool {
    Command::new(argv[0]).args(&argv[1..]).output().is_ok_and(|o| o.status.success())
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A switch, the test's link to it, and hosts on `10.<a>.<b>.0/24`.
pub struct Lab {
    tag: String,
    prefix: [u8; 3],
    namespaces: Vec<String>,
}

impl Lab {
    /// A lab whose names and subnet are unique to this process and `tag` (a digit per test).
    pub fn new(tag: u8) -> Lab {
        let pid = std::process::id();
        let prefix = [10, 200 + (pid % 50) as u8, tag];
        let mut lab = Lab { tag: format!("{}{tag}", pid % 100_000), prefix, namespaces: Vec::new() };
        let sw = lab.ns("sw");
        sh(&["ip", "netns", "add", &sw]);
        lab.namespaces.push(sw.clone());
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        // The test's own link: an address on the hosts' subnet, their gateway.
        let root_if = format!("cdt{}", lab.tag);
        sh(&["ip", "link", "add", &root_if, "type", "veth", "peer", "name", "p-root", "netns", &sw]);
        sh(&["ip", "-n", &sw, "link", "set", "p-root", "master", "br0", "up"]);
        sh(&["ip", "addr", "add", &format!("{}/24", lab.ip(1)), "dev", &root_if]);
        sh(&["ip", "link", "set", &root_if, "up"]);
        lab
    }

    fn ns(&self, name: &str) -> String {
        format!("cdt{}-{name}", self.tag)
    }

    /// The address `10.a.b.<last>` of this lab's subnet.
    pub fn ip(&self, last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last))
    }

    /// Adds host `name` at `10.a.b.<last>` on the switch; returns its namespace.
    pub fn host(&mut self, name: &str, last: u8) -> String {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let sw = self.ns("sw");
        let port = format!("p-{name}");
        sh(&[
            "ip", "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
            "netns", &sw,
        ]);
        sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", self.ip(last)), "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &self.ip(1).to_string()]);
        ns
    }

    /// Adds host `name` behind router `router` (a host of the lab): a private link
    /// `192.168.<b>.0/24`, the router forwarding `udp_port`/`http_port` of its lab address to the
    /// hidden host's 7000/8000 (DNAT) and masquerading what the hidden host sends. Returns the
    /// hidden host's namespace and the router's lab address.
    pub fn host_behind_nat(&mut self, name: &str, router: &str, udp_port: u16, http_port: u16) -> String {
        let ns = self.ns(name);
        let r = self.ns(router);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let inner = |last: u8| format!("192.168.{}.{last}", self.prefix[2]);
        sh(&[
            "ip", "link", "add", "name", "in0", "netns", &r, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        sh(&["ip", "-n", &r, "addr", "add", &format!("{}/24", inner(1)), "dev", "in0"]);
        sh(&["ip", "-n", &r, "link", "set", "in0", "up"]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", inner(2)), "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &inner(1)]);
        sh(&["ip", "netns", "exec", &r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        let ipt = |args: &[&str]| {
            let mut argv = vec!["ip", "netns", "exec", &r, "iptables", "-t", "nat"];
            argv.extend_from_slice(args);
            sh(&argv);
        };
        for (proto, public, private) in [("udp", udp_port, 7000u16), ("tcp", http_port, 8000)] {
            ipt(&[
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-p",
                proto,
                "--dport",
                &public.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{}:{private}", inner(2)),
            ]);
        }
        ipt(&["-A", "POSTROUTING", "-s", &format!("{}/24", inner(0)), "-o", "eth0", "-j", "MASQUERADE"]);
        ns
    }

    /// Unplugs host `name` from the switch (a dead machine: nothing it sends arrives, nothing
    /// answers).
    pub fn unplug(&self, name: &str) {
        sh(&["ip", "-n", &self.ns("sw"), "link", "set", &format!("p-{name}"), "down"]);
    }

    /// A node in host namespace `ns` binding every interface (UDP 7000, HTTP 8000), reached at
    /// `udp_at`/`http_at`, advertising them when `advertise` (else it detects its address).
    pub fn placement(ns: &str, udp_at: SocketAddr, http_at: SocketAddr, advertise: bool) -> Placement {
        Placement {
            wrapper: ["ip", "netns", "exec", ns].iter().map(|s| s.to_string()).collect(),
            bind: "0.0.0.0:7000".parse().expect("addr"),
            http: "0.0.0.0:8000".parse().expect("addr"),
            advertise: advertise.then_some(udp_at),
            http_advertise: advertise.then_some(http_at),
            udp_at,
            http_at,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace removes its links (and the veth ends elsewhere, the test's too).
        for ns in self.namespaces.iter().rev() {
            let _ = ok(&["ip", "netns", "del", ns]);
        }
    }
}
