//! The Redis Function library of `migrations/` and its version bookkeeping at `gl:schema`.
//!
//! Each numbered file in `migrations/` holds the whole library at that version; applying the
//! newest replaces whatever version Redis holds (`FUNCTION LOAD REPLACE`), then records the
//! number. Services refuse to start against an older version.

use redis::aio::ConnectionLike;

use crate::keys;
use crate::store::StoreError;

/// Every migration, oldest first: (version, library source).
pub const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../../migrations/0001_gapless.lua")),
    (2, include_str!("../../migrations/0002_gapless.lua")),
    (3, include_str!("../../migrations/0003_gapless.lua")),
];

/// The version this build needs and applies.
pub const VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Name of the append function (DESIGN.md §1.1).
pub const FN_APPEND: &str = "gapless_append";
/// Name of the function recording device ack positions (DESIGN.md §1.4).
pub const FN_ACK: &str = "gapless_ack";
/// Name of the function recording the ack positions of several users in one call.
pub const FN_ACK_USERS: &str = "gapless_ack_users";

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
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Loads the newest library and records its version. Safe to run repeatedly and concurrently.
pub async fn migrate(conn: &mut impl ConnectionLike) -> Result<u32, StoreError> {
    let (version, source) = MIGRATIONS[MIGRATIONS.len() - 1];
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(source)
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

/// Checks that the applied version is at least [`VERSION`]; returns the applied version.
pub async fn check(conn: &mut impl ConnectionLike) -> Result<u32, SchemaError> {
    let found: Option<String> = redis::cmd("GET")
        .arg(keys::SCHEMA)
        .query_async(conn)
        .await
        .map_err(StoreError::from_redis)?;
    let found = found.ok_or(SchemaError::Missing)?;
    let found: u32 = found.parse().map_err(|_| SchemaError::Corrupt(found))?;
    if found < VERSION {
        return Err(SchemaError::Outdated {
            found,
            need: VERSION,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_name_the_library() {
        for (i, (version, source)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(source.starts_with("#!lua name=gapless\n"));
            assert!(source.contains(FN_APPEND));
            assert!(source.contains(FN_ACK));
        }
    }
}
