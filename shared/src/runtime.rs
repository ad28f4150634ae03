//! The process's async runtime: how many threads run a server's tasks.
//!
//! Each notification crosses several tasks in each process (HTTP handler, Redis connection,
//! publish; subscription, session, socket writer, ack flush). On a multi-thread runtime a
//! task woken by another often runs on the other worker, and each such hand-over costs a
//! futex wake and a context switch: with two workers on a two-core machine that is about a
//! quarter of the ingest's and the edge's CPU per notification (BENCHMARKS.md, "Where a
//! notification's CPU goes"). One thread runs every task on the main thread (a current-thread
//! runtime) and pays none of it, but uses one core at most.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The process settings (runtime threads, log format) as flags, `GAPLESS_*` variables and
/// config file keys; flattened into each server's arguments.
#[derive(Debug, Default, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeArgs {
    /// Threads running the server's tasks; 1 runs them all on the main thread and uses at
    /// most one core [default: one per CPU core, or TOKIO_WORKER_THREADS].
    #[arg(long, env = "GAPLESS_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// How log lines are written: `text` (coloured only on a terminal) or `json` (one object
    /// per line) [default: text].
    #[arg(long, env = "GAPLESS_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::telemetry::LogFormat>,
}

impl RuntimeArgs {
    /// Each setting from `self`, else from `other` (the config file).
    pub fn or(self, other: RuntimeArgs) -> RuntimeArgs {
        RuntimeArgs {
            worker_threads: self.worker_threads.or(other.worker_threads),
            log_format: self.log_format.or(other.log_format),
        }
    }

    /// Builds the runtime: a current-thread one for one thread, else a multi-thread one.
    pub fn build(&self) -> io::Result<tokio::runtime::Runtime> {
        match self.worker_threads {
            Some(0) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--worker-threads must be at least 1",
            )),
            Some(1) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Some(n) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
            None => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
    }
}

/// The body of a server's `main`: builds the runtime `args` ask for, binds `listen`, and runs
/// `serve` on the listener with a token that SIGINT or SIGTERM cancels.
pub fn serve<F, Fut, E>(args: &RuntimeArgs, listen: SocketAddr, serve: F) -> Result<(), E>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<io::Error>,
{
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let runtime = args
        .build()
        .map_err(context("cannot start the async runtime".to_owned()))?;
    runtime.block_on(async move {
        let listener =
            crate::listener::bind(listen).map_err(context(format!("cannot listen on {listen}")))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::shutdown::cancel_on_signal(shutdown.clone()));
        serve(listener, shutdown).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_threads_is_refused_and_one_is_a_current_thread_runtime() {
        let zero = RuntimeArgs {
            worker_threads: Some(0),
            log_format: None,
        };
        assert!(zero.build().is_err());
        let one = RuntimeArgs {
            worker_threads: Some(1),
            log_format: None,
        }
        .build()
        .expect("builds");
        assert_eq!(
            one.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let two = RuntimeArgs {
            worker_threads: Some(2),
            log_format: None,
        }
        .build()
        .expect("builds");
        assert_eq!(two.metrics().num_workers(), 2);
    }
}
