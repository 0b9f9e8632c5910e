//! Protobuf at build time, pure Rust (protox; no `protoc`):
//! - a descriptor set for gRPC reflection of Envoy's ext_proc service, from the `.proto` sources
//!   shipped inside the `envoy-types` crate (no vendored copies; cargo metadata tells where, or
//!   on a fresh clone's first build, Cargo.lock's version in cargo's registry);
//! - our own debug API (`proto/dynamo/epp/v1/debug.proto`): its Rust types and tonic service, and
//!   its descriptor set for reflection.

use std::{env, path::PathBuf, process::Command};

fn envoy_types_proto_dir() -> PathBuf {
    let crate_dir = from_metadata().or_else(|why| from_registry().ok_or(why)).unwrap_or_else(|why| panic!("{why}"));
    crate_dir.join("proto")
}

/// envoy-types' directory as cargo reports it (registry, vendored or patched sources alike).
fn from_metadata() -> Result<PathBuf, String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.toml");
    // Only the target's packages: other platforms' crates (e.g. macOS-only ones) are never
    // downloaded by a build, and `--offline` would fail on them.
    let target = env::var("TARGET").unwrap();
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &target, "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    if !out.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let pkg = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "envoy-types"))
        .expect("envoy-types in the dependency graph");
    Ok(PathBuf::from(pkg["manifest_path"].as_str().unwrap()).parent().unwrap().to_path_buf())
}

/// Where cargo unpacks envoy-types from crates.io, at the version Cargo.lock pins. For the first
/// `cargo build` of a fresh clone: `cargo metadata` needs every locked package on disk, dev-only
/// ones (criterion's) included, which a build alone has not downloaded.
fn from_registry() -> Option<PathBuf> {
    let lock = std::fs::read_to_string(PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.lock")).ok()?;
    let version = lock.split("[[package]]").find_map(|p| {
        let mut lines = p.lines().map(str::trim);
        (lines.find(|l| l.starts_with("name = "))? == "name = \"envoy-types\"")
            .then(|| lines.find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"')))
            .flatten()
    })?;
    let home = env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    std::fs::read_dir(home.join("registry").join("src"))
        .ok()?
        .filter_map(|index| Some(index.ok()?.path().join(format!("envoy-types-{version}"))))
        .find(|dir| dir.join("proto").is_dir())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let root = envoy_types_proto_dir();
    let includes = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|d| root.join(d));
    let fds = protox::compile(["envoy/service/ext_proc/v3/external_processor.proto"], includes)
        .expect("compile ext_proc protos");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    std::fs::write(out_dir.join("ext_proc_descriptor.bin"), prost::Message::encode_to_vec(&fds)).unwrap();

    println!("cargo:rerun-if-changed=proto");
    // google/protobuf/struct.proto comes with protox.
    let debug = protox::compile(["dynamo/epp/v1/debug.proto"], ["proto"]).expect("compile proto/dynamo/epp/v1/debug.proto");
    std::fs::write(out_dir.join("debug_descriptor.bin"), prost::Message::encode_to_vec(&debug)).unwrap();
    tonic_prost_build::configure().compile_fds(debug).expect("generate the debug service");
}
