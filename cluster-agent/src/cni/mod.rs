//! `l2mesh-cni`: CNI spec 1.0 ADD, DEL, CHECK and VERSION.
//!
//! ADD creates a veth pair with the pod end (requested name, MAC, MTU) in the
//! pod's namespace, asks the node's dataplane to plug the host end into the
//! network's bridge (`Dataplane.AttachPort`, which also says the MTU and the
//! node's pod CIDR slice), then configures addresses from l2mesh IPAM, static
//! `ips`, or a delegated IPAM plugin.

mod addrs;
pub mod announce;
pub mod delegate;
pub mod link;
pub mod store;
pub mod types;

use addrs::{Ipam, data_dir, ipam_kind, l2mesh_ipam, parse_net, requested_ips, requested_mac};
use ipnet::IpNet;
use l2mesh_proto::node::dataplane_client::DataplaneClient;
use l2mesh_proto::node::{AttachPortRequest, DetachPortRequest, PortResult, StatusRequest};
use link::Netlink;
use std::net::IpAddr;
use std::path::Path;
use types::{CniEnv, CniError, CniResult, Interface, IpConfig, NetConf, code};

/// Run one CNI command. `Ok(Some(json))` is printed on stdout.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(
            serde_json::json!({
                "cniVersion": types::CNI_VERSION,
                "supportedVersions": types::SUPPORTED_VERSIONS,
            })
            .to_string(),
        )),
        "ADD" => {
            let mut result = add(env, &NetConf::parse(stdin)?, stdin).await?;
            result.shape_for_version();
            serde_json::to_string(&result)
                .map(Some)
                .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))
        }
        "DEL" => del(env, &NetConf::parse(stdin)?, stdin)
            .await
            .map(|()| None),
        "CHECK" => check(env, &NetConf::parse(stdin)?, stdin)
            .await
            .map(|()| None),
        "GC" => gc(env, &NetConf::parse(stdin)?, stdin).map(|()| None),
        "STATUS" => {
            let conf = NetConf::parse(stdin)?;
            client(&conf)
                .await
                .map(|_| None)
                .map_err(|e| CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg, e.details))
        }
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "l2mesh-cni is a CNI plugin: the container runtime (or Multus) runs it",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
            "",
        )),
    }
}

fn netns_must_exist(env: &CniEnv) -> Result<(), CniError> {
    if Path::new(&env.netns).exists() {
        Ok(())
    } else {
        Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("the network namespace {} does not exist", env.netns),
            "the container is gone; nothing was changed",
        ))
    }
}

async fn client(conf: &NetConf) -> Result<DataplaneClient<tonic::transport::Channel>, CniError> {
    let socket = conf.socket();
    crate::uds::connect(&socket)
        .await
        .map(DataplaneClient::new)
        .map_err(|e| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("cannot reach the l2mesh dataplane at {}: {e}", socket.display()),
                "is l2mesh-dataplane running on this node? check dataplaneSocket in the network configuration",
            )
        })
}

fn status_error(network: &str, op: &str, s: &tonic::Status) -> CniError {
    match s.code() {
        tonic::Code::NotFound => CniError::new(
            code::INVALID_CONFIG,
            format!("network {network:?} is not known to the dataplane on this node"),
            format!(
                "create the L2Network first, or fix \"name\"/\"network\" in the configuration ({})",
                s.message()
            ),
        ),
        tonic::Code::InvalidArgument => {
            CniError::new(code::INVALID_CONFIG, format!("{op}: {}", s.message()), "")
        }
        _ => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("dataplane {op} failed: {}", s.message()),
            "",
        ),
    }
}

/// Netlink inside the pod; a `CNI_NETNS` that is not a network namespace
/// is a bad environment (code 4), not an I/O failure.
async fn pod_netlink(env: &CniEnv, ns: &std::fs::File) -> Result<Netlink, CniError> {
    Netlink::in_netns(ns).await.map_err(|e| match e {
        link::NetnsError::NotANetns(why) => CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace: {why}", env.netns),
            "pass the path of the container's network namespace (e.g. /proc/<pid>/ns/net); nothing was changed",
        ),
        link::NetnsError::Netlink(why) => io_err(why),
    })
}

pub(super) fn io_err(msg: String) -> CniError {
    CniError::new(code::IO_FAILURE, msg, "")
}

