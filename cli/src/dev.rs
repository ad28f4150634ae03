//! `gapless dev`: the whole system on this machine, step by step: a local Redis (or the one
//! given), the migrations, the credentials kept in `--dir`, the ingest and one edge in this
//! process, the instructions once both answer, and a clean stop on Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use gapless_edge::auth::JwtKey;
use gapless_shared::config::{RedisConfig, Secret};
use gapless_shared::process::{ClusterOptions, RedisCluster, RedisOptions, RedisProcess};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::credentials::{self, Credentials};
use crate::migrate_store;

/// Settings of `gapless dev`.
#[derive(Debug, clap::Args)]
pub struct Dev {
    /// Use this Redis instead of starting one (with --cluster: seed URLs of a cluster,
    /// comma-separated).
    #[arg(long, env = "GAPLESS_REDIS_URL")]
    redis: Option<String>,
    /// A Redis Cluster: without --redis, start a local one of three primaries with a
    /// replica each (ports --redis-port.. --redis-port+5, cluster bus ports 10000
    /// above, data under --dir/cluster; started again on the same directory it comes back
    /// as it was).
    #[arg(long)]
    cluster: bool,
    /// Port of the Redis that `dev` starts (the first node's with --cluster).
    #[arg(long, default_value_t = 6390)]
    redis_port: u16,
    /// Directory for the started Redis's data and log.
    #[arg(long, default_value = ".gapless")]
    dir: PathBuf,
    /// Address of the ingest API and the demo page (port 0: any free one, printed).
    #[arg(long, default_value = "127.0.0.1:8081")]
    ingest_listen: SocketAddr,
    /// Address of the edge (port 0: any free one, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    edge_listen: SocketAddr,
    /// API key to accept (default: the one kept in --dir/credentials.json, made at the
    /// first start).
    #[arg(long, env = "GAPLESS_API_KEYS")]
    api_key: Option<String>,
    /// HS256 secret of device tokens (default: the one kept in --dir/credentials.json).
    #[arg(long, env = "GAPLESS_JWT_SECRET")]
    jwt_secret: Option<String>,
    /// Make a new API key, secret and demo tokens instead of those kept in
    /// --dir/credentials.json (the old ones stop working).
    #[arg(long)]
    fresh_credentials: bool,
}

impl Dev {
    /// Runs until Ctrl-C (or SIGTERM), then stops everything and says so.
    pub async fn run(self) -> anyhow::Result<()> {
        let (local, redis_urls) = self.redis()?;
        let redis_config = RedisConfig::from_args(&redis_urls, self.cluster)?;
        let (version, primaries) = migrate_store(&redis_config).await?;
        if self.cluster {
            println!(
                "schema:  version {version} on {} primaries",
                primaries.len()
            );
        } else {
            println!("schema:  version {version}");
        }
        let credentials = credentials::load_or_make(
            &self.dir,
            self.fresh_credentials,
            self.api_key.as_deref(),
            self.jwt_secret.as_deref(),
        )?;
        let shutdown = CancellationToken::new();
        tokio::spawn(gapless_shared::shutdown::cancel_on_signal(shutdown.clone()));
        let mut services = self.start_services(redis_config, &credentials, &shutdown)?;
        services.ready(&shutdown).await?;
        self.print_instructions(&services, &credentials);

        let ingest_result = services.ingest.await.context("ingest task failed")?;
        shutdown.cancel();
        let edge_result = services.edge.await.context("edge task failed")?;
        local.stop().await;
        ingest_result?;
        edge_result?;
        println!(
            "gapless dev stopped: everything is down; data and credentials stay in {}",
            self.dir.display()
        );
        Ok(())
    }

    /// The Redis to use: the one `--redis` names, or one started here (a cluster with
    /// `--cluster`); with its URLs.
    fn redis(&self) -> anyhow::Result<(Local, String)> {
        Ok(match &self.redis {
            Some(urls) => (Local::None, urls.clone()),
            None if self.cluster => {
                let cluster = self.start_cluster()?;
                let urls = cluster.urls();
                (Local::Cluster(cluster), urls)
            }
            None => {
                let process = self.start_redis()?;
                let url = process.url();
                (Local::Single(process), url)
            }
        })
    }

