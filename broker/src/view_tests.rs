use super::*;
use crate::model::Gateway;

fn gw(node: &str, key: u8, ip: &str) -> Gateway {
    Gateway {
        node: node.into(),
        public_key: vec![key; 32],
        endpoints: vec!["192.0.2.1:51820".into()],
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
    // Denied on red: told why, but nothing about red's members or peers.
    let red = a.admissions.iter().find(|x| x.network == "red").unwrap();
    assert_eq!(red.state(), pb::AdmissionState::Denied);
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
