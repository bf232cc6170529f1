//! A real etcd cluster on loopback for the etcd store's tests: members on
//! free ports, data in a temp dir, every member killed on drop (even when
//! the test panics).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd server binary (Debian's etcd-server).
pub const ETCD: &str = "etcd";

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    _tmp: tempfile::TempDir,
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Whether etcd can run here: skip the test (`None`) when not, or fail
/// loudly when `CI` is set.
pub fn available() -> bool {
    if on_path(ETCD) {
        return true;
    }
    let msg = "skipping: the etcd server (Debian package etcd-server) is not on PATH";
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false") {
        panic!("{msg} (CI is set, so this is a failure)");
    }
    eprintln!("{msg}");
    false
}

/// Ports that were free a moment ago (bound to port 0, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdCluster {
    /// Start `n` members and wait until the cluster serves writes. `None`
    /// when etcd is not installed (and `CI` is not set).
    pub async fn start(n: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                data: tmp.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            members,
            initial,
            _tmp: tmp,
        };
        for i in 0..n {
            c.spawn(i, "new");
        }
        c.wait_writable(Duration::from_secs(30)).await;
        Some(c)
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial.clone();
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(ETCD)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "l2mesh-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--max-txn-ops", "100000"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start etcd");
        m.child = Some(child);
    }

    /// `etcd://` store address of every member.
    pub fn store(&self) -> String {
        format!(
            "etcd://{}",
            self.members
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.client))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// Client address of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client)
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i, "existing");
    }

    /// Wait until a write through any member commits.
    pub async fn wait_writable(&self, within: Duration) {
        let store =
            l2mesh_broker::store::EtcdStore::connect(l2mesh_broker::store::EtcdConfig::new(
                self.members
                    .iter()
                    .map(|m| format!("127.0.0.1:{}", m.client))
                    .collect(),
            ))
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            if store.probe().await {
                return;
            }
            assert!(
                start.elapsed() < within,
                "etcd did not become ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
