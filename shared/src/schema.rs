//! The Redis Function library of `migrations/` and its version bookkeeping at `gl:schema`.
//!
//! `migrations/gapless.lua` holds the current library, its version written inside it (git
//! keeps the earlier ones); applying it replaces whatever version Redis holds (`FUNCTION
//! LOAD REPLACE`, which a cluster connection sends to every primary), then records the
//! number. Services refuse to start against an older version, and check that every primary
//! holds the library: Redis does not copy functions to a primary added later or restarted
//! empty, and a call routed there would fail.

use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::keys;
use crate::store::{Store, StoreError};

/// The current library's source.
pub const LIBRARY: &str = include_str!("../../migrations/gapless.lua");

/// The version this build needs and applies; the library says the same in its header
/// (`-- gapless schema version: N`, checked by a test).
pub const VERSION: u32 = 5;

/// Name of the append function (DESIGN.md §1.1).
pub const FN_APPEND: &str = "gapless_append";
/// Name of the append function that also publishes the wakeups of what it appended, for a
/// single Redis (schema 5).
pub const FN_APPEND_WAKE: &str = "gapless_append_wake";
/// Name of the function recording device ack positions (DESIGN.md §1.4).
pub const FN_ACK: &str = "gapless_ack";
/// Name of the function recording the ack positions of several users in one call, as
/// edges before schema 4 call it.
pub const FN_ACK_USERS: &str = "gapless_ack_users";
/// Name of the function recording the ack positions of several users, stamped with the
/// time, and expiring unused ones (schema 4).
pub const FN_ACK_DEVICES: &str = "gapless_ack_devices";

/// Why the schema is not usable.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Nothing was ever applied to this Redis.
    #[error("Redis holds no gapless schema (gl:schema is missing): run `gapless migrate`")]
    Missing,
    /// An older version is applied.
    #[error(
        "Redis holds gapless schema version {found}, this build needs {need}: run `gapless migrate`"
    )]
    Outdated {
        /// Applied version.
        found: u32,
        /// Needed version.
        need: u32,
    },
    /// `gl:schema` holds something that is not a version.
    #[error("gl:schema holds {0:?}, which is not a schema version")]
    Corrupt(String),
    /// A primary holds no library, or an older one (a node added later, or restarted
    /// without its data).
    #[error(
        "Redis primary {node} holds {}, this build needs version {need}: run `gapless migrate` again",
        found.map_or("no gapless library".to_owned(), |v| format!("gapless library version {v}"))
    )]
    Primary {
        /// The primary's address.
        node: String,
        /// The library version it holds, if any.
        found: Option<u32>,
        /// Needed version.
        need: u32,
    },
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Loads the newest library and records its version. Safe to run repeatedly and concurrently.
pub async fn migrate(conn: &mut impl ConnectionLike) -> Result<u32, StoreError> {
    let version = VERSION;
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<String>(conn)
        .await
        .map_err(StoreError::from_redis)?;
    redis::cmd("SET")
        .arg(keys::SCHEMA)
        .arg(version)
        .query_async::<()>(conn)
        .await
        .map_err(StoreError::from_redis)?;
    Ok(version)
}

/// Checks that the applied version is at least [`VERSION`], and that every primary holds a
/// library of at least that version (by the version line of its code); returns the applied
/// version.
pub async fn check(store: &mut Store, timeout: Duration) -> Result<u32, SchemaError> {
    let found: Option<String> = crate::store::with_timeout(
        timeout,
        redis::cmd("GET").arg(keys::SCHEMA).query_async(store),
    )
    .await?;
    let found = found.ok_or(SchemaError::Missing)?;
    let found: u32 = found.parse().map_err(|_| SchemaError::Corrupt(found))?;
    if found < VERSION {
        return Err(SchemaError::Outdated {
            found,
            need: VERSION,
        });
    }
    if let Store::Cluster(_) = store {
        for primary in store.primaries(timeout).await? {
            let listed: redis::Value = store
                .on_node(
                    &primary,
                    redis::cmd("FUNCTION")
                        .arg("LIST")
                        .arg("LIBRARYNAME")
                        .arg("gapless")
                        .arg("WITHCODE"),
                    timeout,
                )
                .await?;
            let held = library_version(&listed);
            if held.is_none_or(|v| v < VERSION) {
                return Err(SchemaError::Primary {
                    node: primary.addr,
                    found: held,
                    need: VERSION,
                });
            }
        }
    }
    Ok(found)
}

/// The version line (`-- gapless schema version: N`) of the `gapless` library in a
/// `FUNCTION LIST … WITHCODE` answer; `None` when it lists no such library.
fn library_version(listed: &redis::Value) -> Option<u32> {
    let redis::Value::Array(libraries) = listed else {
        return None;
    };
    libraries.iter().find_map(|library| {
        let fields: Vec<(String, redis::Value)> = match library {
            redis::Value::Map(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| Some((redis::from_redis_value_ref(k).ok()?, v.clone())))
                .collect(),
            redis::Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| {
                    Some((
                        redis::from_redis_value_ref(kv.first()?).ok()?,
                        kv.get(1)?.clone(),
                    ))
                })
                .collect(),
            _ => return None,
        };
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let name: String = redis::from_redis_value_ref(field("library_name")?).ok()?;
        if name != "gapless" {
            return None;
        }
        let code: String = redis::from_redis_value_ref(field("library_code")?).ok()?;
        code.lines()
            .find_map(|l| l.strip_prefix("-- gapless schema version: "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_names_itself_its_version_and_its_functions() {
        assert!(LIBRARY.starts_with("#!lua name=gapless\n"));
        assert!(LIBRARY.contains(&format!("\n-- gapless schema version: {VERSION}\n")));
        for function in [
            FN_APPEND,
            FN_APPEND_WAKE,
            FN_ACK,
            FN_ACK_USERS,
            FN_ACK_DEVICES,
        ] {
            assert!(
                LIBRARY.contains(&format!("redis.register_function('{function}'")),
                "{function}"
            );
        }
    }
}
