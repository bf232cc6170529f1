//! Which addresses a pod gets: static ones from the runtime, l2mesh IPAM
//! (a lease in the node's slice), and which IPAM a configuration asks for.

use super::io_err;
use super::types::{CniEnv, CniError, IpConfig, NetConf, code};
use super::{link, store, types};
use crate::ipam;
use ipnet::IpNet;
use l2mesh_proto::node::PortResult;
use std::net::IpAddr;
use std::path::PathBuf;

/// A CIDR from a result or configuration; a bare address gets a host prefix.
pub(super) fn parse_net(field: &str, s: &str) -> Result<IpNet, CniError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("{field} {s:?} is not an IP address or CIDR"),
                "use a form like 10.1.0.7/16 or fd00::7/64",
            )
        })
}

pub(super) fn requested_mac(conf: &NetConf, env: &CniEnv) -> Result<Option<[u8; 6]>, CniError> {
    let Some(mac) = conf.runtime_config.mac.clone().or_else(|| env.arg("MAC")) else {
        return Ok(None);
    };
    link::parse_mac(&mac).map(Some).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("MAC address {mac:?} is malformed"),
            "use six hex octets like 02:00:00:00:00:01",
        )
    })
}

pub(super) fn requested_ips(conf: &NetConf, env: &CniEnv) -> Result<Vec<IpNet>, CniError> {
    let mut ips: Vec<String> = conf.runtime_config.ips.clone();
    if let Some(arg) = env.arg("IP") {
        ips.extend(arg.split(',').map(str::to_owned));
    }
    ips.iter()
        .map(|s| parse_net("static address", s.trim()))
        .collect()
}

pub(super) fn data_dir(conf: &NetConf) -> PathBuf {
    conf.ipam
        .as_ref()
        .and_then(|i| i.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(types::DEFAULT_IPAM_DIR))
}

/// Addresses for the pod from l2mesh IPAM.
pub(super) fn l2mesh_ipam(
    conf: &NetConf,
    env: &CniEnv,
    port: &PortResult,
    statics: &[IpNet],
) -> Result<Vec<IpConfig>, CniError> {
    let range: Option<IpNet> = match conf.ipam.as_ref().and_then(|i| i.subnet.as_deref()) {
        Some(s) => Some(s.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.subnet {s:?} is not a CIDR"),
                "set it to the L2Network's ipRange or leave it out",
            )
        })?),
        None => None,
    };
    let slice: Option<IpNet> = port.pod_cidr.parse().ok();
    if let (Some(range), Some(slice)) = (range, slice)
        && !range.contains(&slice)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("ipam.subnet {range} does not contain this node's slice {slice}"),
            "set ipam.subnet to the L2Network's ipRange (the broker's range for multiCluster)",
        ));
    }
    let store = store::Store::open(&data_dir(conf), conf.network()).map_err(io_err)?;
    let used = store.used().map_err(io_err)?;
    let mut out = Vec::new();
    let ipam_err = |e: ipam::AllocError| {
        CniError::new(code::IPAM_FAILURE, e.to_string(), "nothing was attached")
    };
    if statics.is_empty() {
        let slice = slice.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("network {:?} has no IP range on this node", conf.network()),
                "set spec.ipRange on the L2Network, use a delegated IPAM plugin, or leave ipam out",
            )
        })?;
        let ip = ipam::pick_pod_address(slice, range, &used, store.last()).map_err(ipam_err)?;
        if !store
            .reserve(ip, &env.container_id, &env.ifname)
            .map_err(io_err)?
        {
            return Err(ipam_err(ipam::AllocError::InUse(ip)));
        }
        let prefix = range.unwrap_or(slice).prefix_len();
        out.push(format!("{ip}/{prefix}"));
    } else {
        for s in statics {
            let within = range.or(slice).unwrap_or(*s);
            ipam::check_static(s.addr(), within, &used).map_err(ipam_err)?;
            if !store
                .reserve(s.addr(), &env.container_id, &env.ifname)
                .map_err(io_err)?
            {
                return Err(ipam_err(ipam::AllocError::InUse(s.addr())));
            }
            let prefix = if s.prefix_len() == s.max_prefix_len() {
                within.prefix_len()
            } else {
                s.prefix_len()
            };
            out.push(format!("{}/{prefix}", s.addr()));
        }
    }
    let gateways = gateways(conf)?;
    Ok(out
        .into_iter()
        .map(|address| {
            let v6 = address.contains(':');
            IpConfig {
                gateway: gateways
                    .iter()
                    .find(|g| g.is_ipv6() == v6)
                    .map(ToString::to_string),
                address,
                interface: Some(1),
                version: None,
            }
        })
        .collect())
}

/// The l2mesh IPAM gateways, at most one per IP family.
pub(super) fn gateways(conf: &NetConf) -> Result<Vec<IpAddr>, CniError> {
    let Some(ipam) = &conf.ipam else {
        return Ok(Vec::new());
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for g in &ipam.gateway {
        let ip = g.parse::<IpAddr>().map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.gateway {g:?} is not an IP address"),
                "list at most one IPv4 and one IPv6 address",
            )
        })?;
        if out.iter().any(|o| o.is_ipv6() == ip.is_ipv6()) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.gateway has two addresses of the family of {ip}"),
                "list at most one IPv4 and one IPv6 address",
            ));
        }
        out.push(ip);
    }
    Ok(out)
}

pub(super) enum Ipam<'a> {
    None,
    L2mesh,
    Delegate(&'a str),
}

pub(super) fn ipam_kind(conf: &NetConf) -> Ipam<'_> {
    match conf.ipam.as_ref().map(|i| i.type_.as_str()) {
        None | Some("") => Ipam::None,
        Some("l2mesh") => Ipam::L2mesh,
        Some(other) => Ipam::Delegate(other),
    }
}
