//! A broker running as a child process (the benchmark and the integration
//! tests start the real binary): started, its listen address read from the
//! "broker serving" log line, killed when dropped.

use crate::error::{Error, Result};
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The child and the address it listens on.
#[derive(Debug)]
pub struct BrokerProcess {
    pub child: Child,
    pub addr: String,
}

impl BrokerProcess {
    /// Spawns `cmd` (an `l2mesh-broker ... serve` command logging at info
    /// or more to stderr) and waits up to `timeout` for it to serve.
    pub fn spawn(mut cmd: Command, timeout: Duration) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("cannot run {:?}", cmd.get_program()), e))?;
        let stderr = child.stderr.take();
        // From here the child is killed on every return path.
        let mut proc = Self {
            child,
            addr: String::new(),
        };
        let stderr = stderr.ok_or_else(|| Error::Transport("the broker has no stderr".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stderr after the line, so the child never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if line.contains("broker serving")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(timeout).map_err(|_| {
            Error::Transport(format!("the broker did not start within {timeout:?}"))
        })?;
        proc.addr = listen_addr(&line)
            .ok_or_else(|| Error::Transport(format!("no listen address in {line:?}")))?;
        Ok(proc)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `listen=` field of the "broker serving" log line.
fn listen_addr(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_address_comes_from_the_serving_line() {
        let line = "2026-11-22T01:00:00Z  INFO l2mesh_broker: broker serving listen=127.0.0.1:40123 metrics=127.0.0.1:40124";
        assert_eq!(listen_addr(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(listen_addr("broker serving"), None);
    }
}
