//! The credentials `gapless dev` keeps in `<dir>/credentials.json` (mode 0600): the API key,
//! the HS256 secret and the demo tokens, so a restart in the same folder prints the same ones
//! and a page or a script that holds them keeps working. `--fresh-credentials` makes new
//! ones; `--api-key` / `--jwt-secret` given on the command line win and are not written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use gapless_shared::token::mint_hs256;
use serde::{Deserialize, Serialize};

/// How long the demo tokens are valid; a kept token with less than [`RENEW_WITHIN`] left is
/// minted again.
const TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// A kept token this close to its expiry is replaced at the start.
const RENEW_WITHIN: Duration = Duration::from_secs(86_400);

/// What is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The API key the ingest accepts.
    pub api_key: String,
    /// The edge's HS256 secret.
    pub jwt_secret: String,
    /// Token of user `demo`, device `laptop`.
    pub token: String,
    /// Token of user `demo`, device `browser` (the demo page's own device, so it never takes
    /// the place of `laptop`).
    pub browser_token: String,
    /// When the tokens expire, Unix seconds.
    pub tokens_expire: u64,
}

/// The file under `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("credentials.json")
}

/// The kept credentials, or new ones (written) when there are none, they are unreadable, or
/// `fresh`; `api_key` / `jwt_secret` from the command line replace the kept ones for this
/// run only.
pub fn load_or_make(
    dir: &Path,
    fresh: bool,
    api_key: Option<&str>,
    jwt_secret: Option<&str>,
) -> anyhow::Result<Credentials> {
    let file = path(dir);
    let kept = if fresh { None } else { read(&file) };
    let now = gapless_shared::now_ms() / 1000;
    let mut credentials = match kept {
        Some(kept) => kept,
        None => {
            let made = Credentials {
                api_key: format!("dev-{:032x}", rand::random::<u128>()),
                jwt_secret: format!("{:032x}", rand::random::<u128>()),
                token: String::new(),
                browser_token: String::new(),
                tokens_expire: 0,
            };
            renewed(made, now)
        }
    };
    if credentials.tokens_expire < now + RENEW_WITHIN.as_secs() {
        credentials = renewed(credentials, now);
    }
    if api_key.is_none() && jwt_secret.is_none() {
        write(&file, &credentials)?;
    }
    if let Some(key) = api_key {
        credentials.api_key = key.to_owned();
    }
    if let Some(secret) = jwt_secret {
        credentials.jwt_secret = secret.to_owned();
        credentials = renewed(credentials, now);
    }
    Ok(credentials)
}

/// `credentials` with demo tokens minted now from its secret.
fn renewed(mut credentials: Credentials, now: u64) -> Credentials {
    let secret = &credentials.jwt_secret;
    credentials.token = mint_hs256(secret, "demo", Some("laptop"), TOKEN_TTL);
    credentials.browser_token = mint_hs256(secret, "demo", Some("browser"), TOKEN_TTL);
    credentials.tokens_expire = now + TOKEN_TTL.as_secs();
    credentials
}

/// The kept credentials, if the file holds them.
fn read(file: &Path) -> Option<Credentials> {
    let text = std::fs::read_to_string(file).ok()?;
    match serde_json::from_str(&text) {
        Ok(credentials) => Some(credentials),
        Err(e) => {
            eprintln!(
                "{} is not what gapless dev wrote ({e}); making new credentials",
                file.display()
            );
            None
        }
    }
}

/// Writes the file readable by its owner only, through a temporary file and a rename, so a
/// crash never leaves half of it.
fn write(file: &Path, credentials: &Credentials) -> anyhow::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(credentials)?;
    let partial = file.with_extension("json.partial");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&partial, file).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gapless-cred-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_second_start_keeps_what_the_first_made_and_fresh_replaces_it() {
        let dir = temp_dir();
        let first = load_or_make(&dir, false, None, None).expect("made");
        let second = load_or_make(&dir, false, None, None).expect("kept");
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path(&dir))
                .expect("written")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
        }
        let fresh = load_or_make(&dir, true, None, None).expect("fresh");
        assert_ne!(fresh.api_key, first.api_key);
        assert_ne!(fresh.jwt_secret, first.jwt_secret);
        assert_eq!(load_or_make(&dir, false, None, None).expect("kept"), fresh);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flags_win_for_one_run_and_are_not_written() {
        let dir = temp_dir();
        let kept = load_or_make(&dir, false, None, None).expect("made");
        let flagged = load_or_make(&dir, false, Some("k"), Some(&"s".repeat(32))).expect("flags");
        assert_eq!(flagged.api_key, "k");
        assert_ne!(flagged.token, kept.token, "tokens of the given secret");
        assert_eq!(load_or_make(&dir, false, None, None).expect("kept"), kept);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_near_their_expiry_are_minted_again_and_a_bad_file_is_replaced() {
        let dir = temp_dir();
        let mut kept = load_or_make(&dir, false, None, None).expect("made");
        kept.tokens_expire = 1;
        write(&path(&dir), &kept).expect("written");
        let renewed = load_or_make(&dir, false, None, None).expect("renewed");
        assert_eq!(renewed.api_key, kept.api_key);
        assert!(renewed.tokens_expire > gapless_shared::now_ms() / 1000);
        std::fs::write(path(&dir), "not json").expect("written");
        let remade = load_or_make(&dir, false, None, None).expect("remade");
        assert_ne!(remade.api_key, kept.api_key);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
