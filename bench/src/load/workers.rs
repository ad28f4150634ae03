//! The load-generator processes as the bench drives them: started (`load-worker`, see
//! [`super::worker`] for one from the inside), told over stdin how many connections to
//! hold at each ramp step, their `tick` lines merged into [`super::live::Live`], and
//! watched so a dead one fails the run.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::args::LoadArgs;
use super::live::{Shared, lock};
use super::worker::{self, TickReport};
use crate::target::Target;

/// The ramp's steps: 1K, 2K, 5K, 10K, … below `n`, then `n`.
pub(super) fn ramp_steps(args: &LoadArgs, n: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = match &args.ramp_steps {
        Some(s) => s.iter().copied().filter(|s| *s > 0 && *s < n).collect(),
        None => {
            let mut s = Vec::new();
            let mut base = 1_000;
            while base < n {
                for m in [1, 2, 5] {
                    if base * m < n {
                        s.push(base * m);
                    }
                }
                base *= 10;
            }
            s
        }
    };
    steps.sort_unstable();
    steps.dedup();
    steps.push(n);
    steps
}

/// How many of the devices `from..to` (of `n`) a step of `step` connections opens.
pub(super) fn share(step: usize, n: usize, from: usize, to: usize) -> usize {
    // Each worker opens the same fraction of its range.
    let count = to - from;
    (count * step).div_ceil(n).min(count)
}

/// A load-generator process.
pub(super) struct Worker {
    pub(super) child: tokio::process::Child,
    pub(super) stdin: tokio::process::ChildStdin,
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) n: usize,
    pub(super) name: String,
}

impl Worker {
    /// Starts the `procs` load processes, each with its share of the devices.
    pub(super) fn start_all(
        target: &Target,
        args: &LoadArgs,
        procs: usize,
        live: &Shared,
    ) -> anyhow::Result<Vec<Self>> {
        let n = args.connections;
        let device = format!("bench-{}", std::process::id());
        (0..procs)
            .map(|k| {
                let (from, to) = (n * k / procs, n * (k + 1) / procs);
                Self::start(k, target, from, to - from, args, procs, &device, live)
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        k: usize,
        target: &Target,
        from: usize,
        count: usize,
        args: &LoadArgs,
        procs: usize,
        device: &str,
        live: &Shared,
    ) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("load-worker")
            .arg("--urls")
            .arg(target.edge_urls.join(","))
            .arg("--from")
            .arg(from.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--rate")
            .arg((args.ramp_rate / procs).max(1).to_string())
            .arg("--sources")
            .arg(
                (1..=count.div_ceil(worker::PER_SOURCE).max(1))
                    .map(|m| format!("127.0.{}.{m}", k + 1))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--jwt-secret")
            .arg(&target.jwt_secret)
            .arg("--device")
            .arg(device)
            .arg("--transport")
            .arg(args.transport.arg())
            .envs(
                args.load_threads
                    .map(|t| ("TOKIO_WORKER_THREADS", t.to_string())),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a load-worker process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let live = live.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(json) = line.strip_prefix("tick ") else {
                    continue;
                };
                let Ok(mut tick) = serde_json::from_str::<TickReport>(json) else {
                    continue;
                };
                let hist = std::mem::take(&mut tick.hist);
                let mut live = lock(&live);
                for (us, count) in hist {
                    let us = us.clamp(1, 600_000_000);
                    let _ = live.interval.record_n(us, count);
                    let _ = live.all.record_n(us, count);
                    if live.measuring {
                        let _ = live.phase.record_n(us, count);
                    }
                }
                live.workers[k] = tick;
            }
        });
        Ok(Self {
            child,
            stdin,
            from,
            to: from + count,
            n: args.connections,
            name: format!("load-{k}"),
        })
    }

    /// Asks the worker to hold its share of `step` connections.
    pub(super) async fn open(&mut self, step: usize) -> anyhow::Result<()> {
        let share = share(step, self.n, self.from, self.to);
        self.stdin
            .write_all(format!("open {share}\n").as_bytes())
            .await
            .context("a load worker is gone")?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Fails if the worker exited.
    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("load worker {} exited: {status}", self.name);
        }
        Ok(())
    }
}

/// Sleeps `d`, failing early if a worker dies.
pub(super) async fn sleep_checking(d: Duration, workers: &mut [Worker]) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        for w in workers.iter_mut() {
            w.check()?;
        }
        tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
    }
    Ok(())
}

/// Opens the connections step by step: each step asks every worker for its share, waits
/// until all are open (failing past a deadline or if a worker dies), holds the step, then
/// makes the step's devices `addressable` by the producers.
pub(super) async fn ramp(
    args: &LoadArgs,
    procs: usize,
    workers: &mut [Worker],
    live: &Shared,
    addressable: &Mutex<Vec<std::ops::Range<usize>>>,
) -> anyhow::Result<()> {
    let n = args.connections;
    for step in ramp_steps(args, n) {
        for w in workers.iter_mut() {
            w.open(step).await?;
        }
        let deadline =
            Instant::now() + Duration::from_secs(60 + (step / args.ramp_rate.max(1)) as u64);
        loop {
            let open = lock(live).sum(|w| w.open);
            if open >= step as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {open} of {step} connections open after the ramp deadline");
            }
            for w in workers.iter_mut() {
                w.check()?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lock(live).mark(format!("{step} open"));
        tokio::time::sleep(Duration::from_secs(args.step_hold.max(1))).await;
        let mut a = addressable
            .lock()
            .expect("addressable lock is never poisoned");
        a.clear();
        for k in 0..procs {
            let (from, to) = (n * k / procs, n * (k + 1) / procs);
            a.push(from..from + share(step, n, from, to));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_step() {
        let n = 100_000;
        let procs = 6;
        for step in [1_000, 2_000, 50_000, 100_000] {
            let total: usize = (0..procs)
                .map(|k| share(step, n, n * k / procs, n * (k + 1) / procs))
                .sum();
            assert!(total >= step && total <= step + procs, "{step}: {total}");
        }
    }
}
