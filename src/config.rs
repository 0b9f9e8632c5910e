//! Every setting in one typed `Config`: environment variables with CLI flags beside them.
//!
//! An invalid value stops start-up with one line that names the variable, the value and what
//! was expected (exit code 2).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use crate::{
    kv::predicted::ApproxCachePolicy,
    request::tokenize::BackendChoice,
    secret::{Secret, UrlSetting},
};

use clap::{builder::{BoolishValueParser, PossibleValuesParser, TypedValueParser}, error::ContextKind, error::ContextValue, CommandFactory, Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Parser, serde::Serialize)]
#[command(name = "dynamo-epp", version, about = "Endpoint picker (Envoy ext_proc) for NVIDIA Dynamo")]
pub struct Config {
    /// Serve ext_proc over TLS with a self-signed certificate (ALPN h2); false = plaintext h2c.
    #[arg(long, env = "DYN_SECURE_SERVING", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub secure_serving: bool,

    /// Directory with `tls.crt` and `tls.key` (a Kubernetes TLS Secret's mount) served instead
    /// of the self-signed certificate; re-read when the files change.
    #[arg(long = "cert-path", env = "DYN_EPP_CERT_PATH")]
    pub cert_path: Option<PathBuf>,

    /// PEM file of the CA(s) that client certificates must chain to; unset = no client
    /// certificate asked for.
    #[arg(long = "client-ca-file", env = "DYN_EPP_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,

    /// Serve the debug API (`dynamo.epp.v1.Debug`: Explain, Workers, Config) on the gRPC port.
    #[arg(long = "debug-api", env = "DYN_EPP_DEBUG_API", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub debug_api: bool,

    /// ext_proc gRPC port.
    #[arg(long = "grpc-port", env = "DYN_EPP_GRPC_PORT", default_value_t = 9002)]
    pub grpc_port: u16,

    /// gRPC health port (plaintext).
    #[arg(long = "grpc-health-port", env = "DYN_EPP_HEALTH_PORT", default_value_t = 9003)]
    pub health_port: u16,

    /// Prometheus /metrics port; 0 disables.
    #[arg(long = "metrics-port", env = "DYN_EPP_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,

    /// Address every listener binds to.
    #[arg(long = "bind-address", env = "DYN_EPP_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// YAML file describing the worker fleet; reloaded when it changes.
    #[arg(long = "workers-file", env = "DYN_EPP_WORKERS_FILE")]
    pub workers_file: Option<PathBuf>,

    /// Tokens per KV block, used when the fleet source does not say (must equal the engines').
    #[arg(long = "kv-cache-block-size", env = "DYN_KV_CACHE_BLOCK_SIZE", value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: Option<u32>,

    /// Largest request body accepted; larger bodies get 413.
    #[arg(long = "max-body-bytes", env = "DYN_EPP_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,

    /// Seconds between health turning NOT_SERVING and the listeners closing on SIGTERM.
    #[arg(long = "graceful-shutdown-propagation-secs", env = "DYN_EPP_GRACEFUL_SHUTDOWN_PROPAGATION_SECS", default_value_t = 5)]
    pub shutdown_propagation_secs: u64,

    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// Log output format.
    #[arg(long = "log-format", env = "DYN_EPP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    // ---- Traces (docs/tracing.md): OpenTelemetry's own variables; no endpoint = no export.
    /// OTLP collector, `http://…` or `https://…`; setting it turns trace export on. Over
    /// `http/protobuf` it is a base URL: spans go to `<it>/v1/traces`.
    #[arg(long = "otel-exporter-otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<UrlSetting>,

    /// OTLP collector for traces only, used as is (no path appended); wins over OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long = "otel-exporter-otlp-traces-endpoint", env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp_traces_endpoint: Option<UrlSetting>,

    /// OTLP transport: `grpc` (default) or `http/protobuf`.
    #[arg(long = "otel-exporter-otlp-protocol", env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum)]
    pub otlp_protocol: Option<OtlpProtocol>,

    /// OTLP transport of traces; wins over OTEL_EXPORTER_OTLP_PROTOCOL.
    #[arg(long = "otel-exporter-otlp-traces-protocol", env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value_enum)]
    pub otlp_traces_protocol: Option<OtlpProtocol>,

    /// Headers sent with every export, `key=value,key2=value2` (values percent-encoded), such
    /// as a collector's API key. Secret: never shown.
    #[arg(long = "otel-exporter-otlp-headers", env = "OTEL_EXPORTER_OTLP_HEADERS", hide_env_values = true)]
    pub otlp_headers: Option<Secret>,

    /// Headers of trace exports; wins over OTEL_EXPORTER_OTLP_HEADERS. Secret: never shown.
    #[arg(long = "otel-exporter-otlp-traces-headers", env = "OTEL_EXPORTER_OTLP_TRACES_HEADERS", hide_env_values = true)]
    pub otlp_traces_headers: Option<Secret>,

    /// The headers that are sent (the traces ones, else the general ones), parsed at start-up.
    #[arg(skip)]
    #[serde(skip)]
    pub otlp_headers_parsed: Vec<(String, Secret)>,

    /// Milliseconds one export may take (default 10000).
    #[arg(long = "otel-exporter-otlp-timeout", env = "OTEL_EXPORTER_OTLP_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..))]
    pub otlp_timeout_ms: Option<u64>,

    /// Milliseconds one trace export may take; wins over OTEL_EXPORTER_OTLP_TIMEOUT.
    #[arg(long = "otel-exporter-otlp-traces-timeout", env = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..))]
    pub otlp_traces_timeout_ms: Option<u64>,

    /// `gzip` or `none` (default).
    #[arg(long = "otel-exporter-otlp-compression", env = "OTEL_EXPORTER_OTLP_COMPRESSION", value_enum)]
    pub otlp_compression: Option<OtlpCompression>,

    /// Compression of trace exports; wins over OTEL_EXPORTER_OTLP_COMPRESSION.
    #[arg(long = "otel-exporter-otlp-traces-compression", env = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", value_enum)]
    pub otlp_traces_compression: Option<OtlpCompression>,

    /// Resource attributes of the spans, `key=value,key2=value2` (values percent-encoded);
    /// OTEL_SERVICE_NAME wins over a `service.name` here.
    #[arg(long = "otel-resource-attributes", env = "OTEL_RESOURCE_ATTRIBUTES", value_parser = resource_attributes)]
    pub otel_resource_attributes: Option<KeyValues>,

    /// `none` = no export whatever the endpoint; `otlp` without an endpoint = the protocol's default
    /// collector (`http://localhost:4317`, or `http://localhost:4318/v1/traces` over HTTP).
    #[arg(long = "otel-traces-exporter", env = "OTEL_TRACES_EXPORTER", value_parser = ["otlp", "none"])]
    pub traces_exporter: Option<String>,

    /// true = no export whatever else is set.
    #[arg(long = "otel-sdk-disabled", env = "OTEL_SDK_DISABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub otel_sdk_disabled: bool,