async fn add(env: &CniEnv, conf: &NetConf, stdin: &[u8]) -> Result<CniResult, CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    netns_must_exist(env)?;
    let mac = requested_mac(conf, env)?;
    let statics = requested_ips(conf, env)?;
    let mut dp = client(conf).await?;
    let host = link::host_ifname(&env.container_id, &env.ifname);
    let network = conf.network().to_owned();
    let ns_file = link::open_netns(&env.netns).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            e,
            "the container is gone; nothing was changed",
        )
    })?;
    let host_nl = Netlink::host().map_err(io_err)?;
    let pod_nl = pod_netlink(env, &ns_file).await?;
    // A leftover from an ADD that died halfway would make the name clash.
    host_nl.delete(&host).await.map_err(io_err)?;
    let first_mtu = conf.mtu.unwrap_or(crate::crd::DEFAULT_MTU);
    host_nl
        .create_veth(&host, &ns_file, &env.ifname, first_mtu, mac)
        .await
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot create interface {} in the pod: {e}", env.ifname),
                "nothing was attached",
            )
        })?;
    let nls = Links {
        host: host_nl,
        pod: pod_nl,
    };
    let (pod_namespace, pod_name) = env.pod().unwrap_or_default();
    let port = match dp
        .attach_port(AttachPortRequest {
            network: network.clone(),
            ifname: host.clone(),
            pod_namespace,
            pod_name,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            cleanup(conf, &nls.host, &host, false).await;
            return Err(status_error(&network, "AttachPort", &s));
        }
    };
    let result = finish_add(env, conf, stdin, &nls, &host, &port, &statics).await;
    if let Ok(r) = &result {
        announce_addresses(env, &ns_file, r);
    }
    if result.is_err() {
        if let Ipam::L2mesh = ipam_kind(conf)
            && let Ok(store) = store::Store::open(&data_dir(conf), &network)
        {
            let _ = store.release(&env.container_id, &env.ifname);
        }
        cleanup(conf, &nls.host, &host, true).await;
    }
    result
}

/// Announces the pod's addresses on its new interface, so that neighbours
/// holding them with an earlier pod's MAC update at once. Best effort: the
/// attachment works without it, so a failure is only logged.
fn announce_addresses(env: &CniEnv, ns: &std::fs::File, result: &CniResult) {
    let Some(mac) = result
        .interfaces
        .iter()
        .find(|i| i.name == env.ifname && !i.sandbox.is_empty())
        .and_then(|i| link::parse_mac(&i.mac))
    else {
        return;
    };
    let ips: Vec<IpAddr> = result
        .ips
        .iter()
        .filter_map(|ip| parse_net("ips address", &ip.address).ok())
        .map(|n| n.addr())
        .collect();
    if let Err(e) = announce::send(ns, &env.ifname, announce::frames(mac, &ips)) {
        tracing::warn!(error = %e, "could not announce the pod's addresses");
    }
}

/// Netlink connections in the host's and in the pod's namespace.
struct Links {
    host: Netlink,
    pod: Netlink,
}

/// Undo a half-done ADD; errors are ignored because the ADD error is what
/// the runtime must see.
async fn cleanup(conf: &NetConf, nl: &Netlink, host: &str, attached: bool) {
    let _ = nl.delete(host).await;
    if attached && let Ok(mut dp) = client(conf).await {
        let _ = dp
            .detach_port(DetachPortRequest {
                network: conf.network().to_owned(),
                ifname: host.to_owned(),
            })
            .await;
    }
}

