//! Every setting in one typed `Config`: environment variables with CLI flags beside them.
//!
//! An invalid value stops start-up with one line that names the variable, the value and what
//! was expected (exit code 2).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{builder::BoolishValueParser, error::ContextKind, error::ContextValue, CommandFactory, Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Parser)]
#[command(name = "dynamo-epp", version, about = "Endpoint picker (Envoy ext_proc) for NVIDIA Dynamo")]
pub struct Config {
    /// Serve ext_proc over TLS with a self-signed certificate (ALPN h2); false = plaintext h2c.
    #[arg(long, env = "DYN_SECURE_SERVING", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub secure_serving: bool,

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

    // ---- Tokenization (request/): the served model's files and how prompts are tokenized.
    /// Model directory in Hugging Face layout (tokenizer.json, tokenizer_config.json, …);
    /// unset = bodies are checked but neither tokenized nor rewritten.
    #[arg(long = "model-path", env = "DYN_MODEL_PATH")]
    pub model_path: Option<PathBuf>,

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

    /// Tokenization jobs run at once, off the async reactor; 0 = one per core.
    #[arg(long = "tokenizer-threads", env = "DYN_EPP_TOKENIZER_THREADS", default_value_t = 0)]
    pub tokenizer_threads: usize,
}

impl Config {
    pub fn shutdown_propagation(&self) -> Duration {
        Duration::from_secs(self.shutdown_propagation_secs)
    }

    /// Parses flags and environment; on error returns the one-line message and exit code.
    pub fn from_args<I, T>(args: I) -> Result<Config, (String, i32)>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cfg = Config::try_parse_from(args).map_err(|e| match e.kind() {
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
        Ok(cfg)
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
        assert!(c.secure_serving);
        assert_eq!((c.grpc_port, c.health_port, c.metrics_port), (9002, 9003, 9090));
        assert_eq!(c.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.shutdown_propagation_secs, 5);
        assert_eq!(c.block_size, None);
        assert_eq!((c.model_path.as_ref(), c.model_name.as_ref()), (None, None));
        assert!(c.inject_tokens && c.lora_adapters.is_empty());
        assert_eq!((c.token_cache_bytes, c.tokenization_timeout_ms), (256 << 20, 5000));
    }

    #[test]
    fn bad_values_give_one_line_naming_flag_value_and_expectation() {
        for (args, needles) in [
            (vec!["--grpc-port", "99999"], vec!["DYN_EPP_GRPC_PORT", "99999", "65535"]),
            (vec!["--secure-serving", "maybe"], vec!["DYN_SECURE_SERVING", "maybe"]),
            (vec!["--kv-cache-block-size", "0"], vec!["DYN_KV_CACHE_BLOCK_SIZE", "\"0\""]),
            (vec!["--log-format", "xml"], vec!["DYN_EPP_LOG_FORMAT", "xml", "text"]),
            (vec!["--log-filter", "info,[[["], vec!["RUST_LOG"]),
            (vec!["--tokenization-timeout-ms", "0"], vec!["DYN_EPP_TOKENIZATION_TIMEOUT_MS", "\"0\""]),
            (vec!["--inject-tokens", "perhaps"], vec!["DYN_EPP_INJECT_TOKENS", "perhaps"]),
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
