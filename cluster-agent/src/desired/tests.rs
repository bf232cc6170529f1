//! Desired-state decisions, scenario by scenario.

use super::*;
use l2mesh_proto::broker::ViewNetwork;

fn l2net(name: &str, spec: &str) -> L2Network {
    serde_yaml::from_str(&format!(
        "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    ))
    .unwrap()
}

fn node(name: &str, gateway: bool) -> NodeEntry {
    NodeEntry {
        name: name.into(),
        gateway,
        endpoint: Some(format!("192.0.2.{}:51820", name.len())),
    }
}

fn hello(key: u8) -> Hello {
    Hello {
        public_key: vec![key; 32],
        listen_port: 51820,
        endpoints: vec!["198.51.100.1:51820".into()],
    }
}

fn view() -> ClusterView {
    ClusterView {
        revision: 4,
        cluster_name: "edge".into(),
        tunnel_subnet: "100.64.1.0/24".into(),
        networks: vec![ViewNetwork {
            name: "shared".into(),
            vni: 4100,
            mtu: 1380,
            cidr: "10.50.0.0/16".into(),
            cluster_cidr: "10.50.16.0/20".into(),
            peers: vec![PeerGateway {
                cluster: "cloud".into(),
                node: "gw".into(),
                public_key: vec![9; 32],
                endpoints: vec!["203.0.113.5:51820".into()],
                tunnel_ip: "100.64.2.1".into(),
            }],
            members: vec!["cloud".into(), "edge".into()],
        }],
        admissions: vec![],
        delta: None,
    }
}

fn subnet() -> Ipv4Net {
    "100.64.1.0/24".parse().unwrap()
}

#[test]
fn local_and_admitted_multi_networks_resolve() {
    let mut allocs = Allocations::default();
    let nets = vec![
        l2net("blue", "{ipRange: 10.1.0.0/16}"),
        l2net("shared", "{scope: multiCluster}"),
    ];
    let out = resolve_networks(&nets, Some(&view()), &[], &mut allocs);
    assert_eq!(out[0].vni, Some(1));
    assert_eq!(out[0].cluster_range, Some("10.1.0.0/16".parse().unwrap()));
    assert_eq!(out[1].vni, Some(4100));
    assert_eq!(out[1].mtu, 1380);
    assert_eq!(out[1].cluster_range, Some("10.50.16.0/20".parse().unwrap()));
    assert_eq!(
        out[1].admission.as_ref().unwrap().0,
        AdmissionState::Admitted
    );
}

#[test]
fn denied_network_is_inactive_with_the_brokers_reason() {
    let mut allocs = Allocations::default();
    let nets = vec![l2net("secret", "{scope: multiCluster}")];
    let denied = Admission {
        network: "secret".into(),
        state: AdmissionState::Denied.into(),
        reason: "cluster edge is not allowed on network secret".into(),
    };
    let out = resolve_networks(&nets, Some(&view()), &[denied], &mut allocs);
    assert!(!out[0].active());
    let (state, reason) = out[0].admission.clone().unwrap();
    assert_eq!(state, AdmissionState::Denied);
    assert!(reason.contains("not allowed"));
    // Without any answer yet it waits.
    let out = resolve_networks(&nets, None, &[], &mut allocs);
    assert_eq!(
        out[0].admission.as_ref().unwrap().0,
        AdmissionState::Unspecified
    );
}

#[test]
fn invalid_and_clashing_networks_are_reported_not_applied() {
    let mut allocs = Allocations::default();
    let mut other_ns = l2net("blue", "{scope: multiCluster, brokerNetwork: blue}");
    other_ns.metadata.namespace = Some("team".into());
    let nets = vec![l2net("blue", "{}"), other_ns, l2net("bad", "{mtu: 5}")];
    let out = resolve_networks(&nets, None, &[], &mut allocs);
    let by_key: BTreeMap<_, _> = out.iter().map(|o| (o.key.clone(), o)).collect();
    assert!(
        by_key["default/bad"]
            .problem
            .as_ref()
            .unwrap()
            .contains("mtu")
    );
    assert!(by_key["default/blue"].active());
    assert!(
        by_key["team/blue"]
            .problem
            .as_ref()
            .unwrap()
            .contains("already used")
    );
}

#[test]
fn local_vnis_are_stable_across_rounds_and_released_when_deleted() {
    let mut allocs = Allocations::default();
    let a = resolve_networks(
        &[l2net("a", "{}"), l2net("b", "{}")],
        None,
        &[],
        &mut allocs,
    );
    assert_eq!((a[0].vni, a[1].vni), (Some(1), Some(2)));
    let b = resolve_networks(&[l2net("b", "{}")], None, &[], &mut allocs);
    assert_eq!(b[0].vni, Some(2));
    let c = resolve_networks(
        &[l2net("b", "{}"), l2net("c", "{}")],
        None,
        &[],
        &mut allocs,
    );
    assert_eq!(c[1].vni, Some(3));
}

fn full_plan() -> ClusterPlan {
    let mut allocs = Allocations::default();
    let nets = vec![
        l2net("blue", "{ipRange: 10.1.0.0/16}"),
        l2net("shared", "{scope: multiCluster}"),
    ];
    let out = resolve_networks(&nets, Some(&view()), &[], &mut allocs);
    let nodes = vec![
        node("gw1", true),
        node("worker", false),
        node("silent", false),
    ];
    let hellos: BTreeMap<String, Hello> = [
        ("gw1".to_owned(), hello(1)),
        ("worker".to_owned(), hello(2)),
    ]
    .into();
    plan(&nodes, &hellos, &out, subnet(), &mut allocs)
}

#[test]
fn non_gateways_peer_only_with_their_own_cluster() {
    let p = full_plan();
    let worker = &p.nodes["worker"];
    assert_eq!(worker.peers.len(), 1, "only gw1 has said hello");
    let gw = &worker.peers[0];
    assert_eq!(gw.group(), PeerGroup::Local);
    assert_eq!(gw.name, "gw1");
    assert_eq!(gw.vnis, vec![1, 4100]);
    assert_eq!(
        gw.endpoint, "198.51.100.1:51820",
        "a LAN peer gets what the gateway reported, not its WAN endpoint"
    );
    assert_eq!(gw.tunnel_ip, "100.64.1.1");
    assert_eq!(worker.identity.as_ref().unwrap().tunnel_ip, "100.64.1.2");
}

#[test]
fn gateways_also_peer_with_remote_gateways_of_shared_networks() {
    let p = full_plan();
    let gw = &p.nodes["gw1"];
    let groups: Vec<(String, PeerGroup)> = gw
        .peers
        .iter()
        .map(|x| (x.name.clone(), x.group()))
        .collect();
    assert_eq!(
        groups,
        vec![
            ("worker".to_owned(), PeerGroup::Local),
            ("cloud/gw".to_owned(), PeerGroup::Remote)
        ]
    );
    let remote = &gw.peers[1];
    assert_eq!(
        remote.vnis,
        vec![4100],
        "remote peers carry only shared VNIs"
    );
    assert_eq!(remote.endpoint, "203.0.113.5:51820");
    assert_eq!(p.gateways.len(), 1);
    assert_eq!(p.gateways[0].node, "gw1");
    assert_eq!(p.requested_networks, vec!["shared".to_owned()]);
}

#[test]
fn every_node_gets_networks_with_disjoint_pod_slices() {
    let p = full_plan();
    let mut slices = BTreeSet::new();
    for state in p.nodes.values() {
        assert_eq!(state.networks.len(), 2);
        let shared = state.networks.iter().find(|n| n.name == "shared").unwrap();
        assert_eq!(shared.mtu, 1380);
        let s: IpNet = shared.pod_cidr.parse().unwrap();
        assert!("10.50.16.0/20".parse::<IpNet>().unwrap().contains(&s));
        assert!(slices.insert(s), "slice {s} handed out twice");
    }
    assert!(
        p.nodes.contains_key("silent"),
        "nodes without hello still get a state"
    );
}

#[test]
fn only_one_gateway_per_cluster_carries_remote_tunnels() {
    let mut allocs = Allocations::default();
    let nets = vec![l2net("shared", "{scope: multiCluster}")];
    let out = resolve_networks(&nets, Some(&view()), &[], &mut allocs);
    let nodes = vec![node("gw-b", true), node("gw-a", true), node("w", false)];
    let mut hellos: BTreeMap<String, Hello> = [
        ("gw-a".to_owned(), hello(1)),
        ("gw-b".to_owned(), hello(2)),
        ("w".to_owned(), hello(3)),
    ]
    .into();
    let p = plan(&nodes, &hellos, &out, subnet(), &mut allocs);
    let remote = |p: &ClusterPlan, n: &str| {
        p.nodes[n]
            .peers
            .iter()
            .filter(|x| x.group() == PeerGroup::Remote)
            .count()
    };
    assert_eq!((remote(&p, "gw-a"), remote(&p, "gw-b")), (1, 0));
    assert_eq!(p.gateways.len(), 1);
    assert_eq!(p.gateways[0].node, "gw-a");
    // The standby takes over once the active one is gone.
    hellos.remove("gw-a");
    let nodes = vec![node("gw-b", true), node("w", false)];
    let p = plan(&nodes, &hellos, &out, subnet(), &mut allocs);
    assert_eq!(remote(&p, "gw-b"), 1);
    assert_eq!(p.gateways[0].node, "gw-b");
}

fn slices_of(p: &ClusterPlan, network: &str) -> Vec<String> {
    p.nodes
        .values()
        .map(|s| {
            s.networks
                .iter()
                .find(|n| n.name == network)
                .unwrap()
                .pod_cidr
                .clone()
        })
        .collect()
}

#[test]
fn node_slice_prefix_sets_every_nodes_slice_and_ipv6_ranges_split_too() {
    let mut allocs = Allocations::default();
    let nets = vec![
        l2net("big", "{ipRange: 10.1.0.0/16, nodeSlicePrefix: 24}"),
        l2net("six", "{ipRange: 'fd00:1::/64'}"),
    ];
    let out = resolve_networks(&nets, None, &[], &mut allocs);
    let nodes = vec![node("a", false), node("b", false)];
    let p = plan(&nodes, &BTreeMap::new(), &out, subnet(), &mut allocs);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(slices_of(&p, "big"), vec!["10.1.0.0/24", "10.1.1.0/24"]);
    assert_eq!(
        slices_of(&p, "six"),
        vec!["fd00:1::/68", "fd00:1:0:0:1000::/68"]
    );
}

#[test]
fn a_slice_prefix_too_short_for_the_clusters_share_is_reported() {
    let mut allocs = Allocations::default();
    // The broker gives this cluster a /20; /18 slices cannot fit in it.
    let nets = vec![l2net(
        "shared",
        "{scope: multiCluster, nodeSlicePrefix: 18}",
    )];
    let out = resolve_networks(&nets, Some(&view()), &[], &mut allocs);
    let problem = out[0].problem.clone().unwrap();
    assert!(
        problem.contains("nodeSlicePrefix") && problem.contains("10.50.16.0/20"),
        "{problem}"
    );
    assert!(out[0].active(), "the network still carries frames");
    let p = plan(
        &[node("a", false)],
        &BTreeMap::new(),
        &out,
        subnet(),
        &mut allocs,
    );
    assert_eq!(slices_of(&p, "shared"), vec![String::new()]);
    assert!(
        p.problems[0].contains("between /20 and /30"),
        "{:?}",
        p.problems
    );
}

#[test]
fn lan_peers_get_lan_endpoints_and_only_other_clusters_get_the_wan_one() {
    let mut allocs = Allocations::default();
    let out = resolve_networks(
        &[l2net("shared", "{scope: multiCluster}")],
        Some(&view()),
        &[],
        &mut allocs,
    );
    let wan = "192.0.2.10:51820";
    let nodes = vec![
        NodeEntry {
            name: "gw".into(),
            gateway: true,
            endpoint: Some(wan.into()),
        },
        NodeEntry {
            name: "w1".into(),
            gateway: false,
            endpoint: Some("10.0.0.21:51820".into()),
        },
        // A gateway the engine did not elect: handed over as a plain node.
        NodeEntry {
            name: "standby".into(),
            gateway: false,
            endpoint: Some("192.0.2.11:51820".into()),
        },
        NodeEntry {
            name: "w2".into(),
            gateway: false,
            endpoint: None,
        },
    ];
    let said = |key: u8, eps: &[&str]| Hello {
        public_key: vec![key; 32],
        listen_port: 51820,
        endpoints: eps.iter().map(|e| (*e).to_owned()).collect(),
    };
    // The gateway reports its WAN endpoint too: LAN peers skip it.
    let hellos: BTreeMap<String, Hello> = [
        ("gw".to_owned(), said(1, &[wan, "10.0.0.1:51820"])),
        ("w1".to_owned(), said(2, &["10.0.0.21:51820"])),
        (
            "standby".to_owned(),
            said(4, &["192.0.2.11:51820", "10.0.0.2:51820"]),
        ),
        ("w2".to_owned(), said(3, &["10.0.0.22:51820"])),
    ]
    .into();
    let p = plan(&nodes, &hellos, &out, subnet(), &mut allocs);
    let endpoint = |on: &str, of: &str| {
        p.nodes[on]
            .peers
            .iter()
            .find(|x| x.name == of)
            .unwrap()
            .endpoint
            .clone()
    };
    assert_eq!(endpoint("w1", "gw"), "10.0.0.1:51820");
    assert_eq!(endpoint("w2", "gw"), "10.0.0.1:51820");
    assert_eq!(endpoint("w2", "standby"), "10.0.0.2:51820");
    assert_eq!(endpoint("gw", "w1"), "10.0.0.21:51820");
    assert_eq!(endpoint("gw", "w2"), "10.0.0.22:51820", "reported address");
    assert_eq!(
        endpoint("gw", "cloud/gw"),
        "203.0.113.5:51820",
        "remote: WAN"
    );
    assert_eq!(
        p.gateways[0].endpoints,
        vec![wan.to_owned()],
        "the broker gets WAN"
    );
    // A gateway that reported only its WAN endpoint (or nothing) is
    // reached there: nothing better is known.
    let hellos: BTreeMap<String, Hello> = [
        ("gw".to_owned(), said(1, &[])),
        ("w1".to_owned(), said(2, &[])),
        ("w2".to_owned(), said(3, &[])),
    ]
    .into();
    let p = plan(&nodes, &hellos, &out, subnet(), &mut allocs);
    let endpoint = |on: &str, of: &str| {
        p.nodes[on]
            .peers
            .iter()
            .find(|x| x.name == of)
            .unwrap()
            .endpoint
            .clone()
    };
    assert_eq!(endpoint("w2", "gw"), wan);
    assert_eq!(
        endpoint("gw", "w1"),
        "10.0.0.21:51820",
        "configured, nothing reported"
    );
    assert_eq!(endpoint("gw", "w2"), "", "w2 said nothing: it initiates");
}

#[test]
fn plan_is_deterministic_for_same_inputs() {
    assert_eq!(full_plan(), full_plan());
}
