use std::process::ExitCode;

use dynamo_epp::config::{Config, LogFormat};

// Flat memory without tuning (docs/load.md, "Memory"): under glibc malloc RSS crept while the
// live heap did not grow (freed memory kept in per-thread arenas); jemalloc returns it.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cfg = match Config::from_args(std::env::args_os()) {
        Ok(c) => c,
        Err((msg, code)) => {
            if code == 0 {
                print!("{msg}");
            } else {
                eprintln!("dynamo-epp: {msg}");
            }
            return ExitCode::from(code as u8);
        }
    };
    let filter = tracing_subscriber::EnvFilter::new(&cfg.log_filter);
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.with_ansi(false).init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(dynamo_epp::server::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "dynamo-epp stopped");
            eprintln!("dynamo-epp: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
