//! The server edge's one error type: every variant is one HTTP status and one OpenAI-style body.

use crate::{
    request::{openai::RequestError, pool::PoolError, PrepareError},
    router::RouteError,
};

#[derive(Debug, thiserror::Error)]
pub enum EppError {
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// The tokenizer failed or panicked on this request; other requests are unaffected.
    #[error("{0}")]
    Tokenizer(String),
    #[error(transparent)]
    NoRoute(#[from] RouteError),
    #[error("tokenization did not finish within {ms} ms")]
    TokenizerTimeout { ms: u64 },
    /// Admission control found every eligible worker busy (429 or 503, `DYN_EPP_OVERLOAD_STATUS`).
    #[error("every eligible worker is at capacity; retry after {RETRY_AFTER_SECS} s")]
    Overloaded { status: u16 },
    /// The router queue is at its request or byte limit (`DYN_HTTP_OVERLOAD_STATUS_CODE`, 529).
    #[error("the router queue is full ({reason}); retry after {RETRY_AFTER_SECS} s")]
    QueueFull { status: u16, reason: &'static str },
    /// Waited `DYN_EPP_QUEUE_MAX_WAIT_SECS` in the router queue (Dynamo's EPP: 429).
    #[error("request evicted by flow control: no capacity within {secs} s")]
    Evicted { secs: f64 },
}

/// The `Retry-After` an overloaded answer carries: bookings free within a decode step or two,
/// so a second is long enough for capacity to reappear and short enough not to idle it.
pub const RETRY_AFTER_SECS: u32 = 1;

impl From<PrepareError> for EppError {
    fn from(e: PrepareError) -> Self {
        match e {
            PrepareError::BadRequest(r) => EppError::BadRequest(r),
            PrepareError::ModelNotFound(m) => EppError::ModelNotFound(m),
            PrepareError::Tokenizer(m) => EppError::Tokenizer(m),
        }
    }
}

impl From<PoolError> for EppError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::TimedOut(ms) => EppError::TokenizerTimeout { ms },
            PoolError::Panicked(_) => EppError::Tokenizer(e.to_string()),
        }
    }
}

impl EppError {
    pub fn status(&self) -> u16 {
        match self {
            EppError::BadRequest(_) => 400,
            EppError::ModelNotFound(_) => 404,
            EppError::BodyTooLarge { .. } => 413,
            EppError::Tokenizer(_) => 500,
            EppError::NoRoute(_) => 503,
            EppError::TokenizerTimeout { .. } => 504,
            EppError::Overloaded { status } | EppError::QueueFull { status, .. } => *status,
            EppError::Evicted { .. } => 429,
        }
    }

    /// Short machine-readable reason: the OpenAI `code` and the metrics `outcome` label.
    pub fn code(&self) -> &'static str {
        match self {
            EppError::BadRequest(RequestError::InvalidJson(_)) => "invalid_json",
            EppError::BadRequest(RequestError::Template(_)) => "chat_template_error",
            EppError::BadRequest(_) => "invalid_request",
            EppError::ModelNotFound(_) => "model_not_found",
            EppError::BodyTooLarge { .. } => "request_too_large",
            EppError::Tokenizer(_) => "tokenizer_error",
            EppError::NoRoute(RouteError::NoWorkers) => "no_workers",
            EppError::NoRoute(RouteError::NoDecodeWorkers) => "no_decode_workers",
            EppError::NoRoute(RouteError::SubsetMatchesNone) => "subset_matches_no_worker",
            EppError::NoRoute(RouteError::PrefillUnavailable) => "prefill_unavailable",
            EppError::NoRoute(RouteError::Overloaded) | EppError::Overloaded { .. } => "overloaded",
            EppError::TokenizerTimeout { .. } => "tokenizer_timeout",
            EppError::QueueFull { .. } => "queue_full",
            EppError::Evicted { .. } => "evicted",
        }
    }

    /// Headers the answer carries beyond its content type.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            EppError::Overloaded { .. } | EppError::QueueFull { .. } | EppError::Evicted { .. } => vec![("retry-after", RETRY_AFTER_SECS.to_string())],
            _ => Vec::new(),
        }
    }

    /// `{"error":{"message","type","param","code"}}` as OpenAI sends it.
    pub fn body(&self) -> Vec<u8> {
        let kind = match self.status() {
            404 => "NotFoundError",
            429 => "rate_limit_error",
            s if s < 500 => "invalid_request_error",
            500 => "internal_error",
            504 => "timeout_error",
            _ => "service_unavailable",
        };
        let param = match self {
            EppError::BadRequest(e) => e.param(),
            EppError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        serde_json::to_vec(&serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "param": param, "code": self.code() }
        }))
        .expect("JSON of strings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = EppError::from(RequestError::Missing("messages"));
        assert_eq!(e.status(), 400);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["param"], "messages");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("messages"));
        assert_eq!(EppError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(EppError::from(RouteError::NoWorkers).status(), 503);
        let busy = EppError::Overloaded { status: 429 };
        assert_eq!((busy.status(), busy.code(), busy.headers()), (429, "overloaded", vec![("retry-after", "1".to_string())]));
        let v: serde_json::Value = serde_json::from_slice(&busy.body()).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(EppError::Overloaded { status: 503 }.status(), 503);
        assert_eq!(EppError::from(RouteError::PrefillUnavailable).status(), 503);
    }

    #[test]
    fn tokenization_failures_map_to_their_statuses() {
        let nf = EppError::from(PrepareError::ModelNotFound("other".into()));
        assert_eq!((nf.status(), nf.code()), (404, "model_not_found"));
        let v: serde_json::Value = serde_json::from_slice(&nf.body()).unwrap();
        assert_eq!(v["error"]["message"], "The model `other` does not exist.");
        let t = EppError::from(RequestError::Template("chat template error: no".into()));
        assert_eq!((t.status(), t.code()), (400, "chat_template_error"));
        assert_eq!(EppError::from(PoolError::TimedOut(5)).status(), 504);
        assert_eq!(EppError::from(PoolError::Panicked("x".into())).status(), 500);
    }
}
