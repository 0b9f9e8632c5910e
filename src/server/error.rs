//! The server edge's one error type: every variant is one HTTP status and one OpenAI-style body.

use crate::{request::openai::RequestError, router::RouteError};

#[derive(Debug, thiserror::Error)]
pub enum EppError {
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(transparent)]
    NoRoute(#[from] RouteError),
}

impl EppError {
    pub fn status(&self) -> u16 {
        match self {
            EppError::BadRequest(_) => 400,
            EppError::BodyTooLarge { .. } => 413,
            EppError::NoRoute(_) => 503,
        }
    }

    /// Short machine-readable reason: the OpenAI `code` and the metrics `outcome` label.
    pub fn code(&self) -> &'static str {
        match self {
            EppError::BadRequest(RequestError::InvalidJson(_)) => "invalid_json",
            EppError::BadRequest(_) => "invalid_request",
            EppError::BodyTooLarge { .. } => "request_too_large",
            EppError::NoRoute(RouteError::NoWorkers) => "no_workers",
            EppError::NoRoute(RouteError::SubsetMatchesNone) => "subset_matches_no_worker",
        }
    }

    /// `{"error":{"message","type","param","code"}}` as OpenAI sends it.
    pub fn body(&self) -> Vec<u8> {
        let kind = if self.status() < 500 { "invalid_request_error" } else { "service_unavailable" };
        let param = match self {
            EppError::BadRequest(e) => e.param(),
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
    }
}
