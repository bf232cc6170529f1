//! The admin subcommands: `token`, `network`, `cluster`. Tables for humans,
//! `-o json` for scripts.

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use l2mesh_broker::client::admin_client;
use l2mesh_broker::pki::AdminCredential;
use l2mesh_proto::broker as pb;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Flags shared by every admin subcommand.
#[derive(Debug, Args)]
pub struct AdminArgs<T: Subcommand> {
    /// Broker gRPC address, `host:port`; for replicas on etcd several,
    /// comma-separated: the first that answers is used.
    #[arg(
        long,
        env = "L2MESH_BROKER",
        default_value = "127.0.0.1:7443",
        global = true
    )]
    broker: String,
    /// Admin credential file [default: <data-dir>/admin.pem].
    #[arg(long, env = "L2MESH_ADMIN_CREDENTIAL", global = true)]
    admin_credential: Option<PathBuf>,
    /// Output format.
    #[arg(
        short,
        long,
        value_enum,
        default_value = "table",
        env = "L2MESH_OUTPUT",
        global = true
    )]
    output: Output,
    #[command(subcommand)]
    cmd: T,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token and print its join string.
    Create {
        /// The only cluster name the token may join as.
        #[arg(long, env = "L2MESH_TOKEN_CLUSTER")]
        cluster: String,
        /// Lifetime, e.g. 1h, 30m, 2d [default: the broker's --token-ttl].
        #[arg(long, env = "L2MESH_TOKEN_CREATE_TTL", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many joins the token allows.
        #[arg(long, env = "L2MESH_TOKEN_USES", default_value_t = 1)]
        uses: u32,
    },
    /// List tokens (never shows secrets).
    List,
    /// Revoke a token by id.
    Revoke {
        /// Token id, as shown by `token list`.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Declare a multi-cluster network.
    Create {
        /// Network name (what L2Networks of multi-cluster scope refer to).
        name: String,
        /// VNI (4096..=16777215) or `auto`.
        #[arg(long, env = "L2MESH_NETWORK_VNI", default_value = "auto")]
        vni: String,
        /// MTU of pod interfaces [default: 1390].
        #[arg(long, env = "L2MESH_NETWORK_MTU")]
        mtu: Option<u32>,
        /// IP range split between member clusters, e.g. 10.10.0.0/16.
        #[arg(long, env = "L2MESH_NETWORK_CIDR")]
        cidr: Option<String>,
        /// A cluster allowed to join (repeatable).
        #[arg(
            long = "allow",
            env = "L2MESH_NETWORK_ALLOW",
            value_delimiter = ',',
            required_unless_present = "allow_all"
        )]
        allow: Vec<String>,
        /// Allow every cluster.
        #[arg(long, env = "L2MESH_NETWORK_ALLOW_ALL")]
        allow_all: bool,
    },
    /// List networks.
    List,
    /// Delete a network (its members drop it from their views).
    Delete {
        /// Network name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// List clusters.
    List,
    /// Remove a cluster: its certificate stops working and its streams close.
    Remove {
        /// Cluster name.
        name: String,
    },
}

