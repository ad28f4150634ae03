//! Planning an append (DESIGN.md §1.1): the items of a request grouped per user, in request
//! order within each user, and packed into Function calls (per shard, about
//! [`MAX_ITEMS_PER_CALL`] items each) or native transactions (never splitting a user).
//! Nothing here talks to Redis.

use std::borrow::Cow;
use std::collections::HashMap;

use gapless_shared::ids::UserId;
use gapless_shared::store::Shard;

/// Most items of one user in one Function call: bounds how long one call holds Redis.
pub const MAX_ITEMS_PER_CALL: usize = 1000;

/// Most users of one transaction: `WATCH` costs Redis time quadratic in the keys one
/// connection watches (each new key is compared with every one already watched): 0.54 ms
/// for 300 keys, 0.26 ms for 192, on redis-server 7.0.
pub const MAX_USERS_PER_TRANSACTION: usize = 32;

/// One notification to append, borrowed from the request body.
#[derive(Debug, Clone)]
pub struct NewNotification<'a> {
    /// Recipient.
    pub user: UserId,
    /// The payload's JSON text, already validated.
    pub payload: &'a str,
    /// Idempotency key, already validated.
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// One Function call (or transaction): segments of item indexes, each segment all of one
/// user, in request order within the user.
pub type Call = Vec<Vec<usize>>;

