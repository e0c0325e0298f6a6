//! Reading a `text/event-stream` as EventSource does, for msgbench's SSE subscribers
//! (`GET /v1/events`, docs/TRANSPORTS.md).
//!
//! No I/O here: the subscriber feeds [`EventParser`] the response body's chunks as
//! they arrive, wherever hyper cut them, and gets back the events they completed.
//! The rules are the HTML standard's ("Interpreting an event stream") minus what a
//! benchmark does not need: `retry:` is ignored (the subscriber reconnects at once).

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `message` unless an `event:` field named another type.
    pub kind: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// The last event id when the event was dispatched (an `id:` field sets it and
    /// it carries over to later events, as EventSource's `lastEventId` does).
    pub id: Option<String>,
}

/// The state between two chunks of one stream.
#[derive(Debug, Default)]
pub struct EventParser {
    /// The start of a line the previous chunk did not finish.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` first in the next belongs to it.
    after_cr: bool,
    /// The event being read: its `event:` field and its `data:` lines so far.
    kind: String,
    data: String,
    /// The last `id:` field read (EventSource's last event id buffer): survives
    /// dispatch. Empty: none.
    id_buffer: String,
    /// The id buffer as of the last blank line (EventSource's last event id string):
    /// what a reconnect sends as `Last-Event-ID`. Not the buffer itself, which may
    /// name an event whose data never arrived.
    last_id: String,
}

impl EventParser {
    /// Reads `bytes`, the next piece of the stream, and appends to `out` every event
    /// it completed.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Event>) {
        if std::mem::take(&mut self.after_cr) && bytes.first() == Some(&b'\n') {
            bytes = &bytes[1..];
        }
        // A line ends with `\r\n`, `\n` or `\r`.
        while let Some(at) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.is_empty() {
                self.line_read(&bytes[..at], out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..at]);
                self.line_read(&line, out);
                // Keep the allocation for the next unfinished line.
                line.clear();
                self.line = line;
            }
            let cr = bytes[at] == b'\r';
            bytes = &bytes[at + 1..];
            if cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(bytes);
    }

    /// The id a reconnect resumes after (`Last-Event-ID`), if the stream gave one.
    pub fn last_event_id(&self) -> Option<&str> {
        (!self.last_id.is_empty()).then_some(self.last_id.as_str())
    }

    /// A new connection begins: what the old one left unfinished is dropped (an
    /// event without its closing blank line never happened, its `id:` included);
    /// the last id stays.
    pub fn restart(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.kind.clear();
        self.data.clear();
        self.id_buffer.clone_from(&self.last_id);
    }

    fn line_read(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            // A comment: `: heartbeat`.
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.kind = value.into_owned(),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"id" if !value.contains('\0') => self.id_buffer = value.into_owned(),
            // `retry` and fields the standard does not know.
            _ => {}
        }
    }

    /// A blank line: the event read so far is complete, unless it had no data.
    fn dispatch(&mut self, out: &mut Vec<Event>) {
        self.last_id.clone_from(&self.id_buffer);
        let kind = std::mem::take(&mut self.kind);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        out.push(Event {
            kind: if kind.is_empty() {
                "message".to_owned()
            } else {
                kind
            },
            data,
            id: self.last_event_id().map(str::to_owned),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> (Vec<Event>, EventParser) {
        let mut parser = EventParser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        (out, parser)
    }

    fn event(kind: &str, data: &str, id: Option<&str>) -> Event {
        Event {
            kind: kind.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    #[test]
    fn micromsg_stream_gives_one_message_event_per_id() {
        let stream = b"retry: 2000\n\nid: 17\nevent: message\ndata: {\"seq\":1}\n\n: heartbeat\n\n\
                       id: 18\nevent: message\ndata: {\"seq\":2}\n\n";
        let (out, parser) = events(&[stream]);
        assert_eq!(
            out,
            vec![
                event("message", r#"{"seq":1}"#, Some("17")),
                event("message", r#"{"seq":2}"#, Some("18")),
            ]
        );
        assert_eq!(parser.last_event_id(), Some("18"));
    }

    #[test]
    fn an_event_cut_anywhere_between_chunks_reads_the_same() {
        let stream: &[u8] = b"id: 5\r\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n";
        let whole = events(&[stream]).0;
        assert_eq!(whole, vec![event("message", "{\"a\":\n1}", Some("5"))]);
        for cut in 1..stream.len() {
            let (head, tail) = stream.split_at(cut);
            assert_eq!(events(&[head, tail]).0, whole, "cut at {cut}");
        }
        // Byte by byte, and with bare `\r` line ends.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes).0, whole);
        assert_eq!(
            events(&[b"data: x\r\r"]).0,
            vec![event("message", "x", None)]
        );
    }

    #[test]
    fn an_error_event_ends_with_its_json_body_and_events_without_data_are_skipped() {
        let stream = b"event: error\ndata: {\"error\":true,\"exception_id\":\"Kicked\"}\n\n\
                       event: nothing\n\nid: 3\n\ndata\n\n";
        let (out, _) = events(&[stream]);
        assert_eq!(
            out,
            vec![
                event("error", r#"{"error":true,"exception_id":"Kicked"}"#, None),
                // `data` alone is an empty data line; `id: 3` carried over.
                event("message", "", Some("3")),
            ]
        );
    }

    #[test]
    fn a_restart_drops_the_unfinished_event_and_resumes_after_the_last_one_dispatched() {
        // Message 10's id line arrived, its data and blank line did not: resuming
        // after 10 would acknowledge a message never received.
        let (out, mut parser) = events(&[b"id: 9\ndata: a\n\nid: 10\ndata: b"]);
        assert_eq!(out.len(), 1);
        assert_eq!(parser.last_event_id(), Some("9"));
        parser.restart();
        assert_eq!(parser.last_event_id(), Some("9"));
        let mut out = Vec::new();
        parser.feed(b"\n\ndata: c\n\n", &mut out);
        assert_eq!(out, vec![event("message", "c", Some("9"))]);
    }
}