async fn finish_add(
    env: &CniEnv,
    conf: &NetConf,
    stdin: &[u8],
    nl: &Links,
    host: &str,
    port: &PortResult,
    statics: &[IpNet],
) -> Result<CniResult, CniError> {
    let mtu = conf
        .mtu
        .or((port.mtu != 0).then_some(port.mtu))
        .unwrap_or(crate::crd::DEFAULT_MTU);
    if mtu != conf.mtu.unwrap_or(crate::crd::DEFAULT_MTU) {
        nl.host.set_mtu(host, mtu).await.map_err(io_err)?;
        nl.pod.set_mtu(&env.ifname, mtu).await.map_err(io_err)?;
    }
    let mut result = CniResult {
        cni_version: conf.cni_version.clone(),
        dns: serde_json::json!({}),
        ..CniResult::default()
    };
    match ipam_kind(conf) {
        Ipam::None => {
            result.ips = statics
                .iter()
                .map(|s| IpConfig {
                    address: s.to_string(),
                    interface: Some(1),
                    ..IpConfig::default()
                })
                .collect();
        }
        Ipam::L2mesh => {
            result.ips = l2mesh_ipam(conf, env, port, statics)?;
            result.routes = conf
                .ipam
                .as_ref()
                .map(|i| i.routes.clone())
                .unwrap_or_default();
        }
        Ipam::Delegate(plugin) => {
            let delegated = delegate::exec(env, plugin, "ADD", stdin)?.unwrap_or_default();
            result.ips = delegated
                .ips
                .into_iter()
                .map(|ip| IpConfig {
                    interface: Some(1),
                    ..ip
                })
                .collect();
            result.routes = delegated.routes;
            result.dns = delegated.dns;
        }
    }
    for ip in &result.ips {
        let addr = parse_net("ips address", &ip.address)?;
        nl.pod
            .add_address(&env.ifname, addr)
            .await
            .map_err(io_err)?;
    }
    nl.pod.set_up(&env.ifname).await.map_err(io_err)?;
    nl.host.set_up(host).await.map_err(io_err)?;
    for route in &result.routes {
        let dst = parse_net("routes dst", &route.dst)?;
        // A route without a gateway goes by its family's address gateway,
        // as the reference plugins do.
        let family_gw = result
            .ips
            .iter()
            .filter_map(|ip| ip.gateway.as_deref())
            .find(|g| g.contains(':') == dst.addr().is_ipv6());
        let gw = route
            .gw
            .as_deref()
            .or(family_gw)
            .map(|g| {
                g.parse::<IpAddr>().map_err(|_| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("route gateway {g:?} is not an IP address"),
                        "fix the routes of the IPAM configuration or plugin",
                    )
                })
            })
            .transpose()?;
        nl.pod
            .add_route(&env.ifname, dst, gw)
            .await
            .map_err(io_err)?;
    }
    let host_info = nl.host.link(host).await.ok().flatten().unwrap_or_default();
    let pod_info = nl
        .pod
        .link(&env.ifname)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    result.interfaces = vec![
        Interface {
            name: host.to_owned(),
            mac: host_info.mac,
            mtu: Some(host_info.mtu),
            sandbox: String::new(),
        },
        Interface {
            name: env.ifname.clone(),
            mac: pod_info.mac,
            mtu: Some(pod_info.mtu),
            sandbox: env.netns.clone(),
        },
    ];
    Ok(result)
}

async fn del(env: &CniEnv, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
    let host = link::host_ifname(&env.container_id, &env.ifname);
    match ipam_kind(conf) {
        Ipam::None => {}
        Ipam::L2mesh => {
            let store = store::Store::open(&data_dir(conf), conf.network()).map_err(io_err)?;
            store
                .release(&env.container_id, &env.ifname)
                .map_err(io_err)?;
        }
        Ipam::Delegate(plugin) => {
            delegate::exec(env, plugin, "DEL", stdin)?;
        }
    }
    // DEL must succeed when the dataplane is gone: the port disappears with
    // the veth anyway, the detach only lets the dataplane forget it sooner.
    if let Ok(mut dp) = client(conf).await
        && let Err(s) = dp
            .detach_port(DetachPortRequest {
                network: conf.network().to_owned(),
                ifname: host.clone(),
            })
            .await
    {
        tracing::debug!(error = %s, "detach port");
    }
    Netlink::host()
        .map_err(io_err)?
        .delete(&host)
        .await
        .map_err(io_err)?;
    // The pod end went with the host end; this catches a pod interface
    // whose host end was lost some other way. A namespace that is gone or
    // cannot be entered has nothing left to clean.
    if !env.netns.is_empty()
        && let Ok(ns) = link::open_netns(&env.netns)
        && let Ok(pod) = Netlink::in_netns(&ns).await
    {
        pod.delete(&env.ifname).await.map_err(io_err)?;
    }
    Ok(())
}