/// Groups item indexes per user (request order kept within a user) and packs the groups
/// into Function calls ([`pack`]).
#[cfg(test)]
fn plan_calls(items: &[NewNotification<'_>]) -> Vec<Call> {
    plan_calls_by(items, |_| Shard::default())
}

/// [`plan_calls`] with the users' shards given.
#[cfg(test)]
fn plan_calls_by(items: &[NewNotification<'_>], shard_of: impl Fn(&UserId) -> Shard) -> Vec<Call> {
    pack(group_by_user(items), |group| {
        shard_of(&items[group[0]].user)
    })
    .into_iter()
    .map(|(_, call)| call)
    .collect()
}

/// Item indexes per user, users in order of first appearance, items in request order.
pub fn group_by_user(items: &[NewNotification<'_>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_user: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let g = *by_user.entry(item.user.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// Packs user groups into Function calls of about [`MAX_ITEMS_PER_CALL`] items, each call
/// of users of one shard (one slot on a cluster; anything on a single node); a larger group
/// is split over consecutive calls of its shard, which that shard's pipeline runs in order.
///
/// Several users share a call because a call's fixed cost dominates when each user has few
/// items.
pub fn pack(
    groups: Vec<Vec<usize>>,
    shard_of: impl Fn(&Vec<usize>) -> Shard,
) -> Vec<(Shard, Call)> {
    let mut by_shard: Vec<(Shard, Vec<Vec<usize>>)> = Vec::new();
    for group in groups {
        let shard = shard_of(&group);
        match by_shard.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, groups)) => groups.push(group),
            None => by_shard.push((shard, vec![group])),
        }
    }
    let mut calls: Vec<(Shard, Call)> = Vec::new();
    for (shard, groups) in by_shard {
        let mut current: Call = Vec::new();
        let mut current_items = 0;
        for group in groups {
            for segment in group.chunks(MAX_ITEMS_PER_CALL) {
                if current_items > 0 && current_items + segment.len() > MAX_ITEMS_PER_CALL {
                    calls.push((shard, std::mem::take(&mut current)));
                    current_items = 0;
                }
                current_items += segment.len();
                current.push(segment.to_vec());
            }
        }
        if !current.is_empty() {
            calls.push((shard, current));
        }
    }
    calls
}

/// Packs user groups into transactions of about [`MAX_ITEMS_PER_CALL`] items and at most
/// [`MAX_USERS_PER_TRANSACTION`] users, without ever splitting a user: the transactions run
/// concurrently, so a user's items must share one to stay in order.
pub fn pack_whole(groups: Vec<Vec<usize>>) -> Vec<Call> {
    let mut chunks: Vec<Call> = Vec::new();
    let mut current_items = 0;
    for group in groups {
        let full = chunks.last().is_none_or(|c| {
            c.len() == MAX_USERS_PER_TRANSACTION
                || (current_items > 0 && current_items + group.len() > MAX_ITEMS_PER_CALL)
        });
        if full {
            chunks.push(Vec::new());
            current_items = 0;
        }
        current_items += group.len();
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(group);
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapless_shared::keys;

    #[test]
    fn on_a_cluster_a_call_holds_users_of_one_slot_and_each_user_keeps_its_order() {
        let users: Vec<UserId> = (0..40)
            .map(|i| UserId::parse(&format!("user-{i}")).expect("valid"))
            .collect();
        let mut items = Vec::new();
        for round in 0..30 {
            for (u, user) in users.iter().enumerate() {
                if (round + u) % 3 != 0 {
                    items.push(NewNotification {
                        user: user.clone(),
                        payload: "1",
                        idempotency_key: None,
                    });
                }
            }
        }
        let slot = |user: &UserId| Shard::of_key(&keys::meta(user));
        let calls = plan_calls_by(&items, slot);
        for call in &calls {
            let first = slot(&items[call[0][0]].user);
            assert!(
                call.iter()
                    .all(|segment| slot(&items[segment[0]].user) == first),
                "a call spans slots"
            );
        }
        let flat: Vec<usize> = calls.iter().flatten().flatten().copied().collect();
        assert_eq!(flat.len(), items.len(), "each item once");
        for user in &users {
            let order: Vec<usize> = flat
                .iter()
                .copied()
                .filter(|&i| items[i].user == *user)
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "{user:?} in request order"
            );
        }
    }

    #[test]
    fn calls_group_per_user_in_order_and_split_large_groups() {
        let user = |s: &str| UserId::parse(s).expect("valid");
        let mut items = Vec::new();
        for i in 0..(2 * MAX_ITEMS_PER_CALL + 3) {
            items.push(NewNotification {
                user: user(if i % 2 == 0 { "a" } else { "b" }),
                payload: "1",
                idempotency_key: None,
            });
        }
        for name in ["a", "c", "d"] {
            items.push(NewNotification {
                user: user(name),
                payload: "1",
                idempotency_key: None,
            });
        }
        let calls = plan_calls(&items);
        let flat: Vec<usize> = calls.iter().flatten().flatten().copied().collect();
        let mut sorted = flat.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..items.len()).collect::<Vec<_>>(),
            "each item once"
        );
        for call in &calls {
            assert!(call.iter().map(Vec::len).sum::<usize>() <= MAX_ITEMS_PER_CALL);
            for segment in call {
                assert!(
                    segment
                        .iter()
                        .all(|&i| items[i].user == items[segment[0]].user)
                );
            }
        }
        for name in ["a", "b"] {
            let order: Vec<usize> = flat
                .iter()
                .copied()
                .filter(|&i| items[i].user.as_str() == name)
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "{name} keeps request order"
            );
        }
        // a: 1003 items, b: 1001, c and d one each. Segments a1000 | a3 | b1000 | b1 c1 d1:
        // a segment that would overflow the current call starts the next one.
        assert_eq!(calls.len(), 4);
    }

    #[test]
    fn transactions_never_split_a_user_and_bound_users_and_items() {
        // 100 users of 1 item, one user of 2,500, then 40 users of 30.
        let mut groups: Vec<Vec<usize>> = (0..100).map(|i| vec![i]).collect();
        groups.push((100..2600).collect());
        groups.extend((0..40).map(|u| (2600 + 30 * u..2630 + 30 * u).collect()));
        let chunks = pack_whole(groups.clone());
        let flattened: Vec<Vec<usize>> = chunks.iter().flatten().cloned().collect();
        assert_eq!(flattened, groups, "every user whole, in order");
        for chunk in &chunks {
            let items: usize = chunk.iter().map(Vec::len).sum();
            assert!(
                chunk.len() <= MAX_USERS_PER_TRANSACTION,
                "{} users",
                chunk.len()
            );
            assert!(
                items <= MAX_ITEMS_PER_CALL || chunk.len() == 1,
                "{items} items over {} users",
                chunk.len()
            );
        }
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [32, 32, 32, 4, 1, 32, 8]);
    }
}
