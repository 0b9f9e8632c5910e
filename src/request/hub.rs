//! `DYN_MODEL_PATH` given as a Hugging Face repo id (`Qwen/Qwen3-0.6B`) rather than a
//! directory: the tokenizer files are fetched once into the standard Hugging Face cache
//! (`$HF_HOME/hub/models--Qwen--Qwen3-0.6B/snapshots/<commit>/…`, the layout Python's
//! `huggingface_hub` reads and writes, so a cache filled by either serves both) and loaded from
//! there. Offline (`HF_HUB_OFFLINE`, or the Hub unreachable) the snapshot `refs/main` names is
//! used as it is.

use std::path::{Path, PathBuf};

use hf_hub::{
    api::sync::{ApiBuilder, ApiError},
    Cache, Repo, RepoType,
};

use super::model::LoadError;

/// The files the model loader reads. Only `tokenizer.json` is required; a repo may lack the
/// others (404), which is remembered as `.no_exist/<commit>/<file>` as `huggingface_hub` does.
const FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json"];

/// Where and how repo ids are fetched (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// `HF_HOME` (default `~/.cache/huggingface`); `None` when neither it nor `HOME` is set.
    pub home: Option<PathBuf>,
    pub endpoint: String,
    /// `HF_TOKEN`; else the token file `huggingface-cli login` leaves in `HF_HOME`.
    pub token: Option<crate::secret::Secret>,
    /// Never contact the Hub: use the cache or fail.
    pub offline: bool,
}

/// The directory holding the model files: `spec` itself if it is a directory, else the cached
/// snapshot of the repo id `spec`, with missing files downloaded first unless offline.
pub fn model_dir(spec: &Path, hub: &HubSettings) -> Result<PathBuf, LoadError> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let Some(repo_id) = spec.to_str().filter(|s| is_repo_id(s)) else {
        return Err(LoadError::NotADirectory(spec.to_path_buf()));
    };
    let not_cached = |home: &Path, reason: String| LoadError::NotCached { repo: repo_id.to_string(), home: home.to_path_buf(), reason };
    let Some(home) = &hub.home else {
        return Err(not_cached(Path::new("(unset)"), "HF_HOME and HOME are unset".into()));
    };
    let cache = Cache::new(home.join("hub"));
    let repo_dir = cache.path().join(Repo::model(repo_id.to_string()).folder_name());
    let failure = if hub.offline {
        "HF_HUB_OFFLINE is set".to_string()
    } else {
        match download(repo_id, &cache, &repo_dir, hub) {
            Ok(dir) => return Ok(dir),
            // The client's errors quote request URLs, which may carry HF_ENDPOINT's userinfo.
            Err(e) => crate::secret::redact_urls(&e),
        }
    };
    match cached_snapshot(&repo_dir) {
        Some(dir) => {
            if !hub.offline {
                tracing::warn!(repo = repo_id, error = %failure, "cannot reach the Hugging Face Hub; using the cached files");
            }
            Ok(dir)
        }
        None => Err(not_cached(home, failure)),
    }
}

/// Hub repo ids as `huggingface_hub` accepts them: `name` or `owner/name`, each part of
/// letters, digits, `-`, `_`, `.`, without `--` or `..` and not starting or ending with `-`/`.`.
fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.contains("--")
            && !p.contains("..")
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = s.split('/').collect();
    s.len() <= 96 && (1..=2).contains(&parts.len()) && parts.into_iter().all(part)
}

/// The snapshot `refs/main` points at, if it holds a tokenizer.
fn cached_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).ok()?;
    let dir = repo_dir.join("snapshots").join(commit.trim());
    dir.join("tokenizer.json").is_file().then_some(dir)
}

/// Brings the snapshot of `main`'s current commit up to date: one request for the commit, then
/// only the files neither in its snapshot nor known absent. Errors are one line for the log.
fn download(repo_id: &str, cache: &Cache, repo_dir: &Path, hub: &HubSettings) -> Result<PathBuf, String> {
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(hub.endpoint.trim_end_matches('/').to_string())
        .with_token(hub.token.as_ref().map(|t| t.expose().to_string()).or_else(|| cache.token()))
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let commit = api.repo(Repo::model(repo_id.to_string())).info().map_err(|e| format!("repo info: {e}"))?.sha;
    // Pinned to the commit, so every file lands in the same snapshot even if `main` moves.
    let pinned = Repo::with_revision(repo_id.to_string(), RepoType::Model, commit.clone());
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let absent = repo_dir.join(".no_exist").join(&commit);
    let repo = api.repo(pinned.clone());
    for (i, file) in FILES.iter().enumerate() {
        if snapshot.join(file).exists() || absent.join(file).exists() {
            continue;
        }
        match repo.download(file) {
            Ok(_) => {}
            Err(ApiError::RequestError(e)) if i > 0 && matches!(*e, ureq::Error::Status(404, _)) => {
                std::fs::create_dir_all(&absent)
                    .and_then(|()| std::fs::write(absent.join(file), b""))
                    .map_err(|e| format!("{}: {e}", absent.display()))?;
            }
            Err(e) => return Err(format!("{file}: {e}")),
        }
    }
    let refs = cache.repo(Repo::model(repo_id.to_string()));
    refs.create_ref(&commit).map_err(|e| format!("refs/main: {e}"))?;
    // hf-hub names a ref after the pinned revision too; a commit needs none.
    let _ = std::fs::remove_file(repo_dir.join("refs").join(&commit));
    if !snapshot.join("tokenizer.json").is_file() {
        return Err(format!("tokenizer.json missing from {}", snapshot.display()));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        for id in ["Qwen/Qwen3-0.6B", "gpt2", "meta-llama/Llama-3.1-8B-Instruct", "org_1/m.v2"] {
            assert!(is_repo_id(id), "{id}");
        }
        for not in ["/models/qwen", "./qwen", "a/b/c", "org/", "org--x/m", "org/m..v", "-org/m", "", "org/m."] {
            assert!(!is_repo_id(not), "{not}");
        }
    }

    fn settings(home: &Path, offline: bool, endpoint: &str) -> HubSettings {
        HubSettings { home: Some(home.to_path_buf()), endpoint: endpoint.into(), token: None, offline }
    }

    #[test]
    fn a_cached_snapshot_is_used_offline_and_when_the_hub_is_unreachable() {
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--Org--M");
        let snap = repo.join("snapshots/0123abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        let id = Path::new("Org/M");
        // Not yet referenced by refs/main: not a usable snapshot.
        let e = model_dir(id, &settings(home.path(), true, "")).unwrap_err().to_string();
        assert!(e.contains("Org/M") && e.contains(&home.path().display().to_string()) && e.contains("HF_HUB_OFFLINE"), "{e}");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
        assert_eq!(model_dir(id, &settings(home.path(), true, "")).unwrap(), snap);
        // Online, but nothing listens at the endpoint (loopback, port 1): the cache serves.
        assert_eq!(model_dir(id, &settings(home.path(), false, "http://127.0.0.1:1")).unwrap(), snap);
        let e = model_dir(Path::new("Org/Other"), &settings(home.path(), false, "http://127.0.0.1:1")).unwrap_err().to_string();
        assert!(e.contains("Org/Other") && e.contains("repo info"), "{e}");
        // A directory wins, and a path that is neither is named as such.
        assert_eq!(model_dir(&snap, &settings(home.path(), true, "")).unwrap(), snap);
        let e = model_dir(&home.path().join("missing"), &settings(home.path(), true, "")).unwrap_err().to_string();
        assert!(e.contains("neither a directory"), "{e}");
    }
}
