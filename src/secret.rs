//! Keeping credentials out of sight: the Config debug RPC, logs and error messages show URLs
//! without their `user:password@` part and secret settings as `<redacted>`. Settings holding
//! them are [`Secret`]s and [`UrlSetting`]s, so no `Debug` or `Serialize` of the `Config` shows them.

use std::{fmt, marker::PhantomData};

/// What stands in for a hidden value.
pub const REDACTED: &str = "<redacted>";

/// A setting holding a credential. `Debug`, `Display` and `Serialize` print only what `S`
/// shows of it; [`Hidden::expose`] gives it whole, to hand it to a client.
pub struct Hidden<S>(String, PhantomData<S>);

/// What of a [`Hidden`] value may be shown.
pub trait Shown {
    fn shown(raw: &str) -> String;
}

/// Nothing: a password, token or NKey seed.
pub enum Nothing {}
impl Shown for Nothing {
    fn shown(_: &str) -> String {
        REDACTED.to_string()
    }
}

/// A URL without its userinfo.
pub enum WithoutUserinfo {}
impl Shown for WithoutUserinfo {
    fn shown(raw: &str) -> String {
        redact_urls(raw)
    }
}

pub type Secret = Hidden<Nothing>;
pub type UrlSetting = Hidden<WithoutUserinfo>;

impl<S> Hidden<S> {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<S> Clone for Hidden<S> {
    fn clone(&self) -> Self {
        Hidden(self.0.clone(), PhantomData)
    }
}

impl<S> PartialEq for Hidden<S> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<S> std::str::FromStr for Hidden<S> {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Hidden(s.to_string(), PhantomData))
    }
}

impl<S: Shown> fmt::Debug for Hidden<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", S::shown(&self.0))
    }
}

impl<S: Shown> fmt::Display for Hidden<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&S::shown(&self.0))
    }
}

impl<S: Shown> serde::Serialize for Hidden<S> {
    fn serialize<Z: serde::Serializer>(&self, z: Z) -> Result<Z::Ok, Z::Error> {
        z.serialize_str(&S::shown(&self.0))
    }
}

/// `text` with the userinfo of every `scheme://user[:password]@host` in it replaced by
/// [`REDACTED`]: for URLs from settings and for error messages that may quote them.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let authority_start = i + 3;
        out.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        // The authority ends at the path, query, fragment or anything that cannot be in a URL.
        let end = after.find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ',')).unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_replaced_and_everything_else_kept() {
        assert_eq!(redact_urls("nats://alice:s3cret@10.0.0.1:4222"), "nats://<redacted>@10.0.0.1:4222");
        assert_eq!(redact_urls("nats://tok3n@nats:4222"), "nats://<redacted>@nats:4222");
        assert_eq!(redact_urls("https://u:p@hub.example/api/models?x=1"), "https://<redacted>@hub.example/api/models?x=1");
        // A password may itself hold '@' (the authority ends at the last one).
        assert_eq!(redact_urls("nats://a:p@ss@h:1"), "nats://<redacted>@h:1");
        // Several URLs in an error message, and text around them.
        assert_eq!(
            redact_urls("GET https://x:y@a/b failed; retry nats://h:4222 (nats://k@h2)"),
            "GET https://<redacted>@a/b failed; retry nats://h:4222 (nats://<redacted>@h2)"
        );
        // No userinfo: unchanged, including an '@' after the authority.
        for s in ["nats://localhost:4222", "https://huggingface.co/org/m@main", "no url here", "tls://h:4222/"] {
            assert_eq!(redact_urls(s), s);
        }
    }

    #[test]
    fn a_secret_prints_redacted_everywhere() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s} {s:?}"), "<redacted> \"<redacted>\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2");
        let u: UrlSetting = "nats://u:pw@h:1".parse().unwrap();
        assert_eq!(format!("{u} {u:?} {}", serde_json::to_string(&u).unwrap()), r#"nats://<redacted>@h:1 "nats://<redacted>@h:1" "nats://<redacted>@h:1""#);
        assert_eq!(u.expose(), "nats://u:pw@h:1");
    }
}
