//! Builders for the ext_proc messages we send to the gateway, and readers for what it sends.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::{
        config::core::v3::{header_value_option::HeaderAppendAction, HeaderMap, HeaderValue, HeaderValueOption, Metadata},
        r#type::v3::HttpStatus,
        service::ext_proc::v3::{
            body_mutation::Mutation, processing_response::Response, BodyMutation, BodyResponse, CommonResponse,
            HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse, StreamedBodyResponse,
            TrailersResponse,
        },
    },
    google::protobuf::{value::Kind, Struct, Value},
};

/// Dynamo's body chunk size; Envoy takes larger chunks, other proxies may not.
pub const BODY_CHUNK_BYTES: usize = 62_000;

pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
const LB_NAMESPACE: &str = "envoy.lb";
const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

/// Client-supplied headers that steer routing; removed so only the picker steers (anti-spoofing).
/// The destination header itself is overwritten rather than removed. The `x-dynamo-*` worker and
/// rank headers (and the aliases the sidecar honours) are removed too, so a client cannot pin a
/// worker the picker did not choose.
pub const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "x-gateway-inference-fairness-id",
    "x-gateway-inference-objective",
    "x-gateway-model-name-rewrite",
    "x-gateway-destination-endpoint-subset",
    "x-gateway-destination-endpoint-served",
    "x-dynamo-worker-instance-id",
    "x-worker-instance-id",
    "x-dynamo-dp-rank",
    "x-dp-rank",
    "x-data-parallel-rank",
    "x-dynamo-prefill-instance-id",
    "x-prefill-instance-id",
    "x-dynamo-prefill-dp-rank",
    "x-prefill-dp-rank",
    "x-dynamo-routing-mode",
];

/// Header values arrive in `raw_value` from Envoy and in `value` from agentgateway.
pub fn header_text(h: &HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

/// The request headers, lower-cased names, in arrival order.
pub fn headers_of(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    map.map(|m| m.headers.iter().map(|h| (h.key.to_ascii_lowercase(), header_text(h))).collect())
        .unwrap_or_default()
}

/// The gateway's subset hint, as a comma string or a list of strings; `None` when absent.
pub fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let v = md?.filter_metadata.get(SUBSET_NAMESPACE)?.fields.get(SUBSET_KEY)?;
    let mut out = Vec::new();
    let mut push = |s: &str| out.extend(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
    match v.kind.as_ref()? {
        Kind::StringValue(s) => push(s),
        Kind::ListValue(l) => {
            for item in &l.values {
                if let Some(Kind::StringValue(s)) = &item.kind {
                    push(s);
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value: String::new(), raw_value: value.as_bytes().to_vec() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The request-headers response that names the destination: overwrite the destination header,
/// add `extra` headers, strip spoofable ones, clear the route cache, and set `envoy.lb` metadata.
pub fn route_headers(destination: &str, extra: &[(&str, String)]) -> ProcessingResponse {
    let mut set = Vec::with_capacity(1 + extra.len());
    set.push(set_header(DESTINATION_HEADER, destination));
    set.extend(extra.iter().map(|(k, v)| set_header(k, v)));
    let lb = Struct { fields: HashMap::from([(DESTINATION_HEADER.to_string(), string_value(destination))]) };
    let lb = Value { kind: Some(Kind::StructValue(lb)) };
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: set,
                    // Only what is not set here: proxies differ in whether removal or setting
                    // is applied first.
                    remove_headers: STRIPPED_REQUEST_HEADERS
                        .iter()
                        .filter(|s| !extra.iter().any(|(k, _)| k == *s))
                        .map(|s| s.to_string())
                        .collect(),
                }),
                clear_route_cache: true,
                ..Default::default()
            }),
        })),
        dynamic_metadata: Some(Struct { fields: HashMap::from([(LB_NAMESPACE.to_string(), lb)]) }),
        ..Default::default()
    }
}

/// One streamed body chunk for the request or the response direction.
pub fn body_chunk(request: bool, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let resp = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
    };
    ProcessingResponse {
        response: Some(if request { Response::RequestBody(resp) } else { Response::ResponseBody(resp) }),
        ..Default::default()
    }
}

