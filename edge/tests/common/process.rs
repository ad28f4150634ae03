//! Edges that must die for real: `gapless-edge` processes against a [`System`]'s Redis.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use gapless_shared::testing::free_port;
use tokio::time::Instant;

use super::System;

/// A `gapless-edge` process, killed (SIGKILL) when dropped.
pub struct EdgeProcess {
    /// The process; `None` once it exited and was reaped.
    pub child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its id in the registry.
    pub edge_id: String,
}

impl EdgeProcess {
    /// Starts an edge process against `sys`'s Redis with `extra` environment settings and
    /// waits until `/readyz` answers. A port taken between `free_port` and the bind makes
    /// the process exit; it is then started again on another port.
    pub async fn start(sys: &System, edge_id: &str, extra: &[(&str, &str)]) -> Self {
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port().expect("a free port")).into();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_gapless-edge"));
            cmd.env("GAPLESS_LISTEN", addr.to_string())
                .env("GAPLESS_REDIS_URL", sys.redis.url())
                .env("GAPLESS_JWT_SECRET", super::SECRET)
                .env("GAPLESS_EDGE_ID", edge_id)
                .env("GAPLESS_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            for (name, value) in extra {
                cmd.env(name, value);
            }
            let mut edge = Self {
                child: Some(cmd.spawn().expect("the gapless-edge binary starts")),
                addr,
                edge_id: edge_id.to_owned(),
            };
            if edge.wait_ready(&sys.http).await {
                return edge;
            }
        }
        panic!("edge process {edge_id} never became ready");
    }

    /// Polls `/readyz` until it answers 200 (true) or the process exits (false).
    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> bool {
        let url = format!("http://{}/readyz", self.addr);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "{url} never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the edge is running").id()
    }

    /// SIGKILL: no drain, no ack flush, no registry leave. Reaps the process.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the edge is running");
        child.kill().expect("SIGKILL is delivered");
        child.wait().expect("the killed edge is reaped");
    }

    /// SIGTERM: the edge drains.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the process to exit, at most `within`; returns its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("the edge is running");
            if let Some(status) = child.try_wait().expect("the edge's status is readable") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "edge {} did not exit within {within:?}",
                self.edge_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Prometheus text of the process.
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics text")
    }

    /// Resident set size of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status is readable");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
