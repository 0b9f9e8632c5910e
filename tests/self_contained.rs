//! A clone stands on its own: no tracked file names a path outside the repository — a relative
//! path climbing out of it (`../shared/…`), one pointing at nothing tracked, or an absolute path
//! on a developer's machine (`/work/…`, a home directory, this checkout's own location).
//!
//! Not flagged: paths inside a container image (`/home/nonroot`, distroless's user), scratch
//! outputs (`/tmp/…`), URLs, and a line marked `repo-path-check: ignore` (e.g. a symlink target
//! inside a temporary directory a test builds).

use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tracked files (relative paths); a checkout without git falls back to walking the tree.
fn tracked() -> Vec<PathBuf> {
    let out = std::process::Command::new("git").args(["ls-files", "-z"]).current_dir(root()).output();
    if let Some(o) = out.ok().filter(|o| o.status.success()) {
        return o.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()).map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned())).collect();
    }
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name();
            let rel = rel.join(&name);
            if [".git", "target", ".venv", ".venv-dynamo", "data/tokenizers"].iter().any(|x| rel == Path::new(x)) {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &rel, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut v = Vec::new();
    walk(&root(), Path::new(""), &mut v);
    v
}

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.-/~$".contains(c)
}

/// Relative paths starting with `../` in `line`, each as written (up to the first non-path char).
fn relative_paths(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = line[from..].find("../").map(|i| i + from) {
        let starts_token = line[..i].chars().next_back().is_none_or(|c| !path_char(c));
        let len = line[i..].find(|c: char| !(c.is_ascii_alphanumeric() || "_.-/".contains(c))).unwrap_or(line.len() - i);
        if starts_token {
            out.push(&line[i..i + len]);
        }
        from = i + len.max(3);
    }
    out
}

/// Where `rel` (written in a file in `dir`) points, or None if it climbs out of the repository.
fn resolve(dir: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<_> = dir.components().collect();
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(_) => parts.push(c),
            _ => {}
        }
    }
    Some(parts.iter().collect())
}

/// Absolute path prefixes that exist only on some machine. Home directories other than the
/// container image's, the usual workspace roots, and this checkout's own location and parent.
fn foreign_prefixes() -> Vec<String> {
    let mut v: Vec<String> = ["/work/", "/root/", "/Users/", "/home/"].map(String::from).to_vec();
    let here = root().canonicalize().unwrap();
    v.push(format!("{}/", here.display()));
    // The parent too (worktrees and data beside the clone), unless it is a shared place like /tmp.
    if let Some(p) = here.parent().filter(|p| p.components().count() > 2) {
        v.push(format!("{}/", p.display()));
    }
    v
}

fn absolute_hits(line: &str, prefixes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in prefixes {
        let mut from = 0;
        while let Some(i) = line[from..].find(p.as_str()).map(|i| i + from) {
            from = i + p.len();
            // Inside a URL or a longer path (`https://host/home/…`, `a/work/`) it is not absolute.
            if line[..i].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || "_.-/:~$".contains(c)) {
                continue;
            }
            let end = line[i..].find(|c: char| !(c.is_ascii_alphanumeric() || "_.-/".contains(c))).map_or(line.len(), |e| i + e);
            let hit = &line[i..end];
            if hit.starts_with("/home/nonroot/") {
                continue; // distroless's nonroot user: a path inside the image
            }
            out.push(hit.to_string());
        }
    }
    out
}

/// The problems in one file's text.
fn check(file: &Path, text: &str, exists: &dyn Fn(&Path) -> bool, prefixes: &[String]) -> Vec<String> {
    let dir = file.parent().unwrap_or(Path::new(""));
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.contains("repo-path-check: ignore") {
            continue;
        }
        let at = format!("{}:{}", file.display(), n + 1);
        for rel in relative_paths(line) {
            match resolve(dir, rel) {
                None => bad.push(format!("{at}: `{rel}` climbs out of the repository")),
                Some(p) if !exists(&p) => bad.push(format!("{at}: `{rel}` names {} (not in the repository)", p.display())),
                Some(_) => {}
            }
        }
        for abs in absolute_hits(line, prefixes) {
            bad.push(format!("{at}: `{abs}` is a path on some machine, outside the repository"));
        }
    }
    bad
}

#[test]
fn no_tracked_file_names_a_path_outside_the_repository() {
    let files = tracked();
    assert!(files.len() > 50, "only {} files found", files.len());
    // A relative path may name a tracked file or a folder holding one.
    let known: std::collections::HashSet<PathBuf> =
        files.iter().flat_map(|f| f.ancestors().map(Path::to_path_buf).collect::<Vec<_>>()).collect();
    let exists = |p: &Path| known.contains(p);
    let prefixes = foreign_prefixes();
    let mut bad = Vec::new();
    for f in files.iter().filter(|f| *f != Path::new(file!())) {
        // (This file is skipped: its examples of what to flag are flagged.)
        let Ok(bytes) = std::fs::read(root().join(f)) else { continue }; // deleted in the work tree
        let Ok(text) = String::from_utf8(bytes) else { continue }; // binary (PNG, gzip)
        bad.extend(check(f, &text, &exists, &prefixes));
    }
    assert!(bad.is_empty(), "tracked files name paths outside the repository:\n{}", bad.join("\n"));
}

/// The checker itself: what it must flag and what it must leave alone.
#[test]
fn the_check_flags_outside_paths_and_nothing_legitimate() {
    let tracked = [PathBuf::from("tests/common/mod.rs"), PathBuf::from("deploy/base/kustomization.yaml")];
    let known: std::collections::HashSet<PathBuf> =
        tracked.iter().flat_map(|f| f.ancestors().map(Path::to_path_buf).collect::<Vec<_>>()).collect();
    let exists = |p: &Path| known.contains(p);
    let prefixes: Vec<String> = ["/work/", "/home/", "/srv/checkouts/"].map(String::from).to_vec();
    let flagged = |file: &str, line: &str| !check(Path::new(file), line, &exists, &prefixes).is_empty();

    // Outside: climbing out, a sibling that is not tracked, machine paths.
    assert!(flagged("README.md", "--trace ../shared/traces/x.jsonl"));
    assert!(flagged("benches/b.rs", r#"repo_root().join("../shared/fixtures")"#)); // `shared/` is not tracked
    assert!(flagged("README.md", "TOKENIZER_FIXTURES=/work/shared/fixtures/tokenizers cargo test"));
    assert!(flagged("README.md", "see /home/alice/notes.md"));
    assert!(flagged("README.md", "(`/srv/checkouts/other/file`)"));
    assert!(flagged("deploy/overlays/x/kustomization.yaml", "  - ../../../base"));

    // Inside or not a host path.
    assert!(!flagged("examples/demo.rs", r#"#[path = "../tests/common/mod.rs"]"#));
    assert!(!flagged("deploy/overlays/x/kustomization.yaml", "  - ../../base"));
    assert!(!flagged("deploy/base/epp.yaml", "mountPath: /home/nonroot/.cache"));
    assert!(!flagged("README.md", "CARGO_TARGET_DIR=/tmp/dynbase-target cargo bench"));
    assert!(!flagged("README.md", "https://example.com/home/x and a/work/b"));
    assert!(!flagged("src/x.rs", "Config { ..Default::default() }; for i in 0..n {}"));
    assert!(!flagged("tests/x.rs", r#"symlink("../../blobs/a", p); // repo-path-check: ignore"#));
}
