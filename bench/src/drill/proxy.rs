//! A TCP proxy in front of an edge that can blackhole its connections: stop forwarding in
//! both directions without closing anything, as a network that silently drops packets does.
//! Only connections open when the blackhole starts are affected; after it they are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// One proxied connection's switch.
struct Link {
    /// Set while blackholed: the copy loops stop moving bytes.
    holed: AtomicBool,
    /// Cancelled to drop the connection.
    cut: CancellationToken,
}

/// A running proxy.
pub struct Proxy {
    /// `ws://127.0.0.1:<port>/v1/ws` through the proxy.
    pub ws_url: String,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let stop = CancellationToken::new();
        let (l, s) = (links.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = s.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let link = Arc::new(Link {
                    holed: AtomicBool::new(false),
                    cut: s.child_token(),
                });
                {
                    let mut links = l.lock().await;
                    links.retain(|k| !k.cut.is_cancelled());
                    links.push(link.clone());
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::select! {
                        () = pump(cr, uw, link.clone()) => {}
                        () = pump(ur, cw, link.clone()) => {}
                        () = link.cut.cancelled() => {}
                    }
                    link.cut.cancel();
                });
            }
        });
        Ok(Self {
            ws_url: format!("ws://127.0.0.1:{port}/v1/ws"),
            links,
            stop,
        })
    }

    /// Blackholes every open connection for `duration`, then drops them. Returns how many.
    pub async fn blackhole(&self, duration: Duration) -> usize {
        let links: Vec<Arc<Link>> = self.links.lock().await.clone();
        let live: Vec<Arc<Link>> = links
            .into_iter()
            .filter(|l| !l.cut.is_cancelled())
            .collect();
        for link in &live {
            link.holed.store(true, Ordering::SeqCst);
        }
        let n = live.len();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            for link in live {
                link.cut.cancel();
            }
        });
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies bytes one way until EOF or an error; while the link is holed it stops reading,
/// so nothing moves and nothing closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if link.holed.load(Ordering::SeqCst) {
            link.cut.cancelled().await;
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if link.holed.load(Ordering::SeqCst) {
            // Swallowed, as a black hole does.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
