//! Test harness: real `redis-server` processes on free ports in temporary directories,
//! removed when dropped. Enabled by the `testing` feature, for tests only.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use crate::process::{ProcessError, RedisOptions, RedisProcess};

/// A throwaway Redis with AOF `appendfsync always`; its directory is removed on drop.
#[derive(Debug)]
pub struct TestRedis {
    /// The process (declared first so it is killed before the directory goes).
    process: RedisProcess,
    /// The temporary directory.
    dir: PathBuf,
}

impl TestRedis {
    /// Starts Redis on a free port. Panics with a clear message when it cannot, which is
    /// what a test wants.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts Redis with extra `--name value` settings.
    pub fn start_with(extra: &[(&str, &str)]) -> Self {
        let mut last = None;
        // A free port found by binding :0 can be taken by someone else before Redis binds
        // it; a few attempts make that race harmless.
        for _ in 0..5 {
            let dir = temp_dir();
            let options = RedisOptions {
                port: free_port(),
                dir: dir.clone(),
                appendfsync: "always".into(),
                extra: extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            match RedisProcess::start(options) {
                Ok(process) => return Self { process, dir },
                Err(e @ ProcessError::NotInstalled) => panic!("{e}"),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last = Some(e);
                }
            }
        }
        panic!("cannot start a test redis-server: {last:?}");
    }

    /// A redis-rs client for it.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a harness URL is valid")
    }
}

impl Deref for TestRedis {
    type Target = RedisProcess;
    fn deref(&self) -> &RedisProcess {
        &self.process
    }
}

impl DerefMut for TestRedis {
    fn deref_mut(&mut self) -> &mut RedisProcess {
        &mut self.process
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 works")
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gapless-test-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("the temp directory is writable");
    dir
}