    /// `service.name` of the exported spans (else OTEL_RESOURCE_ATTRIBUTES' `service.name`, else `dynamo-epp`).
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Which traces are recorded (the `parentbased_*` ones follow the client's sampled flag).
    #[arg(long = "otel-traces-sampler", env = "OTEL_TRACES_SAMPLER", value_enum, default_value = "parentbased_always_on")]
    pub traces_sampler: TraceSampler,

    /// Ratio of the `*traceidratio` samplers, 0–1 (default 1); ignored by the others.
    #[arg(long = "otel-traces-sampler-arg", env = "OTEL_TRACES_SAMPLER_ARG", value_parser = ratio)]
    pub traces_sampler_arg: Option<f64>,

    /// Milliseconds finished spans wait to be exported in a batch.
    #[arg(long = "otel-bsp-schedule-delay", env = "OTEL_BSP_SCHEDULE_DELAY", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub otel_bsp_schedule_delay_ms: u64,

    // ---- Tokenization (request/): the served model's files and how prompts are tokenized.
    /// Model directory in Hugging Face layout (tokenizer.json, tokenizer_config.json, …), or a
    /// Hub repo id (`Qwen/Qwen3-0.6B`) fetched into HF_HOME; unset = bodies are checked but
    /// neither tokenized nor rewritten.
    #[arg(long = "model-path", env = "DYN_MODEL_PATH")]
    pub model_path: Option<PathBuf>,

    /// Hugging Face cache root: repo ids are downloaded to and read from `<it>/hub`
    /// (default ~/.cache/huggingface).
    #[arg(long = "hf-home", env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,

    /// Hub (or mirror) that repo ids are downloaded from.
    #[arg(long = "hf-endpoint", env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: UrlSetting,

    /// Token for gated or private repos (else the token file in HF_HOME).
    #[arg(long = "hf-token", env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<Secret>,

    /// Never contact the Hub: a repo id must already be in the cache.
    #[arg(long = "hf-hub-offline", env = "HF_HUB_OFFLINE", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub hf_hub_offline: bool,

    /// The served model name; bodies naming another model (and no LoRA adapter) get 404.
    #[arg(long = "model-name", env = "DYN_MODEL_NAME")]
    pub model_name: Option<String>,

    /// Comma-separated LoRA adapter names served beside the model; a body naming one routes with it.
    #[arg(long = "lora-adapters", env = "DYN_EPP_LORA_ADAPTERS", value_delimiter = ',')]
    pub lora_adapters: Vec<String>,

    /// Add the prompt's ids to forwarded bodies as `nvext.token_data` (routing tokenizes regardless).
    #[arg(long = "inject-tokens", env = "DYN_EPP_INJECT_TOKENS", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub inject_tokens: bool,

    /// Memory budget of the segment token cache in bytes; 0 disables it.
    #[arg(long = "token-cache-bytes", env = "DYN_EPP_TOKEN_CACHE_BYTES", default_value_t = 256 << 20)]
    pub token_cache_bytes: u64,

    /// Deadline for checking and tokenizing one body (waiting included); past it the request gets 504.
    #[arg(long = "tokenization-timeout-ms", env = "DYN_EPP_TOKENIZATION_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub tokenization_timeout_ms: u64,

    /// Encoder of prompts: `default` (HF tokenizers), `fastokens`, `epp` (our own byte-level BPE),
    /// or `auto` (`epp` if proven exact for the model's tokenizer.json, else HF); an unproven
    /// fast one falls back to HF.
    #[arg(long = "tokenizer", env = "DYN_TOKENIZER", default_value = "auto",
        value_parser = PossibleValuesParser::new(BackendChoice::NAMES).map(|s| BackendChoice::parse(&s).expect("listed values")))]
    pub tokenizer: BackendChoice,

    /// Tokenization jobs run at once, off the async reactor; 0 = one per core.
    #[arg(long = "tokenizer-threads", env = "DYN_EPP_TOKENIZER_THREADS", default_value_t = 0)]
    pub tokenizer_threads: usize,

    /// Bytes of huge bodies (over 1 MiB) checked and tokenized at once, whatever the threads:
    /// their tokenization takes many times their size in memory, so this bounds it. Others
    /// wait (within DYN_EPP_TOKENIZATION_TIMEOUT_MS, else 504); a body over it runs alone.
    #[arg(long = "tokenization-budget-bytes", env = "DYN_EPP_TOKENIZATION_BUDGET_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub tokenization_budget_bytes: u64,
    // ---------------------------------------------------------------- KV cache state (issue 4)
    // How the router learns what the workers have cached: which event plane, where, and the
    // approximate / predicted modes.
    /// Learn cache state from KV events; false = approximate mode (remember own decisions).
    #[arg(long = "use-kv-events", env = "DYN_USE_KV_EVENTS", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub use_kv_events: bool,

    /// Which event plane carries KV events.
    #[arg(long = "event-plane", env = "DYN_EVENT_PLANE", value_enum, default_value = "jetstream")]
    pub event_plane: EventPlane,

    /// NATS server URL (JetStream and NATS core planes, replica sync); `tls://` requires TLS.
    /// Shown without its `user:password@` part.
    #[arg(long = "nats-server", env = "NATS_SERVER", default_value = "nats://localhost:4222")]
    pub nats_server: UrlSetting,

    // NATS authentication and TLS under the names Dynamo's runtime reads
    // (lib/runtime transports/nats.rs); one method is used, first of: user + password, token,
    // NKey, credentials file.
    /// NATS user name (with NATS_AUTH_PASSWORD).
    #[arg(long = "nats-auth-username", env = "NATS_AUTH_USERNAME")]
    pub nats_auth_username: Option<String>,

    /// NATS password (with NATS_AUTH_USERNAME).
    #[arg(long = "nats-auth-password", env = "NATS_AUTH_PASSWORD", hide_env_values = true)]
    pub nats_auth_password: Option<Secret>,

    /// NATS token.
    #[arg(long = "nats-auth-token", env = "NATS_AUTH_TOKEN", hide_env_values = true)]
    pub nats_auth_token: Option<Secret>,

    /// NATS NKey seed (`SU…`).
    #[arg(long = "nats-auth-nkey", env = "NATS_AUTH_NKEY", hide_env_values = true)]
    pub nats_auth_nkey: Option<Secret>,

    /// NATS credentials file (user JWT + NKey seed, as `nsc` writes it).
    #[arg(long = "nats-auth-credentials-file", env = "NATS_AUTH_CREDENTIALS_FILE")]
    pub nats_auth_credentials_file: Option<PathBuf>,

    /// PEM CA certificate that verifies the NATS server's certificate; set = TLS required.
    #[arg(long = "nats-tls-ca-cert-path", env = "NATS_TLS_CA_CERT_PATH")]
    pub nats_tls_ca_cert_path: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with NATS_TLS_CLIENT_KEY_PATH).
    #[arg(long = "nats-tls-client-cert-path", env = "NATS_TLS_CLIENT_CERT_PATH")]
    pub nats_tls_client_cert_path: Option<PathBuf>,

    /// PEM client key for mutual TLS (with NATS_TLS_CLIENT_CERT_PATH).
    #[arg(long = "nats-tls-client-key-path", env = "NATS_TLS_CLIENT_KEY_PATH")]
    pub nats_tls_client_key_path: Option<PathBuf>,

    /// Dynamo namespace: the workers publish KV events in it (default `dynamo`), and it is the
    /// worker pods' namespace label when DYN_NAMESPACE_PREFIX is unset (default `vllm-agg`, as
    /// Dynamo's EPP).
    #[arg(long = "namespace", env = "DYN_NAMESPACE")]
    pub namespace: Option<String>,

    /// Dynamo component of the workers.
    #[arg(long = "component-name", env = "DYN_COMPONENT_NAME", default_value = "backend")]
    pub component: String,

    /// Durable JetStream consumer of this replica (kept across restarts); default: POD_NAME.
    #[arg(long = "kv-consumer-name", env = "DYN_EPP_KV_CONSUMER_NAME")]
    pub kv_consumer_name: Option<String>,

    /// This pod's name (Kubernetes downward API).
    #[arg(long = "pod-name", env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Start from the end of the event stream instead of the durable consumer's position.
    #[arg(long = "router-reset-states", env = "DYN_ROUTER_RESET_STATES", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub router_reset_states: bool,

    /// Approximate mode: how routed requests' blocks are remembered: `ttl` (for
    /// DYN_ROUTER_TTL_SECS) or `lru` (until each worker's KV capacity forces LRU eviction).
    #[arg(long = "router-approximate-cache-policy", env = "DYN_ROUTER_APPROXIMATE_CACHE_POLICY", default_value = "ttl",
        value_parser = PossibleValuesParser::new(["ttl", "lru"]).map(|s| if s == "lru" { ApproxCachePolicy::Lru } else { ApproxCachePolicy::Ttl }))]
    pub router_approximate_cache_policy: ApproxCachePolicy,

    /// Approximate mode: seconds a routed request's blocks count as cached on its worker.
    #[arg(long = "router-ttl-secs", env = "DYN_ROUTER_TTL_SECS", default_value = "120", value_parser = positive_secs)]
    pub router_ttl_secs: f64,

    /// With events on: also count routed prefixes as cached for this many seconds.
    #[arg(long = "router-predicted-ttl-secs", env = "DYN_ROUTER_PREDICTED_TTL_SECS", value_parser = positive_secs)]
    pub router_predicted_ttl_secs: Option<f64>,

    /// Bound on remembered (worker rank, block) pairs of the approximate / predicted state.
    #[arg(long = "max-predicted-blocks", env = "DYN_EPP_MAX_PREDICTED_BLOCKS", default_value_t = 4_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_predicted_blocks: u64,

    // ---------------------------------------------------------------- Scheduler (issue 5)
    // Dynamo's cost model and its switches (contracts §8, §9 A and C), admission control,
    // disaggregation and replica sync. Defaults are Dynamo's.
    /// Credit per device-cached prefix block against the prompt's prefill cost.
    #[arg(long = "overlap-score-credit", env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT", default_value = "1.0", value_parser = non_negative)]
    pub overlap_credit: f64,

    /// Cuts the credit as a worker's active prefill rises above the least-loaded eligible one's.
    #[arg(long = "overlap-score-credit-decay", env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY", default_value = "0.0", value_parser = non_negative)]
    pub credit_decay: f64,

    /// Weight of host-memory cached blocks beyond the device prefix.
    #[arg(long = "host-cache-hit-weight", env = "DYN_ROUTER_HOST_CACHE_HIT_WEIGHT", default_value = "0.75", value_parser = non_negative)]
    pub host_cache_hit_weight: f64,

    /// Weight of disk cached blocks beyond the host prefix.
    #[arg(long = "disk-cache-hit-weight", env = "DYN_ROUTER_DISK_CACHE_HIT_WEIGHT", default_value = "0.25", value_parser = non_negative)]
    pub disk_cache_hit_weight: f64,

    /// Scales the prompt-side (prefill) cost after cache credits.
    #[arg(long = "prefill-load-scale", env = "DYN_ROUTER_PREFILL_LOAD_SCALE", default_value = "1.0", value_parser = non_negative)]
    pub prefill_load_scale: f64,

    /// Block-equivalent cost per active request on a worker.
    #[arg(long = "decode-active-request-weight", env = "DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT", default_value = "0.0", value_parser = non_negative)]
    pub decode_active_request_weight: f64,

    /// Deprecated: non-zero sets the prefill load scale, 0 also zeroes the credit.
    #[arg(long = "kv-overlap-score-weight", env = "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT", value_parser = non_negative, hide = true)]
    pub deprecated_overlap_weight: Option<f64>,

    /// Deprecated older spelling of DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT.
    #[arg(long = "overlap-score-weight", env = "DYN_OVERLAP_SCORE_WEIGHT", value_parser = non_negative, hide = true)]
    pub deprecated_overlap_weight_old: Option<f64>,

    /// What decides: `cost` (Dynamo's cost model) or `predicted-ttft` (the lowest predicted
    /// time to first token, learned online per worker rank, guarded by decode speed).
    #[arg(long = "router-policy", env = "DYN_ROUTER_POLICY", value_enum, default_value = "cost")]
    pub router_policy: crate::sched::RoutingPolicy,

    /// 0 = the cheapest worker wins (ties at random); > 0 = softmax sampling at this temperature.
    #[arg(long = "router-temperature", env = "DYN_ROUTER_TEMPERATURE", default_value = "0.0", value_parser = non_negative)]
    pub temperature: f64,

    /// Count each worker's active KV blocks (decode load).
    #[arg(long = "track-active-blocks", env = "DYN_ROUTER_TRACK_ACTIVE_BLOCKS", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub track_active_blocks: bool,

    /// Add a block of decode load each time a streamed response crosses a block boundary.
    #[arg(long = "track-output-blocks", env = "DYN_ROUTER_TRACK_OUTPUT_BLOCKS", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub track_output_blocks: bool,

    /// Count the prompt tokens each worker still has to prefill.
    #[arg(long = "track-prefill-tokens", env = "DYN_ROUTER_TRACK_PREFILL_TOKENS", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub track_prefill_tokens: bool,

    /// Shared prompt prefixes on one worker count once in its active blocks; false = never.
    #[arg(long = "assume-kv-reuse", env = "DYN_ROUTER_ASSUME_KV_REUSE", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub assume_kv_reuse: bool,

    /// Bookings whose end was never seen are dropped after this many seconds.
    #[arg(long = "active-request-expiry-secs", env = "DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS", default_value = "300", value_parser = positive_secs)]
    pub active_request_expiry_secs: f64,

    /// With no prefill workers: true = refuse requests (503), false = serve them aggregated.
    #[arg(long = "enforce-disagg", env = "DYN_ENFORCE_DISAGG", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enforce_disagg: bool,

    /// `none` or `token-capacity` (skip workers over the thresholds below; setting any
    /// threshold enables it).
    #[arg(long = "admission-control", env = "DYN_ADMISSION_CONTROL", value_enum, default_value = "none")]
    pub admission_control: AdmissionControl,

    /// A worker rank is busy above this fraction of its total KV blocks in active blocks.
    #[arg(long = "active-decode-blocks-threshold", env = "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD", value_parser = non_negative)]
    pub decode_blocks_threshold: Option<f64>,

    /// A worker rank is busy above this many active prefill tokens.
    #[arg(long = "active-prefill-tokens-threshold", env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD")]
    pub prefill_tokens_threshold: Option<u64>,

    /// A worker rank is busy above this fraction of its max_num_batched_tokens in prefill tokens.
    #[arg(long = "active-prefill-tokens-threshold-frac", env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC", value_parser = non_negative)]
    pub prefill_tokens_threshold_frac: Option<f64>,

    /// KV blocks per worker rank when the fleet entry does not say (decode-blocks threshold).
    #[arg(long = "total-kv-blocks", env = "DYN_EPP_TOTAL_KV_BLOCKS")]
    pub total_kv_blocks: Option<u64>,

    /// Batch token budget per worker rank when the fleet entry does not say.
    #[arg(long = "max-num-batched-tokens", env = "DYN_EPP_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<u64>,

    /// HTTP status when every worker is busy: 429 (with Retry-After) or 503.
    #[arg(long = "overload-status", env = "DYN_EPP_OVERLOAD_STATUS", default_value = "429", value_parser = clap::builder::PossibleValuesParser::new(["429", "503"]).map(|s| s.parse::<u16>().expect("listed values")))]
    pub overload_status: u16,

    /// Router queue: requests wait while every eligible worker has more active prefill tokens
    /// than this × its max_num_batched_tokens; unset = no queue (docs/queue.md).
    #[arg(long = "router-queue-threshold", env = "DYN_ROUTER_QUEUE_THRESHOLD", value_parser = non_negative)]
    pub queue_threshold: Option<f64>,

    /// Order of waiting requests: `fcfs` (bounds the tail) or `wspt` (short uncached prompts
    /// first: lowers the mean).
    #[arg(long = "router-queue-policy", env = "DYN_ROUTER_QUEUE_POLICY", value_enum, default_value = "fcfs")]
    pub queue_policy: crate::sched::queue::QueuePolicy,

    /// Late binding: a waiting request goes when the worker it would pick has room (or its
    /// prompt joins the last prefill pass there), not when any worker has; an arriving one
    /// passes those waiting only by joining. Measured with `predicted-ttft` (docs/queue.md).
    #[arg(long = "queue-late-binding", env = "DYN_EPP_QUEUE_LATE_BINDING", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub queue_late_binding: bool,

    /// Decision window (ms): a request ready to be decided while others are still arriving
    /// (headers in, body or tokenization not done) waits for them, up to this long, and they
    /// are decided together, the one that loses most by not getting its best worker first; a
    /// request with none arriving is decided at once. 0 = off: each decided on arrival, as
    /// Dynamo (docs/routing-policy.md).
    #[arg(long = "decision-window-ms", env = "DYN_EPP_DECISION_WINDOW_MS", default_value_t = 0.0, value_parser = non_negative)]
    pub decision_window_ms: f64,

    /// YAML list of queue classes (`name`, `quantum`, `policy`) shared by deficit round robin;
    /// a request names its class in `x-dynamo-meta-policy-class`.
    #[arg(long = "router-policy-config", env = "DYN_ROUTER_POLICY_CONFIG")]
    pub policy_config: Option<PathBuf>,

    /// The classes read from DYN_ROUTER_POLICY_CONFIG at start-up.
    #[arg(skip)]
    pub policy_classes: Option<Vec<crate::sched::queue::ClassSpec>>,

    /// A waiting `wspt` request's cached prefix is looked up again after this long; 0 = never.
    #[arg(long = "router-overlap-refresh-after-secs", env = "DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS", default_value = "10", value_parser = non_negative)]
    pub overlap_refresh_after_secs: f64,

    /// HTTP status of a request refused because the queue is full (Dynamo's frontend: 529).
    #[arg(long = "http-overload-status-code", env = "DYN_HTTP_OVERLOAD_STATUS_CODE", default_value_t = 529, value_parser = clap::value_parser!(u16).range(400..600))]
    pub queue_full_status: u16,

    /// Requests the queue holds at most.
    #[arg(long = "queue-max-requests", env = "DYN_EPP_QUEUE_MAX_REQUESTS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_max_requests: u64,

    /// Bytes (bodies and token ids) the queue holds at most.
    #[arg(long = "queue-max-bytes", env = "DYN_EPP_QUEUE_MAX_BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_max_bytes: u64,

    /// A request waiting longer is evicted (429). The gateway must allow it: Envoy's
    /// ext_proc `max_message_timeout` ≥ this (the EPP asks for it with `override_message_timeout`).
    #[arg(long = "queue-max-wait-secs", env = "DYN_EPP_QUEUE_MAX_WAIT_SECS", default_value = "60", value_parser = positive_secs)]
    pub queue_max_wait_secs: f64,

    /// Share booked load with other EPP replicas over NATS core.
    #[arg(long = "replica-sync", env = "DYN_ROUTER_REPLICA_SYNC", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub replica_sync: bool,

    /// Replica sync: a peer EPP not heard from for this many seconds is gone and its bookings
    /// are dropped (peers send a heartbeat every second; Dynamo's own replicas send none and
    /// are only aged out by DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS).
    #[arg(long = "replica-timeout-secs", env = "DYN_EPP_REPLICA_TIMEOUT_SECS", default_value = "5", value_parser = replica_timeout)]
    pub replica_timeout_secs: f64,

    // ---- Fleet discovery and drop-in for the Dynamo operator (contracts §1.4, §4). ----------
    // Kept together at the end: where the fleet comes from, then what the operator renders for
    // its EPP container that we accept but do not need.
    /// Where the fleet comes from: `kubernetes` (worker pods), `file` (DYN_EPP_WORKERS_FILE), or
    /// `auto` (the workers file when one is set, else Kubernetes when running in a cluster).
    #[arg(long = "discovery", env = "DYN_DISCOVERY", value_enum, default_value = "auto")]
    pub discovery: Discovery,

    /// InferencePool whose selector and targetPorts choose the worker pods; unset = Dynamo's
    /// worker labels. The operator passes it as --pool-name.
    #[arg(long = "pool-name", env = "DYN_EPP_INFERENCE_POOL_NAME")]
    pub pool_name: Option<String>,

    /// Namespace of the InferencePool and its pods (default: POD_NAMESPACE).
    #[arg(long = "pool-namespace", env = "DYN_EPP_INFERENCE_POOL_NAMESPACE")]
    pub pool_namespace: Option<String>,

    /// API group of the InferencePool; only the v1 group is served.
    #[arg(long = "pool-group", default_value = POOL_GROUP, value_parser = [POOL_GROUP])]
    pub pool_group: String,

    /// Dynamo namespace whose worker pods form the fleet (label nvidia.com/dynamo-namespace).
    #[arg(long = "namespace-prefix", env = "DYN_NAMESPACE_PREFIX")]
    pub namespace_prefix: Option<String>,

    /// Kubernetes namespace of this pod (downward API); the worker pods are looked for there.
    #[arg(long = "pod-namespace", env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Longest the Kubernetes API may stay silent on a call before it is abandoned and retried
    /// (a hung API server, a dead connection); watches ask the server to end them after half
    /// of it. Meanwhile the last fleet stays in force.
    #[arg(long = "kube-api-timeout-secs", env = "DYN_EPP_KUBE_API_TIMEOUT_SECS", default_value = "30", value_parser = kube_api_timeout)]
    pub kube_api_timeout_secs: u64,

    /// Set by Kubernetes in every pod; `auto` discovery takes it to mean "in a cluster".
    #[arg(long = "kubernetes-service-host", env = "KUBERNETES_SERVICE_HOST", hide = true)]
    pub kubernetes_service_host: Option<String>,

    #[command(flatten)]
    pub operator: OperatorCompat,
}

