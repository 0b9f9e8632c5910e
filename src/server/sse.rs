//! Reading a response's token counts as it passes: generated tokens for output-block tracking
//! and the engine's cached prompt tokens, the actual hit our prediction is measured against.
//!
//! A streamed response is server-sent events, one `data: {json}` per chunk and normally one
//! token per chunk; when an engine reports `usage.completion_tokens` (the last chunk with
//! `stream_options.include_usage`, or a non-streamed body) that exact count wins. The scan is
//! line-based and keeps only the unfinished line between chunks.

const DATA: &[u8] = b"data:";
const DONE: &[u8] = b"[DONE]";
const COMPLETION_TOKENS: &[u8] = b"\"completion_tokens\":";
const CACHED_TOKENS: &[u8] = b"\"cached_tokens\":";
/// Longer lines (a large non-streamed body) are not SSE events: only their end is kept, where
/// OpenAI bodies put `usage`.
const MAX_LINE: usize = 64 << 10;
const KEEP_TAIL: usize = 1024;

/// What a response said about its tokens, read as it streams by.
#[derive(Default)]
pub struct ResponseScan {
    events: u64,
    completion_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    /// The unfinished last line of the previous chunk.
    partial: Vec<u8>,
    /// `partial` lost its start (line over `MAX_LINE`).
    truncated: bool,
}

impl ResponseScan {
    /// Scans one response body chunk (`end`: the last one); true when the token count changed.
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> bool {
        let before = self.tokens();
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = rest.split_at(nl);
            self.partial.extend_from_slice(piece);
            self.end_line();
            rest = &after[1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            self.partial.drain(..self.partial.len() - KEEP_TAIL);
            self.truncated = true;
        }
        if end {
            self.end_line();
        }
        self.tokens() != before
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        let whole = !std::mem::take(&mut self.truncated);
        let mut text = line.trim_ascii();
        if let (true, Some(data)) = (whole, text.strip_prefix(DATA)) {
            text = data.trim_ascii();
            if text.is_empty() || text == DONE {
                return;
            }
            self.events += 1;
        }
        if let Some(n) = number_after(text, COMPLETION_TOKENS) {
            self.completion_tokens = Some(n);
        }
        if let Some(n) = number_after(text, CACHED_TOKENS) {
            self.cached_tokens = Some(n);
        }
    }

    /// Tokens generated so far: the engine's own count once it reported one.
    pub fn tokens(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.events)
    }

    /// Prompt tokens the engine served from its cache (`usage.prompt_tokens_details`), if told.
    pub fn cached_tokens(&self) -> Option<u64> {
        self.cached_tokens
    }
}

/// The number after the last `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let p = text.windows(key.len()).rposition(|w| w == key)?;
    let n = text[p + key.len()..].trim_ascii_start();
    let digits = &n[..n.iter().take_while(|c| c.is_ascii_digit()).count()];
    std::str::from_utf8(digits).ok()?.parse().ok()
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
            let mut c = ResponseScan::default();
            c.feed(&body[..split], false);
            c.feed(&body[split..], true);
            assert_eq!(c.tokens(), 7, "split at {split}");
        }
        let mut c = ResponseScan::default();
        for b in body.chunks(3) {
            c.feed(b, false);
        }
        assert_eq!(c.tokens(), 7);
    }

    #[test]
    fn usage_gives_exact_counts_in_streams_and_plain_bodies() {
        let mut c = ResponseScan::default();
        c.feed(&sse(3), false);
        assert!(c.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":42,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\n", false));
        assert_eq!((c.tokens(), c.cached_tokens()), (42, Some(32)));
        // A non-streamed body: no newline, usage at the end, known once the body ends.
        let body = br#"{"choices":[{"message":{"content":"data: not an event"}}],"usage":{"prompt_tokens":9,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let mut c = ResponseScan::default();
        assert!(!c.feed(&body[..40], false));
        assert!(c.feed(&body[40..], true));
        assert_eq!((c.tokens(), c.cached_tokens()), (4, Some(0)));
        let mut c = ResponseScan::default();
        c.feed(b"{\"choices\":[]}", true);
        assert_eq!((c.tokens(), c.cached_tokens()), (0, None));
    }

    #[test]
    fn a_huge_plain_body_keeps_only_its_end() {
        let mut body = br#"{"choices":[{"message":{"content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        body.extend_from_slice(br#""}}],"usage":{"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":16}}}"#);
        let mut c = ResponseScan::default();
        for piece in body.chunks(10_000) {
            c.feed(piece, false);
            assert!(c.partial.len() <= MAX_LINE + 10_000);
        }
        c.feed(b"", true);
        assert_eq!((c.tokens(), c.cached_tokens()), (7, Some(16)));
    }

    /// A streamed completion exactly as Dynamo 1.6.1's frontend sent it from a mocker (with
    /// `stream_options.include_usage`, captured by tests/interop_dynamo.rs): the usage chunk has
    /// no choices and comes after the finish chunk.
    #[test]
    fn reads_a_real_dynamo_stream() {
        let body = r#"data: {"id":"cmpl-400993ef-9fe6-4422-ae1e-97f956b5b084","choices":[{"text":"File","index":0}],"created":1795676305,"model":"qwen","system_fingerprint":null,"object":"text_completion","usage":null}

data: {"id":"cmpl-400993ef-9fe6-4422-ae1e-97f956b5b084","choices":[{"text":"","index":0,"finish_reason":"length"}],"created":1795676305,"model":"qwen","system_fingerprint":null,"object":"text_completion","usage":null}

data: {"id":"cmpl-400993ef-9fe6-4422-ae1e-97f956b5b084","choices":[],"created":1795676305,"model":"qwen","system_fingerprint":null,"object":"text_completion","usage":{"prompt_tokens":137,"completion_tokens":1,"total_tokens":138,"prompt_tokens_details":{"audio_tokens":null,"cached_tokens":128}}}

data: [DONE]

"#;
        for split in 1..body.len() {
            let mut c = ResponseScan::default();
            c.feed(&body.as_bytes()[..split], false);
            c.feed(&body.as_bytes()[split..], true);
            assert_eq!((c.tokens(), c.cached_tokens()), (1, Some(128)), "split at {split}");
        }
    }
}
