//! The deployment a load scenario or the drill runs against: one the bench started as
//! processes (with process control: kills, restarts, memory), or one it was given by URL
//! ([`DeploymentArgs`]), where what needs the processes is skipped or refused.

use std::time::Duration;

use anyhow::Context;

use crate::fleet::{DeploymentArgs, Fleet, JWT_SECRET};
use crate::producer::Ingest;

/// The system under test.
pub struct Target {
    /// The processes, when the bench started them.
    pub fleet: Option<Fleet>,
    /// The ingest's base URL.
    pub ingest_url: String,
    /// Its API key.
    pub api_key: String,
    /// `ws://host:port/v1/ws` of each edge.
    pub edge_urls: Vec<String>,
    /// The HS256 secret the edges accept.
    pub jwt_secret: String,
    /// The deployment's Redis URL (a cluster's seeds, comma-separated).
    pub redis_url: String,
}

impl Target {
    /// The deployment `args` names, when it names one.
    pub fn given(args: &DeploymentArgs) -> Option<Self> {
        let ingest_url = args.ingest_url.as_ref()?;
        Some(Self {
            fleet: None,
            ingest_url: ingest_url.trim_end_matches('/').to_owned(),
            api_key: args.api_key.clone().unwrap_or_default(),
            edge_urls: args.edge_urls.clone().unwrap_or_default(),
            jwt_secret: args.jwt_secret.clone().unwrap_or_default(),
            redis_url: args.redis.clone().unwrap_or_default(),
        })
    }

    /// The fleet the bench started.
    pub fn started(fleet: Fleet) -> Self {
        Self {
            ingest_url: fleet.ingest_url.clone(),
            api_key: fleet.api_key.clone(),
            edge_urls: fleet.edges.iter().map(|e| e.ws_url.clone()).collect(),
            jwt_secret: JWT_SECRET.to_owned(),
            redis_url: fleet.redis.url(),
            fleet: Some(fleet),
        }
    }

    /// The fleet, or an error saying that `what` needs process control.
    pub fn fleet(&mut self, what: impl std::fmt::Debug) -> anyhow::Result<&mut Fleet> {
        self.fleet
            .as_mut()
            .with_context(|| format!("{what:?} needs process control"))
    }

    /// Pids of the edges the bench started and that are up.
    pub fn edge_pids(&self) -> Vec<u32> {
        self.fleet
            .iter()
            .flat_map(|f| f.edges.iter())
            .filter_map(|e| e.child.as_ref().map(std::process::Child::id))
            .collect()
    }

    /// `host:port` of each edge.
    pub fn edge_addrs(&self) -> anyhow::Result<Vec<String>> {
        self.edge_urls.iter().map(|u| host_port(u)).collect()
    }

    /// A producer's handle on the ingest, every request bounded by `timeout`.
    pub fn ingest(&self, timeout: Duration) -> anyhow::Result<Ingest> {
        Ingest::new(&self.ingest_url, &self.api_key, timeout)
    }
}

/// `ws://host:port/path` -> `host:port`.
fn host_port(url: &str) -> anyhow::Result<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    Ok(rest
        .split('/')
        .next()
        .filter(|h| !h.is_empty())
        .with_context(|| format!("the edge URL {url:?} has no host"))?
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_urls_name_their_host_and_port() {
        assert_eq!(
            host_port("ws://127.0.0.1:8080/v1/ws").ok().as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(host_port("edge:80").ok().as_deref(), Some("edge:80"));
        assert!(host_port("ws:///v1/ws").is_err());
    }
}
