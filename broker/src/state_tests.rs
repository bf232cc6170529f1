use super::*;

fn gw(node: &str, key: u8, ip: &str) -> Gateway {
    Gateway {
        node: node.into(),
        public_key: vec![key; 32],
        endpoints: vec!["192.0.2.1:51820".into()],
        tunnel_ip: ip.parse().unwrap(),
    }
}

fn joined(names: &[&str]) -> State {
    let mut s = State::default();
    for (i, n) in names.iter().enumerate() {
        let id = format!("t{i}");
        s.create_token(n, id.clone(), "sec", 60, 1, 0).unwrap();
        s.join(&id, "sec", n, [i as u8; 32], 1).unwrap();
    }
    s.take_dirty();
    s
}

#[test]
fn token_checks_name_each_failure() {
    let mut s = State::default();
    s.create_token("edge", "a".into(), "secret", 100, 1, 0)
        .unwrap();
    assert_eq!(
        s.check_token("zz", "secret", "edge", 1),
        Err(JoinDenied::NoSuchToken("zz".into()))
    );
    assert_eq!(
        s.check_token("a", "nope", "edge", 1),
        Err(JoinDenied::NoSuchToken("a".into()))
    );
    assert_eq!(
        s.check_token("a", "secret", "edge", 100),
        Err(JoinDenied::Expired("a".into()))
    );
    assert!(matches!(
        s.check_token("a", "secret", "other", 1),
        Err(JoinDenied::WrongCluster { .. })
    ));
    s.join("a", "secret", "edge", [1; 32], 1).unwrap();
    assert_eq!(
        s.check_token("a", "secret", "edge", 1),
        Err(JoinDenied::UsedUp("a".into()))
    );
    s.create_token("edge", "b".into(), "secret", 100, 2, 0)
        .unwrap();
    s.revoke_token("b", 1).unwrap();
    assert_eq!(
        s.check_token("b", "secret", "edge", 1),
        Err(JoinDenied::Revoked("b".into()))
    );
}

#[test]
fn secrets_are_stored_hashed() {
    let mut s = State::default();
    let t = s
        .create_token("edge", "a".into(), "plain-secret", 10, 1, 0)
        .unwrap();
    assert_eq!(t.secret_sha256, sha256(b"plain-secret"));
    assert!(!format!("{t:?}").contains("plain-secret"));
}

#[test]
fn failed_join_changes_nothing() {
    let mut s = State::default();
    s.create_token("edge", "a".into(), "secret", 100, 1, 0)
        .unwrap();
    s.take_dirty();
    assert!(s.join("a", "bad", "edge", [1; 32], 1).is_err());
    assert!(s.take_dirty().is_empty());
    assert_eq!(s.tokens["a"].uses_left, 1);
    assert!(s.clusters.is_empty());
}

#[test]
fn join_allocates_distinct_subnets_and_rejoin_replaces_the_cert() {
    let mut s = joined(&["a", "b"]);
    assert_eq!(
        tunnel_subnet(s.clusters["a"].subnet_index).to_string(),
        "100.64.0.0/24"
    );
    assert_eq!(
        tunnel_subnet(s.clusters["b"].subnet_index).to_string(),
        "100.64.1.0/24"
    );
    assert_eq!(s.cluster_for_cert(&[0; 32]), Some("a"));
    s.create_token("a", "again".into(), "x", 60, 1, 0).unwrap();
    s.join("again", "x", "a", [9; 32], 2).unwrap();
    assert_eq!(s.cluster_for_cert(&[0; 32]), None);
    assert_eq!(s.cluster_for_cert(&[9; 32]), Some("a"));
    assert_eq!(s.clusters["a"].subnet_index, 0);
}

