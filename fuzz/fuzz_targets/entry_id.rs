//! Stream entry ids and ack positions, as the edge reads them back from Redis (`XRANGE`
//! answers, the acks hash).
//!
//! Property: `parse_entry_id` and `entry_ts` never panic; an id they accept has the shape
//! `<u64>-<u64>` and gives back its parts; `entry_id(seq)` parses back to `seq` and carries
//! no time; `parse_position` reads the epoch before the first colon and the seq after it.
#![no_main]

use gapless_edge::reader::parse_position;
use gapless_shared::keys::{entry_id, entry_ts, parse_entry_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let seq = parse_entry_id(s);
    let ts = entry_ts(s);
    let parts = s.split_once('-');
    if let Some(seq) = seq {
        let (a, b) = parts.expect("an accepted id has a dash");
        assert_eq!(a.parse::<u64>().ok(), Some(seq));
        let ms = b
            .parse::<u64>()
            .expect("an accepted id has a numeric time part");
        assert_eq!(ts, (ms > 0).then_some(ms), "entry_ts({s:?})");
        let id = entry_id(seq);
        assert_eq!(parse_entry_id(&id), Some(seq), "entry_id({seq}) = {id:?}");
        assert_eq!(entry_ts(&id), None);
    }
    if let Some(ms) = ts {
        assert!(ms > 0);
        assert_eq!(parts.map(|(_, b)| b.parse::<u64>().ok()), Some(Some(ms)));
    }
    if let Some((epoch, n)) = parse_position(s) {
        // `<epoch>:<seq>`, or (schema 4) `<epoch>:<seq>:<more>`: the seq is the field between
        // the first colon and the next one (or the end).
        let (e, rest) = s.split_once(':').expect("an accepted position has a colon");
        assert_eq!(epoch, e);
        let field = rest.split_once(':').map_or(rest, |(seq, _)| seq);
        assert_eq!(field.parse::<u64>().ok(), Some(n), "parse_position({s:?})");
        assert_eq!(parse_position(&format!("{epoch}:{n}")), Some((epoch, n)));
    }
});
