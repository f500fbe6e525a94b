//! IPv6 in every address field, end to end on the IPv6 loopback: 3 node processes bind, advertise
//! and join `[::1]:port` addresses (one binds every interface, `[::]`, and advertises `[::1]`);
//! a zip of sleepy projects gives the exact counts, results were delivered between nodes, and
//! `/network` and `/stats` use the `[v6]:port` spelling. Skips when `::1` is missing.

mod common;
mod node_common;

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use cdtester::demo::{LocalCluster, Placement};

fn free_v6() -> Option<(SocketAddr, SocketAddr)> {
    let udp = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).ok()?.local_addr().ok()?;
    let http = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).ok()?.local_addr().ok()?;
    Some((udp, http))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_ipv6_addresses_evaluate_and_report_them() {
    if free_v6().is_none() {
        eprintln!("skipping: no IPv6 loopback (::1) on this machine");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let env = vec![
        (
            "CDT_RUNNER__LOCAL__VENV_DIR".to_string(),
            common::cache_dir().join("venvs").to_string_lossy().into_owned(),
        ),
        ("CDT_LOG".to_string(), "info,cdtester::core=warn".to_string()),
        ("CDT_RUNNER__WORKERS".to_string(), "1".to_string()),
        // The node binding [::] listens beyond loopback; these are the test's own projects.
        ("CDT_RUNNER__LOCAL__ALLOW_REMOTE_SUBMISSIONS".to_string(), "true".to_string()),
    ];
    let mut c = LocalCluster::new(common::cdtester_bin(), dir.path().join("nodes"), env);
    for i in 0..3 {
        let (udp, http) = free_v6().expect("free ports on ::1");
        let mut place = Placement::at(udp, http);
        if i == 2 {
            // Every interface, dual-stack; the loopback address advertised.
            place.bind = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), udp.port());
            place.http = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), http.port());
            place.advertise = Some(udp);
            place.http_advertise = Some(http);
        }
        c.start_at(place).expect("start node");
    }
    c.wait_mesh(Duration::from_secs(60)).await.expect("mesh over IPv6");
    let addrs: BTreeSet<String> = c.nodes.iter().map(|n| n.udp.to_string()).collect();
    assert!(addrs.iter().all(|a| a.starts_with("[::1]:")), "{addrs:?}");

    let sleepy = dir.path().join("sleepy");
    node_common::sleepy_project(&sleepy, 6, 3, 0.5);
    let id =
        node_common::submit_zip(c.nodes[0].http, &node_common::zip_projects(&[("sleepy", sleepy)])).await;
    let report = node_common::wait_finished(c.nodes[2].http, id, Duration::from_secs(300)).await;
    assert_eq!(node_common::module_counts(&report)["sleepy"], node_common::sleepy_expected(6, 3), "{report}");
    let ran: BTreeSet<String> = report["projects"]["sleepy"]["modules"]
        .as_object()
        .expect("modules")
        .values()
        .filter_map(|m| m["node"].as_str().map(String::from))
        .collect();
    assert!(ran.len() >= 2 && ran.is_subset(&addrs), "results delivered between IPv6 nodes: {ran:?}");
    for n in &c.nodes {
        let (_, net) = node_common::get(n.http, "/network").await;
        let keys: BTreeSet<String> = net.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys, addrs, "/network keys on {}", n.http);
        let (_, stats) = node_common::get(n.http, "/stats").await;
        let listed: BTreeSet<String> = stats["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|s| s["address"].as_str().map(String::from))
            .collect();
        assert_eq!(listed, addrs, "/stats nodes on {}", n.http);
    }
    c.shutdown();
}