/// The pool API group we watch (`inference.networking.k8s.io/v1`).
pub const POOL_GROUP: &str = "inference.networking.k8s.io";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    Auto,
    Kubernetes,
    File,
}

/// `DYN_EVENT_PLANE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventPlane {
    /// Legacy durable JetStream stream, JSON events.
    Jetstream,
    /// Dynamo's event plane on NATS core, msgpack envelopes.
    Nats,
    /// The engines' own ZMQ sockets (`kv_events` in the workers file).
    Zmq,
}

/// `OTEL_TRACES_SAMPLER`: the specification's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

/// `DYN_ADMISSION_CONTROL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionControl {
    None,
    TokenCapacity,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err("a finite number ≥ 0".into()),
    }
}

/// `OTEL_EXPORTER_OTLP_*PROTOCOL`: the specification's names (`http/json` is not built in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum OtlpProtocol {
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// Where spans go when only OTEL_EXPORTER_OTLP_ENDPOINT (`base`) is set: gRPC has no path
    /// (the service names it); OTLP/HTTP appends `v1/traces` to the base's path.
    fn traces_url(self, base: &str) -> String {
        match self {
            OtlpProtocol::Grpc => base.to_string(),
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.strip_suffix('/').unwrap_or(base)),
        }
    }

    /// The specification's default collector.
    fn default_traces_url(self) -> String {
        match self {
            OtlpProtocol::Grpc => "http://localhost:4317".into(),
            OtlpProtocol::HttpProtobuf => "http://localhost:4318/v1/traces".into(),
        }
    }
}

