//! Counting generated tokens in a streamed OpenAI response, for output-block tracking.
//!
//! A streamed response is server-sent events, one `data: {json}` per chunk and normally one
//! token per chunk; when an engine reports `usage.completion_tokens` (the last chunk with
//! `stream_options.include_usage`, or a non-streamed body) that exact count wins. The scan is
//! byte-level and keeps only the few bytes that may straddle two body chunks.

const DATA: &[u8] = b"data:";
const DONE: &[u8] = b"[DONE]";
const USAGE: &[u8] = b"\"completion_tokens\":";
/// Longer lines (a non-streamed body) are not SSE events; they are skipped, not buffered.
const MAX_LINE: usize = 64 << 10;

#[derive(Default)]
pub struct OutputCounter {
    events: u64,
    usage: Option<u64>,
    /// The unfinished last line of the previous chunk.
    partial: Vec<u8>,
    /// Inside a line longer than `MAX_LINE`.
    skipping: bool,
}

impl OutputCounter {
    /// Scans one response body chunk; true when the count changed.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let before = self.tokens();
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = rest.split_at(nl);
            if !std::mem::take(&mut self.skipping) {
                if self.partial.is_empty() {
                    self.line(piece);
                } else {
                    let mut l = std::mem::take(&mut self.partial);
                    l.extend_from_slice(piece);
                    self.line(&l);
                }
            } else {
                self.partial.clear();
            }
            rest = &after[1..];
        }
        if !self.skipping {
            if self.partial.len() + rest.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            } else {
                self.partial.extend_from_slice(rest);
            }
        }
        self.tokens() != before
    }

    fn line(&mut self, l: &[u8]) {
        let Some(data) = l.strip_prefix(DATA) else { return };
        let data = data.trim_ascii();
        if data.is_empty() || data == DONE {
            return;
        }
        self.events += 1;
        if let Some(p) = data.windows(USAGE.len()).rposition(|w| w == USAGE) {
            let n = data[p + USAGE.len()..].trim_ascii_start();
            let digits = &n[..n.iter().take_while(|c| c.is_ascii_digit()).count()];
            if let Some(v) = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()) {
                self.usage = Some(v);
            }
        }
    }

    /// Tokens generated so far: the engine's own count once it reported one.
    pub fn tokens(&self) -> u64 {
        self.usage.unwrap_or(self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(n: usize) -> Vec<u8> {
        let mut s = String::new();
        for i in 0..n {
            s.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"));
        }
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    #[test]
    fn counts_events_across_any_split_and_ignores_done() {
        let body = sse(7);
        for split in 1..body.len() {
            let mut c = OutputCounter::default();
            c.feed(&body[..split]);
            c.feed(&body[split..]);
            assert_eq!(c.tokens(), 7, "split at {split}");
        }
        let mut c = OutputCounter::default();
        for b in body.chunks(3) {
            c.feed(b);
        }
        assert_eq!(c.tokens(), 7);
    }

    #[test]
    fn usage_gives_the_exact_count_and_only_line_starts_are_events() {
        let mut c = OutputCounter::default();
        c.feed(&sse(3)[..]);
        assert!(c.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":42}}\n\n"));
        assert_eq!(c.tokens(), 42);
        let mut c = OutputCounter::default();
        assert!(!c.feed(b"{\"text\":\"data: x\"}\n"));
        assert_eq!(c.tokens(), 0);
        // A non-streamed body far beyond the line limit is skipped, not buffered.
        let mut c = OutputCounter::default();
        let big = vec![b'x'; MAX_LINE + 10];
        assert!(!c.feed(&big));
        assert!(c.partial.is_empty());
        assert!(c.feed(b"tail\ndata: {}\n"));
        assert_eq!(c.tokens(), 1);
    }
}
