//! STOMP 1.2 frames: an incremental decoder (a WebSocket message may hold several frames,
//! or part of one) and the encoder, with the header escaping of the specification
//! (<https://stomp.github.io/stomp-specification-1.2.html#Value_Encoding>).

use std::fmt;

/// One STOMP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    /// In order; repeated headers are kept, and the first one counts.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the decoder read: a frame or a heart-beat (a lone end of line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    HeartBeat,
    Frame(Frame),
}

/// Why bytes are not a STOMP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

/// `CONNECT` and `CONNECTED` frames are not escaped (for STOMP 1.0 compatibility).
fn escaped(command: &str) -> bool {
    !matches!(command, "CONNECT" | "CONNECTED")
}

impl Frame {
    pub fn new(command: &str) -> Self {
        Self { command: command.to_owned(), headers: Vec::new(), body: Vec::new() }
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    #[must_use]
    pub fn body(mut self, content_type: &str, body: Vec<u8>) -> Self {
        self.headers.push(("content-type".to_owned(), content_type.to_owned()));
        self.headers.push(("content-length".to_owned(), body.len().to_string()));
        self.body = body;
        self
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The frame on the wire, NUL-terminated.
    pub fn encode(&self) -> Vec<u8> {
        let escape = escaped(&self.command);
        let mut out = Vec::with_capacity(self.command.len() + 64 + self.body.len());
        out.extend_from_slice(self.command.as_bytes());
        out.push(b'\n');
        for (name, value) in &self.headers {
            for (i, part) in [name, value].into_iter().enumerate() {
                if i == 1 {
                    out.push(b':');
                }
                for c in part.bytes() {
                    match (escape, c) {
                        (true, b'\\') => out.extend_from_slice(b"\\\\"),
                        (true, b'\n') => out.extend_from_slice(b"\\n"),
                        (true, b'\r') => out.extend_from_slice(b"\\r"),
                        (true, b':') => out.extend_from_slice(b"\\c"),
                        // Unescaped frames cannot carry these at all.
                        (false, b'\n' | b'\r') => out.push(b' '),
                        _ => out.push(c),
                    }
                }
            }
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out.push(0);
        out
    }
}

fn unescape(raw: &str, escape: bool) -> Result<String, FrameError> {
    if !escape || !raw.contains('\\') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('c') => ':',
            other => {
                return Err(FrameError(format!(
                    "undefined escape sequence \\{} in header {raw:?}",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        });
    }
    Ok(out)
}

/// Reads frames from bytes as they arrive.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_frame: usize,
}

impl Decoder {
    pub fn new(max_frame: usize) -> Self {
        Self { buf: Vec::new(), max_frame }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete item, `None` until more bytes arrive. After an error the
    /// connection must be closed: the stream cannot be resynchronised.
    pub fn next_item(&mut self) -> Result<Option<Item>, FrameError> {
        // End-of-lines between frames are heart-beats.
        if self.buf.first() == Some(&b'\n') {
            self.buf.drain(..1);
            return Ok(Some(Item::HeartBeat));
        }
        if self.buf.starts_with(b"\r\n") {
            self.buf.drain(..2);
            return Ok(Some(Item::HeartBeat));
        }
        if self.buf.len() == 1 && self.buf[0] == b'\r' {
            return Ok(None);
        }
        let Some(head_end) = find(&self.buf, b"\n\n")
            .map(|i| (i, i + 2))
            .into_iter()
            .chain(find(&self.buf, b"\n\r\n").map(|i| (i, i + 3)))
            .min_by_key(|(i, _)| *i)
        else {
            return self.too_large(self.buf.len()).map(|()| None);
        };
        let (head_len, body_start) = head_end;
        let head = std::str::from_utf8(&self.buf[..head_len])
            .map_err(|_| FrameError("frame command and headers must be UTF-8".into()))?;
        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let command = lines.next().unwrap_or_default().to_owned();
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(FrameError(format!("{command:?} is not a STOMP command")));
        }
        let escape = escaped(&command);
        let mut headers = Vec::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(FrameError(format!("header line {line:?} has no colon")));
            };
            headers.push((unescape(name, escape)?, unescape(value, escape)?));
        }
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| {
                v.trim().parse::<usize>().map_err(|_| FrameError(format!("content-length {v:?} is not a number")))
            })
            .transpose()?;
        let (body_end, frame_end) = match length {
            Some(length) => {
                let end = body_start + length;
                self.too_large(end + 1)?;
                match self.buf.get(end) {
                    None => return Ok(None),
                    Some(0) => (end, end + 1),
                    Some(_) => return Err(FrameError("the body is longer than its content-length".into())),
                }
            }
            None => match self.buf[body_start..].iter().position(|&b| b == 0) {
                Some(n) => (body_start + n, body_start + n + 1),
                None => return self.too_large(self.buf.len()).map(|()| None),
            },
        };
        self.too_large(frame_end)?;
        let body = self.buf[body_start..body_end].to_vec();
        self.buf.drain(..frame_end);
        Ok(Some(Item::Frame(Frame { command, headers, body })))
    }