/// `30`, `90s`, `30m`, `1h`, `2d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86400),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 1h or 2d"))?;
    if n == 0 {
        return Err("a duration must be more than 0".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

async fn client(
    data_dir: &Path,
    broker: &str,
    cred: Option<&PathBuf>,
) -> Result<pb::broker_admin_client::BrokerAdminClient<tonic::transport::Channel>> {
    let path = cred.cloned().unwrap_or_else(|| data_dir.join("admin.pem"));
    let cred = AdminCredential::load(&path).with_context(|| {
        format!(
            "cannot use the admin credential {} (set --admin-credential)",
            path.display()
        )
    })?;
    let addrs: Vec<String> = broker
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(admin_client(&addrs, &cred).await?)
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

/// `2026-01-02 03:04:05Z` from unix seconds.
fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let days = unix.div_euclid(86400);
    let secs = unix.rem_euclid(86400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Print a listing as a table (with `header`) or as a JSON array.
fn print_list<T>(
    output: Output,
    header: &[&str],
    items: &[T],
    json: fn(&T) -> Value,
    row: fn(&T) -> Vec<String>,
) {
    match output {
        Output::Json => println!("{}", Value::Array(items.iter().map(json).collect())),
        Output::Table => table(header, &items.iter().map(row).collect::<Vec<_>>()),
    }
}

/// Print one item as a one-row table or as a JSON object.
fn print_one<T>(
    output: Output,
    header: &[&str],
    item: &T,
    json: fn(&T) -> Value,
    row: fn(&T) -> Vec<String>,
) {
    match output {
        Output::Json => println!("{}", json(item)),
        Output::Table => table(header, &[row(item)]),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn token_json(t: &pb::TokenInfo) -> Value {
    json!({"id": t.id, "cluster": t.cluster, "created_unix": t.created_unix,
           "expires_unix": t.expires_unix, "uses_total": t.uses_total,
           "uses_left": t.uses_left, "revoked": t.revoked})
}

fn token_row(t: &pb::TokenInfo) -> Vec<String> {
    vec![
        t.id.clone(),
        t.cluster.clone(),
        format!("{}/{}", t.uses_left, t.uses_total),
        time(t.expires_unix),
        if t.revoked { "revoked" } else { "" }.into(),
    ]
}

const TOKEN_HEADER: &[&str] = &["ID", "CLUSTER", "USES LEFT", "EXPIRES", "STATE"];

pub async fn token(data_dir: &Path, a: AdminArgs<TokenCmd>) -> Result<()> {
    let mut c = client(data_dir, &a.broker, a.admin_credential.as_ref()).await?;
    match a.cmd {
        TokenCmd::Create { cluster, ttl, uses } => {
            let r = c
                .create_token(pb::CreateTokenRequest {
                    cluster,
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
                    uses,
                })
                .await
                .map_err(status)?
                .into_inner();
            let info = r.token.unwrap_or_default();
            match a.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "token": token_json(&info),
                        "join_string": r.join_string,
                        "helm_install": helm_install_line(&r.join_string),
                    })
                ),
                Output::Table => {
                    eprintln!(
                        "token {} for cluster {} ({} use(s), expires {}); hand this join string to that cluster:",
                        info.id,
                        info.cluster,
                        info.uses_total,
                        time(info.expires_unix)
                    );
                    println!("{}", r.join_string);
                    // stdout stays the join string alone, for scripts.
                    eprintln!(
                        "in that cluster, from a checkout of l2mesh:\n  {}",
                        helm_install_line(&r.join_string)
                    );
                }
            }
        }
        TokenCmd::List => {
            let mut tokens = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_tokens(pb::ListTokensRequest {
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                tokens.extend(r.tokens);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            print_list(a.output, TOKEN_HEADER, &tokens, token_json, token_row);
        }
        TokenCmd::Revoke { id } => {
            let t = c
                .revoke_token(pb::RevokeTokenRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            print_one(a.output, TOKEN_HEADER, &t, token_json, token_row);
        }
    }
    Ok(())
}

fn network_json(n: &pb::NetworkInfo) -> Value {
    json!({"name": n.name, "vni": n.vni, "mtu": n.mtu, "cidr": n.cidr,
           "allowed_clusters": n.allowed_clusters, "allow_all": n.allow_all,
           "members": n.members, "created_unix": n.created_unix})
}

fn network_row(n: &pb::NetworkInfo) -> Vec<String> {
    vec![
        n.name.clone(),
        n.vni.to_string(),
        n.mtu.to_string(),
        if n.cidr.is_empty() {
            "-".into()
        } else {
            n.cidr.clone()
        },
        if n.allow_all {
            "*".into()
        } else {
            n.allowed_clusters.join(",")
        },
        n.members.join(","),
    ]
}

const NETWORK_HEADER: &[&str] = &["NAME", "VNI", "MTU", "CIDR", "ALLOWED", "MEMBERS"];

pub async fn network(data_dir: &Path, a: AdminArgs<NetworkCmd>) -> Result<()> {
    if let NetworkCmd::Create { vni, .. } = &a.cmd
        && vni != "auto"
        && vni.parse::<u32>().is_err()
    {
        bail!("--vni must be a number (4096..=16777215) or `auto`, not {vni:?}");
    }
    let mut c = client(data_dir, &a.broker, a.admin_credential.as_ref()).await?;
    let one = match a.cmd {
        NetworkCmd::Create {
            name,
            vni,
            mtu,
            cidr,
            allow,
            allow_all,
        } => c
            .create_network(pb::CreateNetworkRequest {
                name,
                vni: if vni == "auto" {
                    0
                } else {
                    vni.parse().unwrap_or(0)
                },
                mtu: mtu.unwrap_or(0),
                cidr: cidr.unwrap_or_default(),
                allowed_clusters: allow,
                allow_all,
            })
            .await
            .map_err(status)?
            .into_inner(),
        NetworkCmd::Delete { name } => c
            .delete_network(pb::DeleteNetworkRequest { name })
            .await
            .map_err(status)?
            .into_inner(),
        NetworkCmd::List => {
            let mut networks = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_networks(pb::ListNetworksRequest {
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                networks.extend(r.networks);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            print_list(
                a.output,
                NETWORK_HEADER,
                &networks,
                network_json,
                network_row,
            );
            return Ok(());
        }
    };
    print_one(a.output, NETWORK_HEADER, &one, network_json, network_row);
    Ok(())
}

fn cluster_json(c: &pb::ClusterInfo) -> Value {
    json!({"name": c.name, "tunnel_subnet": c.tunnel_subnet, "joined_unix": c.joined_unix,
           "last_seen_unix": c.last_seen_unix, "connected": c.connected, "networks": c.networks,
           "gateways": c.gateways.iter().map(|g| json!({"node": g.node,
                "public_key": b64(&g.public_key), "endpoints": g.endpoints,
                "tunnel_ip": g.tunnel_ip})).collect::<Vec<_>>(),
           "links": c.links.iter().map(|l| json!({"peer_cluster": l.peer_cluster,
                "peer_public_key": b64(&l.peer_public_key), "up": l.up,
                "last_handshake_age_ms": l.last_handshake_age_ms,
                "rx_bytes": l.rx_bytes, "tx_bytes": l.tx_bytes})).collect::<Vec<_>>()})
}

fn cluster_row(c: &pb::ClusterInfo) -> Vec<String> {
    vec![
        c.name.clone(),
        c.tunnel_subnet.clone(),
        c.gateways
            .iter()
            .map(|g| g.node.clone())
            .collect::<Vec<_>>()
            .join(","),
        c.gateways
            .iter()
            .flat_map(|g| g.endpoints.clone())
            .collect::<Vec<_>>()
            .join(","),
        if c.connected {
            "yes".into()
        } else {
            "no".into()
        },
        time(c.last_seen_unix),
        c.networks.join(","),
    ]
}

const CLUSTER_HEADER: &[&str] = &[
    "NAME",
    "TUNNEL SUBNET",
    "GATEWAYS",
    "ENDPOINTS",
    "CONNECTED",
    "LAST SEEN",
    "NETWORKS",
];

pub async fn cluster(data_dir: &Path, a: AdminArgs<ClusterCmd>) -> Result<()> {
    let mut c = client(data_dir, &a.broker, a.admin_credential.as_ref()).await?;
    match a.cmd {
        ClusterCmd::List => {
            let mut clusters = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_clusters(pb::ListClustersRequest {
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                clusters.extend(r.clusters);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            print_list(
                a.output,
                CLUSTER_HEADER,
                &clusters,
                cluster_json,
                cluster_row,
            );
        }
        ClusterCmd::Remove { name } => {
            let r = c
                .remove_cluster(pb::RemoveClusterRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            print_one(a.output, CLUSTER_HEADER, &r, cluster_json, cluster_row);
        }
    }
    Ok(())
}

/// The command that installs the cluster side with this join string (the
/// chart in `deploy/helm/l2mesh`, in its own namespace).
pub fn helm_install_line(join_string: &str) -> String {
    format!(
        "helm install l2mesh deploy/helm/l2mesh --namespace l2mesh-system --create-namespace --set-string joinString='{join_string}'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_create_names_the_helm_install_of_the_cluster_side() {
        let line = helm_install_line("l2mesh1.abc");
        assert!(
            line.starts_with("helm install l2mesh deploy/helm/l2mesh "),
            "{line}"
        );
        assert!(
            line.contains("--namespace l2mesh-system --create-namespace"),
            "{line}"
        );
        assert!(
            line.ends_with("--set-string joinString='l2mesh1.abc'"),
            "{line}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0m").is_err());
    }

    #[test]
    fn times_format() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