/// `OTEL_EXPORTER_OTLP_*COMPRESSION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpCompression {
    Gzip,
    #[value(name = "none")]
    #[serde(rename = "none")]
    Uncompressed,
}

/// A collector address: an absolute `http`/`https` URI.
fn otlp_endpoint(s: &str) -> Result<UrlSetting, String> {
    let ok = (s.starts_with("http://") || s.starts_with("https://"))
        && s.parse::<tonic::codegen::http::Uri>().is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
    match ok {
        true => Ok(s.parse().expect("infallible")),
        false => Err("an http:// or https:// URL of an OTLP collector, such as http://otel-collector:4317 (gRPC) or http://otel-collector:4318 (HTTP)".into()),
    }
}

/// A `key=value,key2=value2` list as OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS
/// hold it (W3C Baggage without properties; values percent-decoded).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KeyValues(pub Vec<(String, String)>);

/// Parses a [`KeyValues`] list. Errors name the entry by position and never quote it: the
/// same parser reads headers holding credentials.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    // Empty members (a trailing comma, `a=1,,b=2`) are skipped, as the SDKs do.
    for (i, member) in s.split(',').map(str::trim).enumerate().filter(|(_, m)| !m.is_empty()) {
        let n = i + 1;
        let (key, value) = member.split_once('=').ok_or_else(|| format!("entry {n} has no '='"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("entry {n} has an empty key"));
        }
        let value = percent_decode(value.trim()).ok_or_else(|| format!("entry {n} has a malformed percent-encoding (%XX of UTF-8)"))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

fn resource_attributes(s: &str) -> Result<KeyValues, String> {
    key_values(s).map(KeyValues).map_err(|e| format!("key=value pairs separated by commas: {e}"))
}

/// OTEL_EXPORTER_OTLP_HEADERS: a [`key_values`] list whose keys are header names and whose
/// decoded values are header values (visible ASCII, spaces, tabs).
fn otlp_headers(s: &str) -> Result<Vec<(String, Secret)>, String> {
    use tonic::codegen::http::{HeaderName, HeaderValue};
    let pairs = key_values(s)?;
    for (i, (k, v)) in pairs.iter().enumerate() {
        if HeaderName::from_bytes(k.as_bytes()).is_err() || HeaderValue::from_str(v).is_err() {
            return Err(format!("entry {} is not a valid HTTP header name and value", i + 1));
        }
    }
    Ok(pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.parse().expect("infallible"))).collect())
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("a ratio from 0 to 1".into()),
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(v),
        _ => Err("a positive number of seconds".into()),
    }
}

/// At least two heartbeat periods (1 s), so one late heartbeat does not drop a live peer.
fn replica_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (2.0..1e9).contains(&v) => Ok(v),
        _ => Err("a number of seconds, at least 2 (peers send a heartbeat every second)".into()),
    }
}

/// At least 2 s (watches are asked to end after half of it, in whole seconds).
fn kube_api_timeout(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(v) if (2..=3600).contains(&v) => Ok(v),
        _ => Err("a whole number of seconds from 2 to 3600".into()),
    }
}

/// Arguments and environment the Dynamo operator renders for its EPP container (Go EPP flags,
/// Dynamo runtime settings). Accepted so the operator's spec starts us unchanged; none changes
/// what we do, and the ones set are logged as ignored at start-up.
#[derive(Clone, Debug, Default, clap::Args, serde::Serialize)]
#[command(next_help_heading = "Accepted for the Dynamo operator, ignored")]
pub struct OperatorCompat {
    /// Go EPP log verbosity (use RUST_LOG).
    #[arg(short = 'v', value_name = "LEVEL")]
    pub verbosity: Option<String>,
    /// Go EPP log encoder (use DYN_EPP_LOG_FORMAT).
    #[arg(long = "zap-encoder", value_name = "ENCODER")]
    pub zap_encoder: Option<String>,
    /// GAIE EndpointPickerConfig file (scheduling is configured by environment).
    #[arg(long = "config-file", value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Go EPP streaming switch (always streaming).
    #[arg(long = "use-streaming", env = "USE_STREAMING", hide = true)]
    pub use_streaming: Option<String>,
    /// Dynamo runtime discovery backend (we read pods directly; see DYN_DISCOVERY).
    #[arg(long = "discovery-backend", env = "DYN_DISCOVERY_BACKEND", hide = true)]
    pub discovery_backend: Option<String>,
    /// Dynamo runtime discovery mode; worker ids for container `main` equal the pod's.
    #[arg(long = "kube-discovery-mode", env = "DYN_KUBE_DISCOVERY_MODE", hide = true)]
    pub kube_discovery_mode: Option<String>,
    #[arg(long = "container-name", env = "CONTAINER_NAME", hide = true)]
    pub container_name: Option<String>,
    #[arg(long = "component", env = "DYN_COMPONENT", hide = true)]
    pub dyn_component: Option<String>,
    #[arg(long = "parent-dgd-name", env = "DYN_PARENT_DGD_K8S_NAME", hide = true)]
    pub parent_dgd_name: Option<String>,
    #[arg(long = "parent-dgd-namespace", env = "DYN_PARENT_DGD_K8S_NAMESPACE", hide = true)]
    pub parent_dgd_namespace: Option<String>,
    #[arg(long = "pod-uid", env = "POD_UID", hide = true)]
    pub pod_uid: Option<String>,
}

