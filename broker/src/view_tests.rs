use super::*;
use crate::model::Gateway;
use crate::state::sha256;
use prost::Message;

fn gw(node: &str, key: u8, ip: &str) -> Gateway {
    Gateway {
        node: node.into(),
        public_key: vec![key; 32],
        endpoints: vec![format!("192.0.2.{key}:51820")],
        tunnel_ip: ip.parse().unwrap(),
    }
}

fn world() -> State {
    let mut s = State::default();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let id = format!("t{i}");
        s.create_token(n, id.clone(), "sec", 60, 1, 0).unwrap();
        s.join(&id, "sec", n, [i as u8; 32], 1).unwrap();
        s.report_gateways(n, vec![gw("gw", i as u8 + 1, &format!("100.64.{i}.1"))])
            .unwrap();
    }
    s.create_network(
        "blue",
        0,
        0,
        "10.1.0.0/16",
        vec!["a".into(), "b".into()],
        false,
        0,
    )
    .unwrap();
    s.create_network("red", 0, 0, "", vec!["b".into(), "c".into()], false, 0)
        .unwrap();
    s.request_networks("a", vec!["blue".into(), "red".into()])
        .unwrap();
    s.request_networks("b", vec!["blue".into(), "red".into()])
        .unwrap();
    s.request_networks("c", vec!["red".into()]).unwrap();
    s
}

#[test]
fn a_cluster_sees_only_its_admitted_networks_and_their_peers() {
    let s = world();
    let a = compute(&s, "a").unwrap();
    assert_eq!(a.tunnel_subnet, "100.64.0.0/24");
    assert_eq!(a.networks.len(), 1, "{a:?}");
    let blue = &a.networks[0];
    assert_eq!(blue.name, "blue");
    assert_eq!(blue.members, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(blue.peers.len(), 1);
    assert_eq!(blue.peers[0].cluster, "b");
    assert_eq!(blue.cluster_cidr, "10.1.0.0/24");
    // Not allowed on red: answered like an unknown network, and nothing
    // about red's members or peers.
    let red = a.admissions.iter().find(|x| x.network == "red").unwrap();
    assert_eq!(red.state(), pb::AdmissionState::UnknownNetwork);
    let text = format!("{a:?}");
    assert!(!text.contains("\"c\""), "a must not learn of c: {text}");

    let c = compute(&s, "c").unwrap();
    assert_eq!(c.networks.len(), 1);
    assert_eq!(c.networks[0].name, "red");
    assert_eq!(c.networks[0].peers[0].cluster, "b");
    assert!(!format!("{c:?}").contains("blue"));
    assert!(compute(&s, "nobody").is_none());
}

#[test]
fn refresh_bumps_revisions_only_for_changed_views() {
    let mut s = world();
    let all: BTreeSet<String> = ["a", "b", "c"].iter().map(|x| x.to_string()).collect();
    let first = refresh(&mut s, &all);
    let again = refresh(&mut s, &all);
    assert_eq!(first, again);
    // Key rotation at c: b and c see it (red), a does not share red.
    let affected = s
        .report_gateways("c", vec![gw("gw", 77, "100.64.2.1")])
        .unwrap();
    let views = refresh(&mut s, &affected);
    let rev = |vs: &[pb::ClusterView], n: &str| {
        vs.iter().find(|v| v.cluster_name == n).map(|v| v.revision)
    };
    assert!(rev(&views, "b") > rev(&first, "b"));
    // a asked for red but was denied: its view stays the same revision.
    assert!(rev(&views, "a").is_none() || rev(&views, "a") == rev(&first, "a"));
    let b = views.iter().find(|v| v.cluster_name == "b").unwrap();
    let red = b.networks.iter().find(|n| n.name == "red").unwrap();
    assert_eq!(red.peers[0].public_key, vec![77; 32]);
}

/// Timing probe for large views: `cargo test --release -p l2mesh-broker -- --ignored --nocapture big_view`
#[test]
#[ignore = "timing probe, not a test"]
fn big_view_timing() {
    let n = 1000;
    let mut s = State::default();
    for i in 0..n {
        let name = format!("agent-{i}");
        let id = format!("t{i}");
        s.create_token(&name, id.clone(), "sec", 60, 1, 0).unwrap();
        s.join(&id, "sec", &name, sha256(name.as_bytes()), 1)
            .unwrap();
        let idx = s.clusters[&name].subnet_index;
        let ip = std::net::Ipv4Addr::from(u32::from(tunnel_subnet(idx).network()) + 1);
        let mut g = gw("gw", 1, &ip.to_string());
        g.public_key[..4].copy_from_slice(&(i as u32).to_be_bytes());
        s.report_gateways(&name, vec![g]).unwrap();
        s.request_networks(&name, vec!["bench".into()]).unwrap();
    }
    let t = std::time::Instant::now();
    let (_, affected) = s
        .create_network("bench", 0, 0, "", vec![], true, 0)
        .unwrap();
    println!("create_network: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let c = s.clone();
    println!("clone: {:?}", t.elapsed());
    drop(c);
    let t = std::time::Instant::now();
    let views: Vec<_> = affected.iter().filter_map(|a| compute(&s, a)).collect();
    println!("compute {}: {:?}", views.len(), t.elapsed());
    let t = std::time::Instant::now();
    let enc: Vec<Vec<u8>> = views.iter().map(|v| v.encode_to_vec()).collect();
    println!(
        "encode {} MB: {:?}",
        enc.iter().map(Vec::len).sum::<usize>() >> 20,
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let _h: Vec<_> = enc.iter().map(|e| sha256(e)).collect();
    println!("sha256: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let _h: Vec<_> = views.iter().map(digest).collect();
    println!("digest: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let c: Vec<_> = views.to_vec();
    println!("clone views: {:?}", t.elapsed());
    drop(c);
    let t = std::time::Instant::now();
    let c: Vec<_> = views.to_vec();
    println!("clone views again: {:?}", t.elapsed());
    drop(c);
    let t = std::time::Instant::now();
    refresh(&mut s, &affected);
    println!("refresh: {:?}", t.elapsed());
}

#[test]
fn digest_ignores_the_revision_and_sees_every_change() {
    let s = world();
    let mut v = compute(&s, "b").unwrap();
    let d = digest(&v);
    v.revision = 99;
    assert_eq!(digest(&v), d);
    v.networks[0].peers[0].endpoints.push("192.0.2.2:1".into());
    assert_ne!(digest(&v), d);
    let mut w = compute(&s, "b").unwrap();
    w.admissions[0].reason.push('x');
    assert_ne!(digest(&w), d);
}
