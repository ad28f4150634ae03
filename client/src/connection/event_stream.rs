//! The `text/event-stream` decoder of the SSE transport: bytes as they arrive, in chunks
//! cut anywhere, to whole events, as the WHATWG HTML standard's "event stream
//! interpretation" reads them (lines end with LF, CRLF or CR; `:` starts a comment; a field
//! without a colon has an empty value; one space after the colon is dropped; `data` lines
//! join with LF; a blank line dispatches; an event without data is not dispatched).
//!
//! Pure logic with no I/O: [`EventStream::feed`] takes a chunk, [`EventStream::next`] hands
//! out the events completed so far, one at a time.

/// Longest line (or unfinished event's data) accepted: a bound on what a broken or hostile
/// stream can make a client hold. Notifications are far smaller (the ingest's limit).
const MAX_LINE: usize = 8 << 20;

/// Buffer capacity kept between chunks; a larger one (after a large event) is released once
/// emptied, so an idle connection holds little.
const KEEP_CAPACITY: usize = 8 << 10;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event` field (`message` when the event named none).
    pub(crate) kind: String,
    /// The `data` lines, joined with LF.
    pub(crate) data: String,
    /// The `id` field of this event, if it had one.
    pub(crate) id: Option<String>,
}

/// Why a stream cannot be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StreamError {
    /// A line or an event longer than [`MAX_LINE`].
    #[error("event stream line or event longer than {MAX_LINE} bytes")]
    TooLong,
    /// A line that is not UTF-8.
    #[error("event stream line is not UTF-8")]
    NotUtf8,
}

/// An event stream being decoded.
#[derive(Debug, Default)]
pub(crate) struct EventStream {
    /// Bytes received and not yet consumed as lines (from `start`).
    buf: Vec<u8>,
    /// First unconsumed byte of `buf`; consumed bytes are dropped at the next `feed`.
    start: usize,
    /// The last line ended with CR: an LF right after it belongs to that line end.
    after_cr: bool,
    /// A line was read: a byte-order mark is only skipped at the start of the stream.
    started: bool,
    /// The `event` field of the event being built.
    kind: Option<String>,
    /// Its `data` lines, each followed by LF.
    data: String,
    /// Its `id` field.
    id: Option<String>,
    /// The last `retry` field (reconnection time, ms).
    retry: Option<u64>,
}

impl EventStream {
    /// Appends a chunk as it arrived.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The last `retry:` value seen, in ms.
    pub(crate) fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// The next complete event, or `None` until more bytes are fed.
    pub(crate) fn next(&mut self) -> Result<Option<SseEvent>, StreamError> {
        loop {
            let rest = &self.buf[self.start..];
            if self.after_cr && !rest.is_empty() {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    self.start += 1;
                    continue;
                }
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if rest.len() > MAX_LINE {
                    return Err(StreamError::TooLong);
                }
                if rest.is_empty() {
                    self.start = 0;
                    if self.buf.capacity() > KEEP_CAPACITY {
                        self.buf = Vec::new();
                    } else {
                        self.buf.clear();
                    }
                }
                return Ok(None);
            };
            self.after_cr = rest[end] == b'\r';
            let mut line = std::str::from_utf8(&rest[..end]).map_err(|_| StreamError::NotUtf8)?;
            self.start += end + 1;
            if !self.started {
                self.started = true;
                line = line.strip_prefix('\u{feff}').unwrap_or(line);
            }
            if line.is_empty() {
                if let Some(event) = dispatch(&mut self.kind, &mut self.data, &mut self.id) {
                    return Ok(Some(event));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "event" => self.kind = Some(value.to_owned()),
                "data" => {
                    if self.data.len() + value.len() > MAX_LINE {
                        return Err(StreamError::TooLong);
                    }
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                // An id with NUL is ignored, as the standard says.
                "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
                "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    self.retry = value.parse().ok();
                }
                _ => {}
            }
        }
    }
}

/// The event built so far, when it has data; the builder is empty afterwards either way.
fn dispatch(
    kind: &mut Option<String>,
    data: &mut String,
    id: &mut Option<String>,
) -> Option<SseEvent> {
    let kind = kind.take();
    let id = id.take();
    if data.is_empty() {
        return None;
    }
    let mut data = std::mem::take(data);
    data.pop(); // the LF after the last data line
    Some(SseEvent {
        kind: kind
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "message".into()),
        data,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of `chunks` fed one after the other.
    fn decode(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut stream = EventStream::default();
        let mut events = Vec::new();
        for chunk in chunks {
            stream.feed(chunk);
            while let Some(e) = stream.next().expect("a valid stream") {
                events.push(e);
            }
        }
        events
    }

    fn event(kind: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            kind: kind.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    const STREAM: &[u8] = b"retry: 2000\n\
        event: welcome\n\
        data: {\"type\":\"welcome\"}\n\
        \n\
        : ping\n\
        event: notification\n\
        id: e1:17\n\
        data: {\"seq\":17}\n\
        \n";

    #[test]
    fn a_whole_stream_decodes_to_its_events_and_retry() {
        let mut stream = EventStream::default();
        stream.feed(STREAM);
        assert_eq!(
            stream.next(),
            Ok(Some(event("welcome", "{\"type\":\"welcome\"}", None)))
        );
        assert_eq!(
            stream.next(),
            Ok(Some(event("notification", "{\"seq\":17}", Some("e1:17"))))
        );
        assert_eq!(stream.next(), Ok(None));
        assert_eq!(stream.retry(), Some(2000));
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_events() {
        let whole = decode(&[STREAM]);
        assert_eq!(whole.len(), 2);
        for at in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(at);
            assert_eq!(decode(&[a, b]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(decode(&bytes), whole, "one byte at a time");
    }

    #[test]
    fn crlf_and_cr_line_ends_count_as_one_line_end() {
        let lf = decode(&[STREAM]);
        let crlf: Vec<u8> = String::from_utf8_lossy(STREAM)
            .replace('\n', "\r\n")
            .into_bytes();
        assert_eq!(decode(&[&crlf]), lf);
        // CR at the end of one chunk, LF at the start of the next: one line end, not two
        // (two would dispatch an event early, or here end one without its data).
        for at in 0..=crlf.len() {
            let (a, b) = crlf.split_at(at);
            assert_eq!(decode(&[a, b]), lf, "CRLF split at {at}");
        }
        let cr: Vec<u8> = String::from_utf8_lossy(STREAM)
            .replace('\n', "\r")
            .into_bytes();
        assert_eq!(decode(&[&cr]), lf);
    }

    #[test]
    fn comments_are_skipped_and_data_lines_join_with_lf() {
        let events = decode(&[b": comment\n:\ndata: a\n: inside\ndata:b\ndata\ndata:  c\n\n"]);
        assert_eq!(events, vec![event("message", "a\nb\n\n c", None)]);
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_reset_the_event_name() {
        let events = decode(&[b"event: x\nid: 1\n\ndata: y\n\n"]);
        assert_eq!(events, vec![event("message", "y", None)]);
        // Only `retry` (as the drain sends before `reconnect`): no event.
        let mut stream = EventStream::default();
        stream.feed(b"retry: 1500\n\nretry: x\nretry: 12a\n\n");
        assert_eq!(stream.next(), Ok(None));
        assert_eq!(stream.retry(), Some(1500));
    }

    #[test]
    fn an_unfinished_event_waits_for_its_blank_line() {
        let mut stream = EventStream::default();
        stream.feed(b"event: reconnect\ndata: {\"delay_ms\":10}\n");
        assert_eq!(stream.next(), Ok(None));
        stream.feed(b"\n");
        assert_eq!(
            stream.next(),
            Ok(Some(event("reconnect", "{\"delay_ms\":10}", None)))
        );
    }

    #[test]
    fn fields_are_read_as_the_standard_says() {
        // No space after the colon, two spaces (one kept), unknown fields, a bare field name,
        // an id with NUL ignored, the byte-order mark at the start skipped.
        let events = decode(&[
            "\u{feff}event:a\nfoo: bar\nid\ndata:  x\n\nid: a\0b\nevent\ndata: y\n\n".as_bytes(),
        ]);
        assert_eq!(
            events,
            vec![event("a", " x", Some("")), event("message", "y", None)]
        );
    }

    #[test]
    fn multibyte_characters_split_across_chunks_decode() {
        let text = "data: h\u{e9}llo \u{1f600}\n\n".as_bytes();
        for at in 0..=text.len() {
            let (a, b) = text.split_at(at);
            assert_eq!(
                decode(&[a, b]),
                vec![event("message", "h\u{e9}llo \u{1f600}", None)]
            );
        }
    }

    #[test]
    fn bad_streams_are_errors() {
        let mut stream = EventStream::default();
        stream.feed(b"data: \xff\n\n");
        assert_eq!(stream.next(), Err(StreamError::NotUtf8));
        let mut stream = EventStream::default();
        stream.feed(&vec![b'x'; MAX_LINE + 1]);
        assert_eq!(stream.next(), Err(StreamError::TooLong));
    }

    #[test]
    fn the_buffer_is_released_once_a_large_event_is_consumed() {
        let mut stream = EventStream::default();
        let big = format!("data: {}\n\n", "x".repeat(100_000));
        stream.feed(big.as_bytes());
        assert_eq!(
            stream.next().map(|e| e.map(|e| e.data.len())),
            Ok(Some(100_000))
        );
        assert_eq!(stream.next(), Ok(None));
        assert!(stream.buf.capacity() <= KEEP_CAPACITY);
    }
}