    /// Binds and starts the ingest (with the demo page) and one edge in this process.
    fn start_services(
        &self,
        redis_config: RedisConfig,
        credentials: &Credentials,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Services> {
        let mut ingest_config = gapless_ingest::Config::new(
            redis_config.clone(),
            vec![Secret::new(credentials.api_key.clone())],
        );
        ingest_config.listen = self.ingest_listen;
        ingest_config.demo = true;
        let ingest_listener = gapless_shared::listener::bind(self.ingest_listen)
            .with_context(|| format!("cannot listen on {}", self.ingest_listen))?;
        // The bound address, not the asked one: `--ingest-listen 127.0.0.1:0` picks a port.
        let ingest_addr = reachable(ingest_listener.local_addr()?);
        let ingest = tokio::spawn(gapless_ingest::run(
            ingest_listener,
            ingest_config,
            shutdown.clone(),
        ));

        let mut edge_config = gapless_edge::Config::new(
            redis_config,
            "dev-edge".into(),
            JwtKey::Hs256(Secret::new(credentials.jwt_secret.clone())),
        );
        edge_config.listen = self.edge_listen;
        edge_config.drain_window = std::time::Duration::from_millis(500);
        // The demo page is served by the ingest, so it reaches the edge cross-origin; any
        // origin will do on a development machine (never in production).
        edge_config.cors_origins = vec!["*".into()];
        let edge_listener = gapless_shared::listener::bind(self.edge_listen)
            .with_context(|| format!("cannot listen on {}", self.edge_listen))?;
        let edge_addr = reachable(edge_listener.local_addr()?);
        let edge = tokio::spawn(gapless_edge::run(
            edge_listener,
            edge_config,
            shutdown.clone(),
        ));
        Ok(Services {
            ingest,
            edge,
            ingest_addr,
            edge_addr,
        })
    }

    /// The URLs, the credentials and what to try, printed once both services answer.
    fn print_instructions(&self, services: &Services, credentials: &Credentials) {
        let base = format!("http://{}", services.ingest_addr);
        let edge_base = format!("http://{}", services.edge_addr);
        let ws = format!("ws://{}/v1/ws", services.edge_addr);
        let Credentials {
            api_key,
            jwt_secret,
            token,
            browser_token,
            ..
        } = credentials;
        let demo = format!(
            "{base}/demo#edge={}&user=demo&token={}&key={}",
            fragment_value(&edge_base),
            fragment_value(browser_token),
            fragment_value(api_key),
        );
        println!("ingest:  {base}");
        println!("edge:    {edge_base} (WebSocket {ws})");
        println!("api key: {api_key}");
        println!("jwt secret (HS256): {jwt_secret}");
        println!("token for user `demo`, device `laptop` (valid 30 days): {token}");
        println!(
            "(kept in {}: a restart prints the same ones; --fresh-credentials makes new ones)",
            credentials::path(&self.dir).display()
        );
        println!();
        println!("Demo page (user `demo`, device `browser`; the secrets ride in the #fragment,");
        println!("which the browser never sends to a server):");
        println!("  {demo}");
        println!();
        println!("1. connect (websocat), then type the resume line:");
        println!("  websocat '{ws}?token={token}'");
        println!("  {{\"type\":\"resume\"}}");
        println!("2. send one:");
        println!(
            "  curl -s {base}/v1/notifications -H 'Authorization: Bearer {api_key}' \\\n    \
             -H 'Content-Type: application/json' -d '{{\"user\":\"demo\",\"payload\":{{\"text\":\"hello\"}}}}'"
        );
        println!("3. read them back:");
        println!(
            "  curl -s {base}/v1/users/demo/notifications -H 'Authorization: Bearer {api_key}'"
        );
        println!("4. in your app's code (npm install @gapless/client):");
        println!("  import {{ GaplessClient }} from '@gapless/client';");
        println!("  const client = new GaplessClient({{ url: '{edge_base}', token: '{token}' }});");
        println!("  client.on('notification', (n) => console.log(n.seq, n.payload));");
        println!("  client.start();");
        println!();
        println!("Ctrl-C stops everything (the edge drains first).");
    }
}

/// The ingest and the edge, running in this process.
struct Services {
    ingest: JoinHandle<Result<(), gapless_ingest::RunError>>,
    edge: JoinHandle<Result<(), gapless_edge::RunError>>,
    /// Where a browser or curl on this machine reaches each.
    ingest_addr: SocketAddr,
    edge_addr: SocketAddr,
}

impl Services {
    /// Waits until both answer `/readyz`; a service that stopped meanwhile (bad settings)
    /// says why at once, and stops the other.
    async fn ready(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let (ingest_addr, edge_addr) = (self.ingest_addr, self.edge_addr);
        tokio::select! {
            ready = async {
                wait_ready(ingest_addr).await.context("the ingest did not become ready")?;
                wait_ready(edge_addr).await.context("the edge did not become ready")
            } => ready,
            ended = &mut self.ingest => {
                shutdown.cancel();
                ended.context("ingest task failed")?.context("the ingest stopped")?;
                anyhow::bail!("the ingest stopped");
            }
            ended = &mut self.edge => {
                shutdown.cancel();
                ended.context("edge task failed")?.context("the edge stopped")?;
                anyhow::bail!("the edge stopped");
            }
        }
    }
}

impl Dev {
    /// The single Redis of `dev`: AOF under `--dir/redis`.
    fn start_redis(&self) -> anyhow::Result<RedisProcess> {
        let dir = std::path::absolute(self.dir.join("redis"))?;
        let process = RedisProcess::start(RedisOptions {
            port: self.redis_port,
            dir: dir.clone(),
            appendfsync: "everysec".into(),
            extra: Vec::new(),
        })
        .with_context(|| format!("cannot start redis-server on port {}", self.redis_port))?;
        println!("redis:   {} (AOF in {})", process.url(), dir.display());
        Ok(process)
    }