/// The request body cut into chunks of at most [`BODY_CHUNK_BYTES`]; an empty body is one chunk.
pub fn request_body_chunks(body: &[u8]) -> impl Iterator<Item = ProcessingResponse> + '_ {
    let n = body.len().div_ceil(BODY_CHUNK_BYTES).max(1);
    (0..n).map(move |i| {
        let part = &body[(i * BODY_CHUNK_BYTES).min(body.len())..((i + 1) * BODY_CHUNK_BYTES).min(body.len())];
        body_chunk(true, part.to_vec(), i + 1 == n)
    })
}

/// Lets a message pass unchanged.
pub fn pass_response_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse::default())),
        ..Default::default()
    }
}

/// Lets a response body message pass unchanged (non-streamed response modes).
pub fn pass_response_body() -> ProcessingResponse {
    ProcessingResponse { response: Some(Response::ResponseBody(BodyResponse::default())), ..Default::default() }
}

pub fn pass_trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request { Response::RequestTrailers(t) } else { Response::ResponseTrailers(t) }),
        ..Default::default()
    }
}

/// Asks the gateway to wait up to `d` for our answer to the message it sent last (Envoy's
/// `override_message_timeout`: at most once per processing state, within the filter's
/// `max_message_timeout`, which must be set for Envoy to honour it).
pub fn extend_message_timeout(d: std::time::Duration) -> ProcessingResponse {
    ProcessingResponse {
        override_message_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }),
        ..Default::default()
    }
}

/// An immediate HTTP answer to the client; the request reaches no worker.
pub fn immediate(status: u16, json_body: Vec<u8>, details: &str, extra: &[(&str, String)]) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", "application/json")];
    set_headers.extend(extra.iter().map(|(k, v)| set_header(k, v)));
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus { code: status as i32 }),
            headers: Some(HeaderMutation {
                set_headers,
                remove_headers: vec![],
            }),
            body: json_body,
            details: details.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn md(v: Value) -> Metadata {
        Metadata {
            filter_metadata: HashMap::from([(
                SUBSET_NAMESPACE.to_string(),
                Struct { fields: HashMap::from([(SUBSET_KEY.to_string(), v)]) },
            )]),
            ..Default::default()
        }
    }

    #[test]
    fn subset_hint_reads_strings_and_lists() {
        assert_eq!(subset_hint(None), None);
        assert_eq!(subset_hint(Some(&md(string_value("1.1.1.1:80, 2.2.2.2")))).unwrap(), vec!["1.1.1.1:80", "2.2.2.2"]);
        let list = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![string_value("a:1"), string_value("b:2,c:3")] })),
        };
        assert_eq!(subset_hint(Some(&md(list))).unwrap(), vec!["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn body_is_chunked_at_62000_with_eos_on_the_last() {
        let body = vec![7u8; BODY_CHUNK_BYTES * 2 + 5];
        let chunks: Vec<_> = request_body_chunks(&body).collect();
        let parts: Vec<(usize, bool)> = chunks
            .iter()
            .map(|c| match &c.response {
                Some(Response::RequestBody(BodyResponse { response: Some(CommonResponse { body_mutation: Some(BodyMutation { mutation: Some(Mutation::StreamedResponse(s)) }), .. }) })) => (s.body.len(), s.end_of_stream),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(parts, vec![(BODY_CHUNK_BYTES, false), (BODY_CHUNK_BYTES, false), (5, true)]);
        assert_eq!(request_body_chunks(&[]).count(), 1);
    }

    #[test]
    fn route_headers_overwrite_destination_and_set_lb_metadata() {
        let r = route_headers("10.0.0.1:8000", &[("x-dynamo-dp-rank", "0".into())]);
        let Some(Response::RequestHeaders(h)) = &r.response else { panic!() };
        let c = h.response.as_ref().unwrap();
        assert!(c.clear_route_cache);
        let m = c.header_mutation.as_ref().unwrap();
        let first = m.set_headers[0].header.as_ref().unwrap();
        assert_eq!((first.key.as_str(), first.raw_value.as_slice()), (DESTINATION_HEADER, &b"10.0.0.1:8000"[..]));
        assert!(m.set_headers.iter().all(|o| o.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
        assert!(m.remove_headers.iter().any(|h| h == "x-gateway-destination-endpoint-subset"));
        assert!(!m.remove_headers.iter().any(|h| h == DESTINATION_HEADER || h == "x-dynamo-dp-rank"));
        assert!(m.remove_headers.iter().any(|h| h == "x-dynamo-worker-instance-id"));
        let lb = &r.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(s)) = &lb.kind else { panic!() };
        assert_eq!(s.fields[DESTINATION_HEADER], string_value("10.0.0.1:8000"));
    }
}