    fn too_large(&self, len: usize) -> Result<(), FrameError> {
        if len > self.max_frame {
            Err(FrameError(format!("frames are limited to {} bytes", self.max_frame)))
        } else {
            Ok(())
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Heart-beat intervals in milliseconds, as `cx,cy` in a `heart-beat` header.
pub fn parse_heart_beat(value: Option<&str>) -> Result<(u64, u64), FrameError> {
    let Some(value) = value else { return Ok((0, 0)) };
    let parsed = value.split_once(',').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    parsed.ok_or_else(|| FrameError(format!("heart-beat {value:?} is not two numbers of milliseconds")))
}

/// How often the server sends heart-beats and how long it waits for the client's, in
/// milliseconds (0: never), from the client's `cx,cy` and the server's `sx,sy`.
pub fn negotiate((cx, cy): (u64, u64), (sx, sy): (u64, u64)) -> (u64, u64) {
    let send = if sx == 0 || cy == 0 { 0 } else { sx.max(cy) };
    let expect = if cx == 0 || sy == 0 { 0 } else { cx.max(sy) };
    (send, expect)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder) -> Vec<Item> {
        let mut items = Vec::new();
        while let Some(item) = decoder.next_item().unwrap() {
            items.push(item);
        }
        items
    }

    #[test]
    fn round_trips_escaped_headers_and_binary_bodies() {
        let frame = Frame::new("MESSAGE").header("destination", "/topic/a:b\\c\nd\re").body("x", vec![0, 1, 2, 0]);
        let wire = frame.encode();
        assert!(String::from_utf8_lossy(&wire).contains("/topic/a\\cb\\\\c\\nd\\re"));
        let mut decoder = Decoder::new(1024);
        decoder.push(&wire);
        assert_eq!(decode_all(&mut decoder), vec![Item::Frame(frame)]);
    }

    #[test]
    fn connect_frames_are_not_unescaped() {
        let mut decoder = Decoder::new(1024);
        decoder.push(b"CONNECT\naccept-version:1.2\npasscode:a\\cb\n\n\0");
        let Some(Item::Frame(frame)) = decoder.next_item().unwrap() else { panic!("no frame") };
        assert_eq!(frame.get("passcode"), Some("a\\cb"));
    }

    #[test]
    fn reads_frames_split_across_messages_and_several_in_one() {
        let mut decoder = Decoder::new(1024);
        let wire = [
            b"\n".to_vec(),
            Frame::new("SUBSCRIBE").header("id", "1").encode(),
            b"\r\n".to_vec(),
            Frame::new("SEND").header("destination", "/x").encode(),
        ]
        .concat();
        let mut items = Vec::new();
        for chunk in wire.chunks(3) {
            decoder.push(chunk);
            items.extend(decode_all(&mut decoder));
        }
        let commands: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::HeartBeat => "beat".into(),
                Item::Frame(f) => f.command.clone(),
            })
            .collect();
        assert_eq!(commands, ["beat", "SUBSCRIBE", "beat", "SEND"]);
    }

    #[test]
    fn the_first_repeated_header_counts_and_crlf_lines_are_read() {
        let mut decoder = Decoder::new(1024);
        decoder.push(b"SEND\r\ndestination:/a\r\ndestination:/b\r\n\r\nhi\0");
        let Some(Item::Frame(frame)) = decoder.next_item().unwrap() else { panic!("no frame") };
        assert_eq!(frame.get("destination"), Some("/a"));
        assert_eq!(frame.body, b"hi");
    }

    #[test]
    fn content_length_bodies_may_hold_nul() {
        let mut decoder = Decoder::new(1024);
        decoder.push(b"SEND\ncontent-length:3\n\na\0b\0");
        let Some(Item::Frame(frame)) = decoder.next_item().unwrap() else { panic!("no frame") };
        assert_eq!(frame.body, b"a\0b");
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        for (wire, reason) in [
            (&b"send\n\n\0"[..], "is not a STOMP command"),
            (b"SEND\nnocolon\n\n\0", "has no colon"),
            (b"SEND\nx:\\t\n\n\0", "undefined escape"),
            (b"SEND\ncontent-length:1\n\nab\0", "longer than its content-length"),
            (b"SEND\ncontent-length:x\n\n\0", "is not a number"),
        ] {
            let mut decoder = Decoder::new(1024);
            decoder.push(wire);
            let error = decoder.next_item().unwrap_err();
            assert!(error.0.contains(reason), "{error} for {:?}", String::from_utf8_lossy(wire));
        }
        let mut decoder = Decoder::new(16);
        decoder.push(b"SEND\ndestination:/a/long/destination\n\n");
        assert!(decoder.next_item().unwrap_err().0.contains("limited to 16 bytes"));
        let mut decoder = Decoder::new(16);
        decoder.push(b"SEND\n\n0123456789abcdef");
        assert!(decoder.next_item().is_err(), "an unterminated body cannot grow without bound");
    }

    #[test]
    fn heart_beats_are_negotiated_as_the_specification_says() {
        assert_eq!(parse_heart_beat(Some("10000, 20000")).unwrap(), (10_000, 20_000));
        assert_eq!(parse_heart_beat(None).unwrap(), (0, 0));
        assert!(parse_heart_beat(Some("10")).is_err());
        assert_eq!(negotiate((4000, 4000), (10_000, 10_000)), (10_000, 10_000));
        assert_eq!(negotiate((20_000, 0), (10_000, 10_000)), (0, 20_000));
        assert_eq!(negotiate((0, 500), (10_000, 10_000)), (10_000, 0));
    }
}