#[test]
fn vni_allocation_and_conflicts() {
    let mut s = State::default();
    let (n, _) = s.create_network("n1", 0, 0, "", vec![], true, 0).unwrap();
    assert_eq!(n.vni, VNI_MIN);
    assert_eq!(n.mtu, DEFAULT_MTU);
    let (n2, _) = s.create_network("n2", 0, 0, "", vec![], true, 0).unwrap();
    assert_eq!(n2.vni, VNI_MIN + 1);
    assert!(matches!(
        s.create_network("n3", VNI_MIN, 0, "", vec![], true, 0),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create_network("n3", 100, 0, "", vec![], true, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.create_network("n3", VNI_MAX + 1, 0, "", vec![], true, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.create_network("n1", 0, 0, "", vec![], true, 0),
        Err(Error::AlreadyExists(_))
    ));
    // A deleted network's VNI is not handed out again right away.
    s.delete_network("n1").unwrap();
    let (n3, _) = s.create_network("n3", 0, 0, "", vec![], true, 0).unwrap();
    assert_eq!(n3.vni, VNI_MIN + 2);
}

#[test]
fn bad_network_input_is_rejected() {
    let mut s = State::default();
    for (cidr, allow, all) in [
        ("10.0.0.0/30", vec!["a".to_string()], false),
        ("banana", vec!["a".to_string()], false),
        ("", vec![], false),
        ("", vec!["Bad_Name".to_string()], false),
    ] {
        assert!(matches!(
            s.create_network("n", 0, 0, cidr, allow, all, 0),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(s.create_network("n", 0, 100, "", vec![], true, 0).is_err());
    assert!(
        s.create_network("UPPER", 0, 0, "", vec![], true, 0)
            .is_err()
    );
    assert!(s.networks.is_empty());
}

#[test]
fn acl_admits_only_allowed_requesters() {
    let mut s = joined(&["a", "b", "c"]);
    s.create_network("blue", 0, 0, "", vec!["a".into(), "b".into()], false, 0)
        .unwrap();
    for c in ["a", "b", "c"] {
        s.request_networks(c, vec!["blue".into(), "nope".into()])
            .unwrap();
    }
    assert_eq!(s.admission("a", "blue"), Admission::Admitted);
    // Not allowed and not existing answer alike: c cannot tell whether
    // "blue" exists.
    let (Admission::Unknown(not_allowed), Admission::Unknown(missing)) =
        (s.admission("c", "blue"), s.admission("c", "nope"))
    else {
        panic!("both must be Unknown");
    };
    assert_eq!(not_allowed.replace("blue", "nope"), missing);
    assert_eq!(s.members("blue"), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(s.networks_of("c"), Vec::<String>::new());
}

#[test]
fn slices_are_stable_when_others_come_and_go() {
    let mut s = joined(&["a", "b", "c"]);
    s.create_network("blue", 0, 0, "10.10.0.0/16", vec![], true, 0)
        .unwrap();
    s.request_networks("b", vec!["blue".into()]).unwrap();
    s.request_networks("c", vec!["blue".into()]).unwrap();
    assert_eq!(s.networks["blue"].slots["b"], 0);
    assert_eq!(s.networks["blue"].slots["c"], 1);
    s.request_networks("a", vec!["blue".into()]).unwrap();
    assert_eq!(s.networks["blue"].slots["a"], 2);
    assert_eq!(s.networks["blue"].slots["b"], 0);
    s.request_networks("b", vec![]).unwrap();
    assert_eq!(s.networks["blue"].slots.get("b"), None);
    assert_eq!(s.networks["blue"].slots["c"], 1);
    let cidr: IpNet = "10.10.0.0/16".parse().unwrap();
    assert_eq!(cluster_slice(&cidr, 1).unwrap().to_string(), "10.10.1.0/24");
}

#[test]
fn full_cidr_denies_with_a_reason() {
    let mut s = joined(&["a", "b"]);
    // A /24 gives 16 slices of /28; shrink capacity by using a /28-sized pool.
    s.create_network("tiny", 0, 0, "10.0.0.0/28", vec![], true, 0)
        .unwrap();
    s.request_networks("a", vec!["tiny".into()]).unwrap();
    s.request_networks("b", vec!["tiny".into()]).unwrap();
    assert_eq!(s.admission("a", "tiny"), Admission::Admitted);
    assert!(matches!(s.admission("b", "tiny"), Admission::Denied(r) if r.contains("slice")));
}

#[test]
fn gateway_reports_are_validated() {
    let mut s = joined(&["a", "b"]);
    let ok = gw("n1", 1, "100.64.0.1");
    assert!(s.report_gateways("a", vec![ok.clone()]).is_ok());
    // Outside its own subnet: someone else's tunnel address.
    assert!(
        s.report_gateways("a", vec![gw("n1", 1, "100.64.1.1")])
            .is_err()
    );
    assert!(
        s.report_gateways("a", vec![gw("n1", 1, "100.64.0.0")])
            .is_err()
    );
    let mut short = ok.clone();
    short.public_key = vec![1; 31];
    assert!(s.report_gateways("a", vec![short]).is_err());
    let mut bad_ep = ok.clone();
    bad_ep.endpoints = vec!["nowhere".into()];
    assert!(s.report_gateways("a", vec![bad_ep]).is_err());
    assert!(
        s.report_gateways("a", vec![ok.clone(), gw("n1", 2, "100.64.0.2")])
            .is_err()
    );
    assert!(
        s.report_gateways("a", vec![ok, gw("n2", 3, "100.64.0.1")])
            .is_err()
    );
    assert_eq!(s.clusters["a"].gateways.len(), 1);
}

#[test]
fn affected_sets_follow_membership() {
    let mut s = joined(&["a", "b", "c"]);
    s.create_network("blue", 0, 0, "", vec![], true, 0).unwrap();
    s.request_networks("a", vec!["blue".into()]).unwrap();
    s.request_networks("b", vec!["blue".into()]).unwrap();
    let affected = s
        .report_gateways("a", vec![gw("g", 1, "100.64.0.1")])
        .unwrap();
    assert_eq!(affected, BTreeSet::from(["a".to_string(), "b".to_string()]));
    let (_, affected) = s.remove_cluster("b", 1).unwrap();
    assert_eq!(affected, BTreeSet::from(["a".to_string()]));
    assert!(s.cluster_for_cert(&[1; 32]).is_none());
    assert_eq!(s.members("blue"), vec!["a".to_string()]);
}

#[test]
fn names_are_validated() {
    assert!(validate_name("cluster", "edge-1").is_ok());
    for bad in ["", "-a", "a-", "A", "a_b", &"x".repeat(64)] {
        assert!(validate_name("cluster", bad).is_err(), "{bad}");
    }
}

#[test]
fn view_revisions_increase_and_a_new_view_format_moves_every_cluster() {
    let mut s = joined(&["a", "b"]);
    let r1 = s.bump_view_rev("a").unwrap();
    let r2 = s.bump_view_rev("a").unwrap();
    assert!(r2 > r1);
    assert_eq!(s.clusters["a"].view_rev, r2);
    assert!(s.take_dirty().contains(&Key::Cluster("a".into())));
    assert!(s.upgrade_view_format(7));
    assert!(s.clusters["a"].view_rev > r2);
    assert!(s.clusters["b"].view_rev > r2);
    let before = s.meta.revision;
    assert!(!s.upgrade_view_format(7), "same format: nothing to do");
    assert_eq!(s.meta.revision, before);
}

#[test]
fn removing_a_cluster_revokes_its_unused_tokens() {
    let mut s = State::default();
    s.create_token("a", "multi".into(), "x", 60, 3, 0).unwrap();
    s.create_token("b", "other".into(), "x", 60, 1, 0).unwrap();
    s.join("multi", "x", "a", [1; 32], 1).unwrap();
    s.remove_cluster("a", 1).unwrap();
    assert_eq!(
        s.check_token("multi", "x", "a", 2),
        Err(JoinDenied::Revoked("multi".into()))
    );
    assert!(!s.tokens["other"].revoked);
    assert!(matches!(s.remove_cluster("a", 1), Err(Error::NotFound(_))));
}

#[test]
fn asking_for_an_unknown_or_denied_network_affects_only_the_asker() {
    let mut s = joined(&["a", "b", "c"]);
    s.create_network("blue", 0, 0, "", vec!["a".into(), "b".into()], false, 0)
        .unwrap();
    s.request_networks("a", vec!["blue".into(), "ghost".into()])
        .unwrap();
    let affected = s.request_networks("b", vec!["ghost".into()]).unwrap();
    assert_eq!(affected, BTreeSet::from(["b".to_string()]));
    let affected = s.request_networks("c", vec!["blue".into()]).unwrap();
    assert_eq!(affected, BTreeSet::from(["c".to_string()]));
    let affected = s.request_networks("b", vec!["blue".into()]).unwrap();
    assert_eq!(
        affected,
        BTreeSet::from(["a".to_string(), "b".to_string(), "c".to_string()])
    );
}

#[test]
fn a_key_or_endpoint_belongs_to_one_cluster() {
    let mut s = joined(&["a", "b"]);
    s.report_gateways("a", vec![gw("gw", 7, "100.64.0.1")])
        .unwrap();
    let err = s
        .report_gateways("b", vec![gw("gw", 7, "100.64.1.1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one key, one cluster"), "{err}");
    assert!(
        !err.contains("\"a\""),
        "must not name the other cluster: {err}"
    );
    // Same endpoint, own key: refused by the endpoint rule.
    let err = s
        .report_gateways("b", vec![gw("gw", 8, "100.64.1.1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one endpoint, one cluster"), "{err}");
    let mut ok = gw("gw", 8, "100.64.1.1");
    ok.endpoints = vec!["198.51.100.9:51820".into()];
    s.report_gateways("b", vec![ok]).unwrap();
    // The owner may report its own key again.
    s.report_gateways("a", vec![gw("gw-2", 7, "100.64.0.2")])
        .unwrap();
}

#[test]
fn unusable_keys_and_endpoints_are_refused_by_rule() {
    let mut s = joined(&["a"]);
    let mut p_minus_1 = [0xffu8; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0xff; // top bit set: the same point for x25519
    for key in [vec![0u8; 32], p_minus_1.to_vec()] {
        let mut g = gw("gw", 0, "100.64.0.1");
        g.public_key = key;
        let err = s.report_gateways("a", vec![g]).unwrap_err().to_string();
        assert!(err.contains("usable key"), "{err}");
    }
    assert!(!is_low_order_key(&[9; 32]));
    for (ep, why) in [
        ("127.0.0.1:51820", "loopback"),
        ("[::1]:51820", "loopback"),
        ("0.0.0.0:51820", "unspecified"),
        ("255.255.255.255:51820", "broadcast"),
        ("224.0.0.1:51820", "multicast"),
        ("[::ffff:127.0.0.1]:51820", "loopback"),
        ("192.0.2.1:0", "port 0"),
    ] {
        let mut g = gw("gw", 3, "100.64.0.1");
        g.endpoints = vec![ep.into()];
        let err = s.report_gateways("a", vec![g]).unwrap_err().to_string();
        assert!(
            err.contains("reachable endpoint") && err.contains(why),
            "{ep}: {err}"
        );
    }
    let mut g = gw(&"n".repeat(254), 3, "100.64.0.1");
    let err = s
        .report_gateways("a", vec![g.clone()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("253") && err.len() < 200, "{err}");
    g.node = "gw".into();
    g.endpoints = vec![format!("{}:1", "1".repeat(70))];
    let err = s.report_gateways("a", vec![g]).unwrap_err().to_string();
    assert!(err.contains("64 bytes"), "{err}");
    assert!(s.take_dirty().is_empty(), "refused reports change nothing");
}

#[test]
fn unchanged_reports_touch_nothing() {
    let mut s = joined(&["a"]);
    s.report_gateways("a", vec![gw("gw", 3, "100.64.0.1")])
        .unwrap();
    s.request_networks("a", vec!["blue".into()]).unwrap();
    s.take_dirty();
    assert!(
        s.report_gateways("a", vec![gw("gw", 3, "100.64.0.1")])
            .unwrap()
            .is_empty()
    );
    assert!(
        s.request_networks("a", vec!["blue".into()])
            .unwrap()
            .is_empty()
    );
    assert!(s.take_dirty().is_empty());
}

#[test]
fn ended_tokens_are_purged_after_the_retention() {
    let mut s = State::default();
    s.create_token("edge", "used".into(), "x", 1000, 1, 0)
        .unwrap();
    s.create_token("edge", "live".into(), "x", 1000, 1, 0)
        .unwrap();
    s.create_token("edge", "short".into(), "x", 10, 1, 0)
        .unwrap();
    s.create_token("edge", "gone".into(), "x", 1000, 1, 0)
        .unwrap();
    s.join("used", "x", "edge", [1; 32], 5).unwrap();
    s.revoke_token("gone", 6).unwrap();
    assert!(!s.tokens_due(50, 100));
    assert_eq!(s.purge_tokens(50, 100), 0);
    assert!(s.tokens_due(106, 100));
    assert_eq!(s.purge_tokens(106, 100), 2);
    assert_eq!(s.tokens.keys().collect::<Vec<_>>(), ["live", "short"]);
    assert_eq!(s.purge_tokens(200, 100), 1);
    assert_eq!(s.tokens.keys().collect::<Vec<_>>(), ["live"]);
}

#[test]
fn renewal_keeps_the_calling_certificate_and_a_join_drops_both() {
    let mut s = joined(&["a"]);
    let first = [0u8; 32];
    s.renew_cert("a", first, [50; 32]).unwrap();
    assert_eq!(s.cluster_for_cert(&first), Some("a"));
    assert_eq!(s.cluster_for_cert(&[50; 32]), Some("a"));
    s.renew_cert("a", [50; 32], [51; 32]).unwrap();
    assert_eq!(s.cluster_for_cert(&first), None);
    s.create_token("a", "again".into(), "x", 100, 1, 0).unwrap();
    s.join("again", "x", "a", [52; 32], 1).unwrap();
    assert_eq!(s.cluster_for_cert(&[50; 32]), None);
    assert_eq!(s.cluster_for_cert(&[51; 32]), None);
    assert_eq!(s.cluster_for_cert(&[52; 32]), Some("a"));
}