/// GC (CNI 1.1): frees every l2mesh IPAM lease of this network whose
/// attachment is not in `cni.dev/valid-attachments` (a lost DEL leaks
/// nothing for longer than until the runtime's next GC); a delegated IPAM
/// plugin gets the GC itself.
fn gc(env: &CniEnv, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments in the configuration",
            "the runtime lists the attachments that still exist; nothing was freed",
        )
    })?;
    match ipam_kind(conf) {
        Ipam::None => Ok(()),
        Ipam::L2mesh => {
            let keep: Vec<(String, String)> = valid
                .iter()
                .map(|a| (a.container_id.clone(), a.ifname.clone()))
                .collect();
            let store = store::Store::open(&data_dir(conf), conf.network()).map_err(io_err)?;
            let freed = store.retain(&keep).map_err(io_err)?;
            if !freed.is_empty() {
                tracing::info!(?freed, network = conf.network(), "GC freed leases");
            }
            Ok(())
        }
        Ipam::Delegate(plugin) => delegate::exec(env, plugin, "GC", stdin).map(|_| ()),
    }
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg, "delete and re-add the attachment")
}

async fn check(env: &CniEnv, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let prev: CniResult = conf
        .prev_result
        .clone()
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "CHECK needs prevResult in the configuration",
                "the runtime passes the ADD result as prevResult",
            )
        })
        .and_then(|v| {
            serde_json::from_value(v)
                .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("prevResult: {e}"), ""))
        })?;
    netns_must_exist(env)?;
    let ns_file = link::open_netns(&env.netns)
        .map_err(|e| CniError::new(code::UNKNOWN_CONTAINER, e, "the container is gone"))?;
    let pod = pod_netlink(env, &ns_file).await?;
    let host_nl = Netlink::host().map_err(io_err)?;
    let host = link::host_ifname(&env.container_id, &env.ifname);
    let info = pod
        .link(&env.ifname)
        .await
        .map_err(io_err)?
        .ok_or_else(|| check_failed(format!("interface {} is missing in the pod", env.ifname)))?;
    if let Some(want) = prev.interfaces.iter().find(|i| i.name == env.ifname) {
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(&info.mac) {
            return Err(check_failed(format!(
                "interface {} has MAC {} instead of {}",
                env.ifname, info.mac, want.mac
            )));
        }
        if let Some(mtu) = want.mtu
            && mtu != info.mtu
        {
            return Err(check_failed(format!(
                "interface {} has MTU {} instead of {mtu}",
                env.ifname, info.mtu
            )));
        }
    }
    let have = pod.addresses(&env.ifname).await.map_err(io_err)?;
    for ip in &prev.ips {
        let want = parse_net("prevResult ips address", &ip.address)?;
        if !have.contains(&want) {
            return Err(check_failed(format!(
                "address {} is missing on {}",
                ip.address, env.ifname
            )));
        }
    }
    let host_info = host_nl
        .link(&host)
        .await
        .map_err(io_err)?
        .ok_or_else(|| check_failed(format!("host interface {host} is missing")))?;
    if !host_info.up {
        return Err(check_failed(format!("host interface {host} is down")));
    }
    match ipam_kind(conf) {
        Ipam::None => {}
        Ipam::L2mesh => {
            let store = store::Store::open(&data_dir(conf), conf.network()).map_err(io_err)?;
            let owned = store
                .owned_by(&env.container_id, &env.ifname)
                .map_err(io_err)?;
            for ip in &prev.ips {
                let addr = ip.address.split('/').next().unwrap_or_default();
                if !owned.iter().any(|o| o.to_string() == addr) {
                    return Err(check_failed(format!(
                        "address {addr} has no l2mesh IPAM lease"
                    )));
                }
            }
        }
        Ipam::Delegate(plugin) => {
            delegate::exec(env, plugin, "CHECK", stdin)?;
        }
    }
    let mut dp = client(conf).await?;
    let status = dp
        .get_status(StatusRequest {})
        .await
        .map_err(|s| status_error(conf.network(), "GetStatus", &s))?
        .into_inner();
    let attached = status
        .networks
        .iter()
        .any(|n| n.name == conf.network() && n.ports.iter().any(|p| p == &host));
    if !attached {
        return Err(check_failed(format!(
            "{host} is not a port of network {} on this node",
            conf.network()
        )));
    }
    Ok(())
}