impl OperatorCompat {
    /// The settings that were given, by the name the operator uses, for the start-up log.
    pub fn given(&self) -> Vec<(&'static str, String)> {
        let path = self.config_file.as_ref().map(|p| p.display().to_string());
        [
            ("-v", &self.verbosity),
            ("--zap-encoder", &self.zap_encoder),
            ("--config-file", &path),
            ("USE_STREAMING", &self.use_streaming),
            ("DYN_DISCOVERY_BACKEND", &self.discovery_backend),
            ("DYN_KUBE_DISCOVERY_MODE", &self.kube_discovery_mode),
            ("CONTAINER_NAME", &self.container_name),
            ("DYN_COMPONENT", &self.dyn_component),
            ("DYN_PARENT_DGD_K8S_NAME", &self.parent_dgd_name),
            ("DYN_PARENT_DGD_K8S_NAMESPACE", &self.parent_dgd_namespace),
            ("POD_UID", &self.pod_uid),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

impl Config {
    pub fn shutdown_propagation(&self) -> Duration {
        Duration::from_secs(self.shutdown_propagation_secs)
    }

    /// Where and how a repo id in DYN_MODEL_PATH is fetched.
    pub fn hub_settings(&self) -> crate::request::hub::HubSettings {
        let home = self.hf_home.clone().or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")));
        crate::request::hub::HubSettings {
            home,
            endpoint: self.hf_endpoint.expose().to_string(),
            token: self.hf_token.clone().filter(|t| !t.expose().is_empty()),
            offline: self.hf_hub_offline,
        }
    }

    /// The router's KV settings from these values.
    pub fn kv_settings(&self) -> crate::router::KvSettings {
        crate::router::KvSettings {
            default_block_size: self.block_size.unwrap_or(16),
            use_kv_events: self.use_kv_events,
            approx_policy: self.router_approximate_cache_policy,
            approx_ttl: Duration::from_secs_f64(self.router_ttl_secs),
            predicted_ttl: self.router_predicted_ttl_secs.map(Duration::from_secs_f64),
            max_predicted_blocks: self.max_predicted_blocks as usize,
        }
    }

    /// The scheduler's settings from these values (deprecated aliases applied as upstream
    /// does: a non-zero overlap score weight becomes the prefill load scale, 0 also zeroes
    /// the credit).
    pub fn sched_settings(&self) -> crate::sched::SchedSettings {
        use crate::sched::{admission::{Capacity, Thresholds}, cost::CostWeights};
        let mut weights = CostWeights {
            overlap_credit: self.overlap_credit,
            credit_decay: self.credit_decay,
            host_weight: self.host_cache_hit_weight,
            disk_weight: self.disk_cache_hit_weight,
            prefill_load_scale: self.prefill_load_scale,
            decode_active_request_weight: self.decode_active_request_weight,
            track_prefill_tokens: self.track_prefill_tokens,
        };
        match self.deprecated_overlap_weight.or(self.deprecated_overlap_weight_old) {
            Some(w) if w > 0.0 => weights.prefill_load_scale = w,
            Some(_) => {
                weights.prefill_load_scale = 0.0;
                weights.overlap_credit = 0.0;
            }
            None => {}
        }
        let thresholds = Thresholds {
            decode_blocks_frac: self.decode_blocks_threshold,
            prefill_tokens: self.prefill_tokens_threshold,
            prefill_tokens_frac: self.prefill_tokens_threshold_frac,
        };
        crate::sched::SchedSettings {
            policy: self.router_policy,
            weights,
            temperature: self.temperature,
            track_active_blocks: self.track_active_blocks,
            track_output_blocks: self.track_output_blocks,
            assume_kv_reuse: self.assume_kv_reuse,
            expiry: Duration::from_secs_f64(self.active_request_expiry_secs),
            admission: (self.admission_control == AdmissionControl::TokenCapacity || thresholds.any()).then_some(thresholds),
            default_capacity: Capacity { total_kv_blocks: self.total_kv_blocks, max_num_batched_tokens: self.max_num_batched_tokens },
            enforce_disagg: self.enforce_disagg,
            decision_window: Duration::from_secs_f64(self.decision_window_ms / 1e3),
        }
    }

    /// Trace export settings; `None` = off (no endpoint, `OTEL_TRACES_EXPORTER=none` or
    /// `OTEL_SDK_DISABLED=true`). Each `*_TRACES_*` variable wins over its general one.
    pub fn trace_settings(&self) -> Option<crate::server::otel::TraceSettings> {
        let protocol = self.otlp_traces_protocol.or(self.otlp_protocol).unwrap_or(OtlpProtocol::Grpc);
        let endpoint = match (&self.otlp_traces_endpoint, &self.otlp_endpoint) {
            (Some(traces), _) => Some(traces.expose().to_string()),
            (None, Some(base)) => Some(protocol.traces_url(base.expose())),
            (None, None) => None,
        };
        let endpoint = match (self.traces_exporter.as_deref(), endpoint) {
            (Some("none"), _) => return None,
            (_, Some(e)) => e,
            (Some("otlp"), None) => protocol.default_traces_url(),
            (_, None) => return None,
        };
        if self.otel_sdk_disabled {
            return None;
        }
        let mut resource = self.otel_resource_attributes.as_ref().map(|kv| kv.0.clone()).unwrap_or_default();
        let named = resource.iter().rev().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone());
        resource.retain(|(k, _)| k != "service.name");
        Some(crate::server::otel::TraceSettings {
            protocol,
            endpoint,
            headers: self.otlp_headers_parsed.clone(),
            timeout: Duration::from_millis(self.otlp_traces_timeout_ms.or(self.otlp_timeout_ms).unwrap_or(10_000)),
            gzip: self.otlp_traces_compression.or(self.otlp_compression) == Some(OtlpCompression::Gzip),
            service_name: self.otel_service_name.clone().or(named).unwrap_or_else(|| "dynamo-epp".into()),
            resource,
            sampler: self.traces_sampler,
            ratio: self.traces_sampler_arg.unwrap_or(1.0),
            batch_delay: Duration::from_millis(self.otel_bsp_schedule_delay_ms),
            policy: self.router_policy.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        })
    }

    /// Settings that are accepted but deserve a warning at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for (name, v) in [
            ("DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT", self.deprecated_overlap_weight),
            ("DYN_OVERLAP_SCORE_WEIGHT", self.deprecated_overlap_weight_old),
        ] {
            if let Some(v) = v {
                w.push(format!(
                    "{name}={v} is deprecated: it sets DYN_ROUTER_PREFILL_LOAD_SCALE (0 also zeroes DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT); use those instead"
                ));
            }
        }
        let s = self.sched_settings();
        if self.admission_control == AdmissionControl::TokenCapacity && !s.admission.is_some_and(|t| t.any()) {
            w.push("DYN_ADMISSION_CONTROL=token-capacity but no DYN_ACTIVE_*_THRESHOLD is set: nothing is limited".into());
        }
        if self.queue_threshold.is_none() && self.policy_config.is_some() {
            w.push("DYN_ROUTER_POLICY_CONFIG is set but DYN_ROUTER_QUEUE_THRESHOLD is not: no queue, the classes are unused".into());
        }
        if self.queue_threshold.is_none() && self.queue_late_binding {
            w.push("DYN_EPP_QUEUE_LATE_BINDING is set but DYN_ROUTER_QUEUE_THRESHOLD is not: no queue to bind late from".into());
        }
        if self.queue_threshold.is_some() && self.max_num_batched_tokens.is_none() {
            w.push("DYN_ROUTER_QUEUE_THRESHOLD is set without DYN_EPP_MAX_NUM_BATCHED_TOKENS: only workers declaring max_num_batched_tokens can saturate and queue requests".into());
        }
        if self.track_output_blocks && !self.track_active_blocks {
            w.push("DYN_ROUTER_TRACK_OUTPUT_BLOCKS needs DYN_ROUTER_TRACK_ACTIVE_BLOCKS: output blocks are not tracked".into());
        }
        w
    }

    /// The durable consumer name: explicit, else the pod's name, else a fixed one; reduced to
    /// the characters JetStream allows in a consumer name.
    pub fn kv_consumer(&self) -> String {
        let raw = self.kv_consumer_name.as_deref().or(self.pod_name.as_deref()).unwrap_or("dynamo-epp");
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
    }

    /// The namespace whose KV events we subscribe to: DYN_NAMESPACE, else `dynamo`.
    pub fn event_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("dynamo")
    }

    /// The Dynamo namespace label worker pods carry: DYN_NAMESPACE_PREFIX, else DYN_NAMESPACE,
    /// else `vllm-agg`.
    pub fn worker_namespace(&self) -> &str {
        self.namespace_prefix.as_deref().or(self.namespace.as_deref()).unwrap_or("vllm-agg")
    }

    /// Whether the fleet comes from Kubernetes; `auto`: an explicit workers file wins, else
    /// How every NATS client of the process connects.
    pub fn nats(&self) -> crate::nats::NatsConnect {
        use crate::nats::Auth;
        let auth = match (&self.nats_auth_username, &self.nats_auth_password) {
            (Some(u), Some(p)) => Auth::UserPassword(u.clone(), p.clone()),
            _ => match (&self.nats_auth_token, &self.nats_auth_nkey, &self.nats_auth_credentials_file) {
                (Some(t), _, _) => Auth::Token(t.clone()),
                (None, Some(k), _) => Auth::NKey(k.clone()),
                (None, None, Some(f)) => Auth::CredentialsFile(f.clone()),
                (None, None, None) => Auth::None,
            },
        };
        let client_cert = self.nats_tls_client_cert_path.clone().zip(self.nats_tls_client_key_path.clone());
        crate::nats::NatsConnect { url: self.nats_server.expose().to_string(), auth, tls_ca: self.nats_tls_ca_cert_path.clone(), client_cert }
    }

    /// Kubernetes inside a cluster.
    pub fn uses_kubernetes(&self) -> bool {
        match self.discovery {
            Discovery::Kubernetes => true,
            Discovery::File => false,
            Discovery::Auto => self.workers_file.is_none() && self.kubernetes_service_host.is_some(),
        }
    }

    /// Parses flags and environment; on error returns the one-line message and exit code.
    pub fn from_args<I, T>(args: I) -> Result<Config, (String, i32)>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cfg = Config::try_parse_from(args).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                (e.to_string(), 0)
            }
            _ => (one_line(&e), 2),
        })?;
        // RUST_LOG is validated here so a typo fails start-up like every other variable.
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&cfg.log_filter) {
            return Err((
                format!(
                    "invalid value {:?} for RUST_LOG (--log-filter): expected a tracing filter such as \"info\" or \"dynamo_epp=debug\" ({err})",
                    cfg.log_filter
                ),
                2,
            ));
        }
        // Halves of a pair: Dynamo silently ignores a lone one; here it is a configuration error.
        for (a, b, name_a, name_b) in [
            (cfg.nats_auth_username.is_some(), cfg.nats_auth_password.is_some(), "NATS_AUTH_USERNAME", "NATS_AUTH_PASSWORD"),
            (cfg.nats_tls_client_cert_path.is_some(), cfg.nats_tls_client_key_path.is_some(), "NATS_TLS_CLIENT_CERT_PATH", "NATS_TLS_CLIENT_KEY_PATH"),
        ] {
            if a != b {
                let (set, unset) = if a { (name_a, name_b) } else { (name_b, name_a) };
                return Err((format!("{set} is set but {unset} is not: the two go together"), 2));
            }
        }
        for (set, name) in [(cfg.cert_path.is_some(), "DYN_EPP_CERT_PATH (--cert-path)"), (cfg.client_ca_file.is_some(), "DYN_EPP_CLIENT_CA_FILE (--client-ca-file)")] {
            if set && !cfg.secure_serving {
                return Err((format!("{name} requires DYN_SECURE_SERVING=true: certificates mean nothing on plaintext h2c"), 2));
            }
        }
        // As Dynamo: the capacity model replaces events, it does not sit beside them.
        if cfg.use_kv_events && cfg.router_approximate_cache_policy == ApproxCachePolicy::Lru {
            return Err((
                "DYN_ROUTER_APPROXIMATE_CACHE_POLICY=lru (--router-approximate-cache-policy) requires DYN_USE_KV_EVENTS=false: with KV events the cache state comes from the workers".into(),
                2,
            ));
        }
        // Headers hold credentials: the message names the variable, never the value. Both are
        // checked; the traces ones win.
        let headers = |h: &Option<Secret>, name: &str| {
            h.as_ref()
                .map(|h| otlp_headers(h.expose()))
                .transpose()
                .map_err(|e| (format!("invalid value for {name} (hidden: it may hold a credential): expected key=value pairs separated by commas, values percent-encoded; {e}"), 2))
        };
        let general = headers(&cfg.otlp_headers, "OTEL_EXPORTER_OTLP_HEADERS (--otel-exporter-otlp-headers)")?;
        let traces = headers(&cfg.otlp_traces_headers, "OTEL_EXPORTER_OTLP_TRACES_HEADERS (--otel-exporter-otlp-traces-headers)")?;
        cfg.otlp_headers_parsed = traces.or(general).unwrap_or_default();
        if let Some(path) = &cfg.policy_config {
            let classes = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|yaml| crate::sched::queue::parse_policy_config(&yaml))
                .map_err(|e| (format!("invalid DYN_ROUTER_POLICY_CONFIG (--router-policy-config) {}: {e}", path.display()), 2))?;
            cfg.policy_classes = Some(classes);
        }
        Ok(cfg)
    }

    /// The router queue's settings; `None` = no queue (DYN_ROUTER_QUEUE_THRESHOLD unset).
    pub fn queue_settings(&self) -> Option<crate::sched::queue::QueueSettings> {
        let mut s = crate::sched::queue::QueueSettings::single_class(self.queue_threshold?, self.queue_policy);
        if let Some(classes) = &self.policy_classes {
            s.classes = classes.clone();
        }
        s.max_requests = self.queue_max_requests as usize;
        s.max_bytes = self.queue_max_bytes;
        s.refresh_after = (self.overlap_refresh_after_secs > 0.0).then(|| Duration::from_secs_f64(self.overlap_refresh_after_secs));
        s.late_binding = self.queue_late_binding;
        Some(s)
    }

    pub fn queue_max_wait(&self) -> Duration {
        Duration::from_secs_f64(self.queue_max_wait_secs)
    }
}