    /// The local cluster of `dev --cluster`: six nodes from `--redis-port` on, data under
    /// `--dir/cluster`.
    fn start_cluster(&self) -> anyhow::Result<RedisCluster> {
        let first = self.redis_port;
        let ports: Vec<(u16, u16)> = (0..6u16)
            .map(|i| {
                let port = first.checked_add(i)?;
                Some((port, port.checked_add(10_000)?))
            })
            .collect::<Option<_>>()
            .with_context(|| {
                format!("--redis-port {first}: the cluster needs ports up to {first}+5 and bus ports 10000 above them, below 65536")
            })?;
        let dir = std::path::absolute(self.dir.join("cluster"))?;
        println!(
            "redis:   starting a cluster of 3 primaries and 3 replicas on ports {first}-{} (data in {})",
            first + 5,
            dir.display()
        );
        let cluster = tokio::task::block_in_place(|| {
            RedisCluster::start(ClusterOptions {
                ports,
                dir: dir.clone(),
                appendfsync: "everysec".into(),
                node_timeout_ms: 2_000,
            })
        })
        .with_context(|| {
            format!(
                "cannot start the local cluster on ports {first}-{}",
                first + 5
            )
        })?;
        println!("redis:   cluster {}", cluster.urls());
        Ok(cluster)
    }
}

/// The Redis `dev` started, if any.
enum Local {
    None,
    Single(RedisProcess),
    Cluster(RedisCluster),
}

impl Local {
    /// Stops it: a clean `SHUTDOWN` flushes each node's AOF; the kill that follows only
    /// reaps the process.
    async fn stop(self) {
        let urls = match &self {
            Local::None => return,
            Local::Single(process) => vec![process.url()],
            Local::Cluster(cluster) => (0..cluster.len()).map(|i| cluster.node(i).url()).collect(),
        };
        for url in urls {
            if let Ok(client) = redis::Client::open(url)
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
            {
                let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
            }
        }
        match self {
            Local::None => {}
            Local::Single(mut process) => process.kill(),
            Local::Cluster(cluster) => tokio::task::block_in_place(|| drop(cluster)),
        }
    }
}

/// Waits until `GET /readyz` at `addr` answers 200 (Redis reachable, schema current), at
/// most 30 s.
async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = String::from("no answer");
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            stream.take(4096).read_to_end(&mut answer).await?;
            std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(2), attempt).await {
            Ok(Ok(answer)) if answer.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(Ok(answer)) => last = answer.lines().next().unwrap_or_default().to_owned(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 2 s".into(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("/readyz: {last}")
}

/// `addr` as a browser or curl on this machine reaches it: a wildcard bind (`0.0.0.0`, `::`)
/// is reached at the loopback address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `value` percent-encoded for a URL fragment read with `URLSearchParams`: every byte but
/// the unreserved ones of RFC 3986 (so `+`, `&` and `=` survive too).
fn fragment_value(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_values_keep_only_unreserved_bytes() {
        assert_eq!(
            fragment_value("http://127.0.0.1:8080"),
            "http%3A%2F%2F127.0.0.1%3A8080"
        );
        assert_eq!(fragment_value("a+b&c=d é"), "a%2Bb%26c%3Dd%20%C3%A9");
        assert_eq!(fragment_value("eyJ.a-b_c~"), "eyJ.a-b_c~");
    }

    #[test]
    fn wildcard_binds_are_printed_as_loopback() {
        let any: SocketAddr = "0.0.0.0:8081".parse().expect("addr");
        assert_eq!(reachable(any), "127.0.0.1:8081".parse().expect("addr"));
        let any6: SocketAddr = "[::]:8081".parse().expect("addr");
        assert_eq!(reachable(any6), "[::1]:8081".parse().expect("addr"));
        let one: SocketAddr = "192.0.2.1:80".parse().expect("addr");
        assert_eq!(reachable(one), one);
    }
}