/// Turns clap's multi-line error into one line naming the environment variable behind the flag.
fn one_line(e: &clap::Error) -> String {
    let ctx = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(s)) => Some(s.join(", ")),
        _ => None,
    };
    let (Some(arg), Some(value)) = (ctx(ContextKind::InvalidArg), ctx(ContextKind::InvalidValue))
    else {
        return e.to_string().lines().next().unwrap_or("invalid arguments").to_string();
    };
    let flag = arg.split_whitespace().next().unwrap_or(&arg).to_string();
    let cmd = Config::command();
    let env = cmd
        .get_arguments()
        .find(|a| a.get_long().map(|l| format!("--{l}")) == Some(flag.clone()))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    let expected = match (ctx(ContextKind::ValidValue), std::error::Error::source(e)) {
        (Some(valid), _) => format!("one of {valid}"),
        (None, Some(src)) => src.to_string(),
        (None, None) => "a valid value".into(),
    };
    match env {
        Some(env) => format!("invalid value {value:?} for {env} ({flag}): expected {expected}"),
        None => format!("invalid value {value:?} for {flag}: expected {expected}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_args(["dynamo-epp"]).unwrap();
        assert!(c.secure_serving && c.debug_api);
        assert_eq!((c.cert_path.as_ref(), c.client_ca_file.as_ref()), (None, None));
        assert_eq!((c.grpc_port, c.health_port, c.metrics_port), (9002, 9003, 9090));
        assert_eq!(c.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.shutdown_propagation_secs, 5);
        assert_eq!(c.block_size, None);
        assert!(c.use_kv_events && !c.router_reset_states);
        assert_eq!(c.event_plane, EventPlane::Jetstream);
        assert_eq!((c.event_namespace(), c.component.as_str()), ("dynamo", "backend"));
        assert_eq!(c.nats_server.expose(), "nats://localhost:4222");
        let kv = c.kv_settings();
        assert_eq!((kv.default_block_size, kv.approx_ttl, kv.predicted_ttl), (16, Duration::from_secs(120), None));
        assert_eq!(c.kv_consumer(), "dynamo-epp");
        assert!(!c.replica_sync);
        assert_eq!(c.replica_timeout_secs, 5.0);
        let c = Config::from_args(["dynamo-epp", "--pod-name", "epp-7f.x", "--router-predicted-ttl-secs", "2.5"]).unwrap();
        assert_eq!(c.kv_consumer(), "epp-7f_x");
        assert_eq!(c.kv_settings().predicted_ttl, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn operator_rendered_arguments_parse() {
        // Contracts §1.4: the args the Dynamo operator renders for its EPP container.
        let c = Config::from_args([
            "dynamo-epp", "--pool-name", "qwen-pool", "--pool-namespace", "team-a", "--pool-group",
            "inference.networking.k8s.io", "-v", "4", "--zap-encoder", "json", "--grpc-port", "9002",
            "--grpc-health-port", "9003", "--config-file", "/etc/epp/epp-config-dynamo.yaml",
        ])
        .unwrap();
        assert_eq!((c.pool_name.as_deref(), c.pool_namespace.as_deref()), (Some("qwen-pool"), Some("team-a")));
        assert_eq!((c.grpc_port, c.health_port), (9002, 9003));
        let given = c.operator.given();
        // The process environment may add more (CONTAINER_NAME is common outside Kubernetes).
        assert_eq!(given[..3], [("-v", "4".into()), ("--zap-encoder", "json".into()), ("--config-file", "/etc/epp/epp-config-dynamo.yaml".into())]);
        let (msg, code) = Config::from_args(["dynamo-epp", "--pool-group", "inference.networking.x-k8s.io"]).unwrap_err();
        assert_eq!(code, 2);
        assert!(msg.contains("inference.networking.k8s.io"), "{msg}");
    }

    #[test]
    fn secure_serving_settings_parse() {
        let c = Config::from_args(["dynamo-epp", "--cert-path", "/etc/epp-tls", "--client-ca-file", "/etc/ca/ca.crt", "--debug-api", "false"]).unwrap();
        assert_eq!(c.cert_path, Some(PathBuf::from("/etc/epp-tls")));
        assert_eq!(c.client_ca_file, Some(PathBuf::from("/etc/ca/ca.crt")));
        assert!(!c.debug_api && c.secure_serving);
        assert!(Config::from_args(["dynamo-epp", "--debug-api", "0"]).is_ok_and(|c| !c.debug_api));
    }

    #[test]
    fn discovery_auto_prefers_an_explicit_file_then_the_cluster() {
        let auto = |args: &[&str]| Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap();
        assert!(!auto(&[]).uses_kubernetes());
        assert!(auto(&["--kubernetes-service-host", "10.0.0.1"]).uses_kubernetes());
        assert!(!auto(&["--kubernetes-service-host", "10.0.0.1", "--workers-file", "w.yaml"]).uses_kubernetes());
        assert!(auto(&["--discovery", "kubernetes"]).uses_kubernetes());
        assert!(!auto(&["--discovery", "file", "--kubernetes-service-host", "h"]).uses_kubernetes());
        let c = auto(&[]);
        assert_eq!(c.kube_api_timeout_secs, 30);
        assert_eq!(auto(&["--kube-api-timeout-secs", "5"]).kube_api_timeout_secs, 5);
        assert_eq!(c.worker_namespace(), "vllm-agg");
        assert_eq!(auto(&["--namespace", "ns", "--namespace-prefix", "base"]).worker_namespace(), "base");
        assert_eq!(auto(&["--namespace", "ns"]).worker_namespace(), "ns");
        assert_eq!(auto(&["--namespace", "ns"]).event_namespace(), "ns");
        assert_eq!((c.model_path.as_ref(), c.model_name.as_ref()), (None, None));
        assert!(c.inject_tokens && c.lora_adapters.is_empty());
        assert_eq!((c.token_cache_bytes, c.tokenization_timeout_ms), (256 << 20, 5000));
        assert_eq!(c.tokenization_budget_bytes, 16 << 20);
        assert_eq!(auto(&["--tokenization-budget-bytes", "1048576"]).tokenization_budget_bytes, 1 << 20);
        assert_eq!(c.tokenizer, BackendChoice::Auto);
        assert_eq!(auto(&["--tokenizer", "default"]).tokenizer, BackendChoice::Default);
        assert_eq!(auto(&["--tokenizer", "fastokens"]).tokenizer, BackendChoice::Fastokens);
        assert_eq!(auto(&["--tokenizer", "epp"]).tokenizer, BackendChoice::Epp);
    }

    #[test]
    fn nats_credentials_follow_dynamos_priority_and_never_serialize() {
        use crate::nats::Auth;
        let parse = |args: &[&str]| Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied()));
        let auth = |args: &[&str]| parse(args).unwrap().nats().auth;
        assert!(matches!(auth(&[]), Auth::None));
        let all = ["--nats-auth-username", "u", "--nats-auth-password", "p", "--nats-auth-token", "t", "--nats-auth-nkey", "SUKEY", "--nats-auth-credentials-file", "c.creds"];
        assert!(matches!(auth(&all), Auth::UserPassword(u, p) if u == "u" && p.expose() == "p"));
        assert!(matches!(auth(&all[4..]), Auth::Token(t) if t.expose() == "t"));
        assert!(matches!(auth(&all[6..]), Auth::NKey(k) if k.expose() == "SUKEY"));
        assert!(matches!(auth(&all[8..]), Auth::CredentialsFile(f) if f == std::path::Path::new("c.creds")));
        let tls = parse(&["--nats-tls-ca-cert-path", "ca.pem", "--nats-tls-client-cert-path", "c.pem", "--nats-tls-client-key-path", "k.pem"]).unwrap().nats();
        assert_eq!(tls.tls_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(tls.client_cert, Some(("c.pem".into(), "k.pem".into())));
        // Halves of a pair stop start-up.
        for (args, needles) in [
            (vec!["--nats-auth-username", "u"], ["NATS_AUTH_USERNAME is set", "NATS_AUTH_PASSWORD is not"]),
            (vec!["--nats-auth-password", "SECRETVALUE"], ["NATS_AUTH_PASSWORD is set", "NATS_AUTH_USERNAME is not"]),
            (vec!["--nats-tls-client-key-path", "k"], ["NATS_TLS_CLIENT_KEY_PATH is set", "NATS_TLS_CLIENT_CERT_PATH is not"]),
        ] {
            let (msg, code) = parse(&args).unwrap_err();
            assert_eq!((code, msg.lines().count()), (2, 1), "{msg}");
            assert!(needles.iter().all(|n| msg.contains(n)) && !msg.contains("SECRETVALUE"), "{msg}");
        }
        // What the Config debug RPC serializes.
        let c = parse(&["--nats-server", "nats://a:URLPW@h:4222", "--hf-endpoint", "https://x:HFPW@hub", "--hf-token", "HFTOKEN", "--nats-auth-token", "NATSTOKEN", "--nats-auth-nkey", "SUNKEY"]).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        for secret in ["URLPW", "HFPW", "HFTOKEN", "NATSTOKEN", "SUNKEY"] {
            assert!(!json.contains(secret) && !format!("{c:?}").contains(secret), "{secret} in {json}");
        }
        assert!(json.contains(r#""nats_server":"nats://<redacted>@h:4222""#) && json.contains(r#""nats_auth_token":"<redacted>""#), "{json}");
    }

    #[test]
    fn trace_export_follows_the_otel_variables() {
        let parse = |args: &[&str]| Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap();
        // Off by default, and switched off by either off switch whatever the endpoint.
        assert_eq!(parse(&[]).trace_settings(), None);
        let ep = ["--otel-exporter-otlp-endpoint", "http://collector:4317"];
        assert_eq!(parse(&[&ep[..], &["--otel-traces-exporter", "none"]].concat()).trace_settings(), None);
        assert_eq!(parse(&[&ep[..], &["--otel-sdk-disabled", "true"]].concat()).trace_settings(), None);
        let t = parse(&ep).trace_settings().unwrap();
        assert_eq!((t.endpoint.as_str(), t.service_name.as_str()), ("http://collector:4317", "dynamo-epp"));
        assert_eq!((t.sampler, t.ratio, t.batch_delay), (TraceSampler::ParentbasedAlwaysOn, 1.0, Duration::from_secs(5)));
        assert_eq!(t.policy, "cost");
        // The traces endpoint wins; `otlp` alone means the specification's default address.
        let t = parse(&[&ep[..], &["--otel-exporter-otlp-traces-endpoint", "https://traces:443"]].concat()).trace_settings().unwrap();
        assert_eq!(t.endpoint, "https://traces:443");
        assert_eq!(parse(&["--otel-traces-exporter", "otlp"]).trace_settings().unwrap().endpoint, "http://localhost:4317");
        let t = parse(&[
            &ep[..],
            &["--otel-service-name", "epp-a", "--otel-traces-sampler", "parentbased_traceidratio", "--otel-traces-sampler-arg", "0.25"],
            &["--otel-bsp-schedule-delay", "100", "--otel-exporter-otlp-protocol", "grpc", "--router-policy", "predicted-ttft"],
        ]
        .concat())
        .trace_settings()
        .unwrap();
        assert_eq!((t.service_name.as_str(), t.sampler, t.ratio), ("epp-a", TraceSampler::ParentbasedTraceidratio, 0.25));
        assert_eq!((t.batch_delay, t.policy.as_str()), (Duration::from_millis(100), "predicted-ttft"));
        for name in ["always_on", "always_off", "traceidratio", "parentbased_always_off"] {
            assert!(Config::from_args(["dynamo-epp", "--otel-traces-sampler", name]).is_ok(), "{name}");
        }
        // The exporter's defaults (the specification's): gRPC, no headers, 10 s, uncompressed,
        // and the resource is the service name only.
        let t = parse(&ep).trace_settings().unwrap();
        assert_eq!((t.protocol, t.headers.len(), t.timeout, t.gzip, t.resource.len()), (OtlpProtocol::Grpc, 0, Duration::from_secs(10), false, 0));
    }

    fn traces(args: &[&str]) -> crate::server::otel::TraceSettings {
        Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap().trace_settings().expect("export on")
    }

    /// The specification's endpoint rules (protocol/exporter.md): over gRPC every endpoint is used
    /// as it is; over HTTP the general one is a base that `v1/traces` is appended to (no double
    /// slash), the traces one is used as it is, and the defaults are ports 4317 / 4318.
    #[test]
    fn otlp_protocol_and_endpoint_follow_the_specification() {
        let http = ["--otel-exporter-otlp-protocol", "http/protobuf"];
        for (base, url) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            ("https://gateway.example/otlp", "https://gateway.example/otlp/v1/traces"),
            ("https://gateway.example/otlp/", "https://gateway.example/otlp/v1/traces"),
        ] {
            let t = traces(&[&http[..], &["--otel-exporter-otlp-endpoint", base]].concat());
            assert_eq!((t.protocol, t.endpoint.as_str()), (OtlpProtocol::HttpProtobuf, url), "{base}");
            // gRPC has no path to add.
            assert_eq!(traces(&["--otel-exporter-otlp-endpoint", base]).endpoint, base);
        }
        let signal = ["--otel-exporter-otlp-traces-endpoint", "https://traces.example:4318/custom", "--otel-exporter-otlp-endpoint", "http://other:4318"];
        assert_eq!(traces(&[&http[..], &signal[..]].concat()).endpoint, "https://traces.example:4318/custom");
        assert_eq!(traces(&[&http[..], &["--otel-traces-exporter", "otlp"]].concat()).endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(traces(&["--otel-traces-exporter", "otlp", "--otel-exporter-otlp-protocol", "grpc"]).endpoint, "http://localhost:4317");
        // The traces protocol wins, either way round.
        let ep = ["--otel-exporter-otlp-endpoint", "http://c:4318"];
        let t = traces(&[&ep[..], &["--otel-exporter-otlp-protocol", "grpc", "--otel-exporter-otlp-traces-protocol", "http/protobuf"]].concat());
        assert_eq!((t.protocol, t.endpoint.as_str()), (OtlpProtocol::HttpProtobuf, "http://c:4318/v1/traces"));
        let t = traces(&[&ep[..], &["--otel-exporter-otlp-protocol", "http/protobuf", "--otel-exporter-otlp-traces-protocol", "grpc"]].concat());
        assert_eq!((t.protocol, t.endpoint.as_str()), (OtlpProtocol::Grpc, "http://c:4318"));
    }

    #[test]
    fn otlp_headers_timeout_compression_and_resource_attributes() {
        let ep = ["--otel-exporter-otlp-endpoint", "http://c:4317"];
        let headers = |t: &crate::server::otel::TraceSettings| t.headers.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect::<Vec<_>>();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        // Percent-decoded values, trimmed around '=' and ',', names in lower case, empty members skipped.
        let t = traces(&[&ep[..], &["--otel-exporter-otlp-headers", " Api-Key = a%2Fb%3D%3D ,x-org=acme%20corp,,"]].concat());
        assert_eq!(headers(&t), vec![pair("api-key", "a/b=="), pair("x-org", "acme corp")]);
        // Only the traces headers when both are set (the specification: the signal's option overrides).
        let both = ["--otel-exporter-otlp-headers", "a=1,b=2", "--otel-exporter-otlp-traces-headers", "c=3"];
        assert_eq!(headers(&traces(&[&ep[..], &both[..]].concat())), vec![pair("c", "3")]);
        // Timeout (ms): 10 s unless set; the traces one wins.
        assert_eq!(traces(&[&ep[..], &["--otel-exporter-otlp-timeout", "2500"]].concat()).timeout, Duration::from_millis(2500));
        let t = traces(&[&ep[..], &["--otel-exporter-otlp-timeout", "2500", "--otel-exporter-otlp-traces-timeout", "700"]].concat());
        assert_eq!(t.timeout, Duration::from_millis(700));
        // Compression: gzip, or none; the traces one wins.
        assert!(traces(&[&ep[..], &["--otel-exporter-otlp-compression", "gzip"]].concat()).gzip);
        assert!(!traces(&[&ep[..], &["--otel-exporter-otlp-compression", "gzip", "--otel-exporter-otlp-traces-compression", "none"]].concat()).gzip);
        assert!(traces(&[&ep[..], &["--otel-exporter-otlp-compression", "none", "--otel-exporter-otlp-traces-compression", "gzip"]].concat()).gzip);
        // Resource attributes, decoded; their service.name is used when OTEL_SERVICE_NAME is unset,
        // and OTEL_SERVICE_NAME wins over it; the resource list never repeats it.
        let attrs = ["--otel-resource-attributes", "deployment.environment=prod,service.name=from%20attrs,k8s.pod.name=epp-0"];
        let t = traces(&[&ep[..], &attrs[..]].concat());
        assert_eq!(t.service_name, "from attrs");
        assert_eq!(t.resource, vec![pair("deployment.environment", "prod"), pair("k8s.pod.name", "epp-0")]);
        assert_eq!(traces(&[&ep[..], &attrs[..], &["--otel-service-name", "epp-a"]].concat()).service_name, "epp-a");
    }

    /// Each setting is read from the variable the specification names.
    #[test]
    fn otlp_settings_are_read_from_the_specifications_variables() {
        let cmd = Config::command();
        for (flag, env) in [
            ("otel-exporter-otlp-protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
            ("otel-exporter-otlp-traces-protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            ("otel-exporter-otlp-headers", "OTEL_EXPORTER_OTLP_HEADERS"),
            ("otel-exporter-otlp-traces-headers", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
            ("otel-exporter-otlp-timeout", "OTEL_EXPORTER_OTLP_TIMEOUT"),
            ("otel-exporter-otlp-traces-timeout", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
            ("otel-exporter-otlp-compression", "OTEL_EXPORTER_OTLP_COMPRESSION"),
            ("otel-exporter-otlp-traces-compression", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
            ("otel-resource-attributes", "OTEL_RESOURCE_ATTRIBUTES"),
            ("otel-service-name", "OTEL_SERVICE_NAME"),
        ] {
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap_or_else(|| panic!("--{flag}"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env));
        }
    }

    /// The headers hold a collector's credential: shown nowhere, not even when they are invalid.
    #[test]
    fn otlp_headers_are_secret() {
        let c = Config::from_args(["dynamo-epp", "--otel-exporter-otlp-endpoint", "http://c:4317", "--otel-exporter-otlp-traces-headers", "authorization=Bearer%20TOK3N-S3CRET"]).unwrap();
        let t = c.trace_settings().unwrap();
        assert_eq!(t.headers[0].1.expose(), "Bearer TOK3N-S3CRET");
        for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap(), format!("{t:?}")] {
            assert!(!shown.contains("TOK3N") && shown.contains(crate::secret::REDACTED), "{shown}");
        }
        for (flag, env) in [("--otel-exporter-otlp-headers", "OTEL_EXPORTER_OTLP_HEADERS"), ("--otel-exporter-otlp-traces-headers", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")] {
            for bad in ["TOK3N-S3CRET", "=TOK3N-S3CRET", "k=TOK3N-S3CRET%zz", "k=TOK3N-S3CRET%FF", "bad key=TOK3N-S3CRET", "k=TOK3N-S3CRET%0A", "ok=1,TOK3N-S3CRET"] {
                let (msg, code) = Config::from_args(["dynamo-epp", flag, bad]).unwrap_err();
                assert_eq!((code, msg.lines().count()), (2, 1), "{bad}: {msg}");
                assert!(msg.contains(env) && !msg.contains("TOK3N"), "{bad}: {msg}");
            }
        }
        // The entry at fault is named by position.
        let (msg, _) = Config::from_args(["dynamo-epp", "--otel-exporter-otlp-headers", "a=1,b"]).unwrap_err();
        assert!(msg.contains("entry 2"), "{msg}");
    }

    #[test]
    fn bad_values_give_one_line_naming_flag_value_and_expectation() {
        for (args, needles) in [
            (vec!["--grpc-port", "99999"], vec!["DYN_EPP_GRPC_PORT", "99999", "65535"]),
            (vec!["--secure-serving", "maybe"], vec!["DYN_SECURE_SERVING", "maybe"]),
            (vec!["--kv-cache-block-size", "0"], vec!["DYN_KV_CACHE_BLOCK_SIZE", "\"0\""]),
            (vec!["--log-format", "xml"], vec!["DYN_EPP_LOG_FORMAT", "xml", "text"]),
            (vec!["--log-filter", "info,[[["], vec!["RUST_LOG"]),
            (vec!["--event-plane", "kafka"], vec!["DYN_EVENT_PLANE", "kafka", "jetstream"]),
            (vec!["--router-ttl-secs", "0"], vec!["DYN_ROUTER_TTL_SECS", "positive"]),
            (vec!["--use-kv-events", "false", "--router-approximate-cache-policy", "clock"], vec!["DYN_ROUTER_APPROXIMATE_CACHE_POLICY", "clock", "ttl, lru"]),
            (vec!["--router-approximate-cache-policy", "lru"], vec!["DYN_ROUTER_APPROXIMATE_CACHE_POLICY=lru", "DYN_USE_KV_EVENTS=false"]),
            (vec!["--use-kv-events", "perhaps"], vec!["DYN_USE_KV_EVENTS"]),
            (vec!["--discovery", "etcd"], vec!["DYN_DISCOVERY", "etcd", "kubernetes"]),
            (vec!["--tokenization-timeout-ms", "0"], vec!["DYN_EPP_TOKENIZATION_TIMEOUT_MS", "\"0\""]),
            (vec!["--tokenization-budget-bytes", "0"], vec!["DYN_EPP_TOKENIZATION_BUDGET_BYTES", "\"0\""]),
            (vec!["--inject-tokens", "perhaps"], vec!["DYN_EPP_INJECT_TOKENS", "perhaps"]),
            (vec!["--tokenizer", "tiktoken"], vec!["DYN_TOKENIZER", "tiktoken", "default, fastokens, epp, auto"]),
            (vec!["--replica-timeout-secs", "1.5"], vec!["DYN_EPP_REPLICA_TIMEOUT_SECS", "at least 2"]),
            (vec!["--kube-api-timeout-secs", "1"], vec!["DYN_EPP_KUBE_API_TIMEOUT_SECS", "\"1\"", "2 to 3600"]),
            (vec!["--kube-api-timeout-secs", "2.5"], vec!["DYN_EPP_KUBE_API_TIMEOUT_SECS", "whole number"]),
            (vec!["--debug-api", "sometimes"], vec!["DYN_EPP_DEBUG_API", "sometimes"]),
            (vec!["--otel-exporter-otlp-endpoint", "collector:4317"], vec!["OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317", "http://"]),
            (vec!["--otel-exporter-otlp-traces-endpoint", "http://"], vec!["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://"]),
            (vec!["--otel-exporter-otlp-protocol", "http/json"], vec!["OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc, http/protobuf"]),
            (vec!["--otel-exporter-otlp-traces-protocol", "http/json"], vec!["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json", "grpc, http/protobuf"]),
            (vec!["--otel-exporter-otlp-timeout", "0"], vec!["OTEL_EXPORTER_OTLP_TIMEOUT", "\"0\""]),
            (vec!["--otel-exporter-otlp-traces-timeout", "10s"], vec!["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "10s"]),
            (vec!["--otel-exporter-otlp-compression", "zstd"], vec!["OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "gzip, none"]),
            (vec!["--otel-exporter-otlp-traces-compression", "br"], vec!["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "br", "gzip, none"]),
            (vec!["--otel-resource-attributes", "a=1,novalue"], vec!["OTEL_RESOURCE_ATTRIBUTES", "entry 2", "key=value"]),
            (vec!["--otel-resource-attributes", "a=%E2%82"], vec!["OTEL_RESOURCE_ATTRIBUTES", "percent-encoding"]),
            (vec!["--otel-traces-exporter", "jaeger"], vec!["OTEL_TRACES_EXPORTER", "jaeger", "otlp, none"]),
            (vec!["--otel-traces-sampler", "xray"], vec!["OTEL_TRACES_SAMPLER", "xray", "parentbased_always_on"]),
            (vec!["--otel-traces-sampler-arg", "1.5"], vec!["OTEL_TRACES_SAMPLER_ARG", "1.5", "0 to 1"]),
            (vec!["--otel-sdk-disabled", "perhaps"], vec!["OTEL_SDK_DISABLED", "perhaps"]),
            (vec!["--secure-serving", "false", "--cert-path", "/etc/epp-tls"], vec!["DYN_EPP_CERT_PATH", "DYN_SECURE_SERVING=true"]),
            (vec!["--secure-serving", "false", "--client-ca-file", "/etc/ca.crt"], vec!["DYN_EPP_CLIENT_CA_FILE", "DYN_SECURE_SERVING=true"]),
        ] {
            let (msg, code) = Config::from_args(std::iter::once("dynamo-epp").chain(args.clone())).unwrap_err();
            assert_eq!(code, 2, "{args:?}");
            assert_eq!(msg.lines().count(), 1, "{msg}");
            for n in needles {
                assert!(msg.contains(n), "{args:?}: {msg:?} lacks {n:?}");
            }
        }
    }
}
