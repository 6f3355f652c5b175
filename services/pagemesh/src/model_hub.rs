//! Where `--model` points: a local model directory or GGUF file, or a Hugging Face Hub id
//! (`owner/name`, optionally `@revision`, optionally `:file.gguf` for one GGUF file of the
//! repository) fetched into the standard Hugging Face cache.
//!
//! A hub id whose files are all in the cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, laid out as `models--owner--name/{refs,snapshots,blobs}`) is
//! used from there without the network; so is any cached id when `HF_HUB_OFFLINE=1`. Otherwise
//! the config, tokenizer and safetensors files are downloaded with a progress bar, with the
//! token from `HF_TOKEN` (else the cache's `token` file) and the endpoint from `HF_ENDPOINT`.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Files a model directory needs, besides its weights.
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json"];
/// Files fetched when the repository has them.
const OPTIONAL_FILES: &[&str] =
    &["tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "model.safetensors.index.json"];

/// What a `--model` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory on this machine.
    Local(PathBuf),
    /// A repository on the Hugging Face Hub.
    Hub {
        /// `owner/name` (or `name`).
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: String,
    },
    /// One GGUF file of a repository on the Hugging Face Hub.
    HubFile {
        /// `owner/name` (or `name`).
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: String,
        /// The file's path in the repository (ends in `.gguf`).
        file: String,
    },
}

/// Where the hub cache is and how to reach the hub.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub cache directory (`…/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never use the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Access token (`HF_TOKEN`), else the cache's token file is used.
    pub token: Option<String>,
    /// Hub URL (`HF_ENDPOINT`).
    pub endpoint: Option<String>,
}

impl HubSettings {
    /// The settings from the environment, as the Python `huggingface_hub` reads them.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings from variables looked up with `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let cache_dir = match (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME")) {
            (Some(dir), _, _) => PathBuf::from(dir),
            (None, Some(home), _) => Path::new(&home).join("hub"),
            (None, None, Some(home)) => Path::new(&home).join(".cache").join("huggingface").join("hub"),
            (None, None, None) => return Err("cannot place the Hugging Face cache: set HF_HOME".into()),
        };
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Ok(Self {
            cache_dir,
            offline,
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            endpoint: var("HF_ENDPOINT"),
        })
    }
}

/// Reads a `--model` argument: an existing path, or anything that looks like a path
/// (absolute, `./…`, `~…`, more than one `/`), is local; `owner/name[@revision]` or
/// `name[@revision]` is a hub id, and `owner/name[@revision]:FILE.gguf` one GGUF file of it.
pub fn parse(arg: &Path) -> ModelSource {
    let text = arg.to_string_lossy();
    if arg.exists() || arg.is_absolute() || text.starts_with('.') || text.starts_with('~') {
        return ModelSource::Local(arg.to_path_buf());
    }
    if let Some((id, file)) = text.split_once(':') {
        let file_ok = file.to_ascii_lowercase().ends_with(".gguf")
            && !file.starts_with('/')
            && file.split('/').all(|p| !p.is_empty() && p != "..")
            && file.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        return match parse(Path::new(id)) {
            ModelSource::Hub { repo, revision } if file_ok => {
                ModelSource::HubFile { repo, revision, file: file.into() }
            }
            _ => ModelSource::Local(arg.to_path_buf()),
        };
    }
    let (repo, revision) = match text.split_once('@') {
        Some((repo, revision)) => (repo, revision),
        None => (text.as_ref(), "main"),
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let revision_ok = !revision.is_empty() && !revision.contains("..") && !revision.starts_with('/');
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) && revision_ok {
        ModelSource::Hub { repo: repo.to_string(), revision: revision.to_string() }
    } else {
        ModelSource::Local(arg.to_path_buf())
    }
}

/// Flags of `pagemesh fetch`.
#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {
    /// A model directory or GGUF file, a Hub id (`owner/name[@revision]`) to fetch into the
    /// Hugging Face cache, or one GGUF file of a Hub repository (`owner/name[@revision]:FILE.gguf`).
    #[arg(long)]
    pub model: PathBuf,
}

/// `pagemesh fetch`: makes sure the model is on this machine (downloading a Hub id into the
/// cache) and prints its directory.
pub fn fetch(args: FetchArgs) -> Result<(), String> {
    let dir = resolve(&args.model)?;
    if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        println!("{}", dir.display());
        return Ok(());
    }
    if !is_complete(&dir) {
        return Err(format!(
            "{} is not a complete model directory (config.json, tokenizer.json, *.safetensors)",
            dir.display()
        ));
    }
    println!("{}", dir.display());
    Ok(())
}

/// The name a model is served under by default: the hub repository's name, or the
/// directory's name, or a GGUF file's name without `.gguf`.
pub fn default_name(arg: &Path) -> String {
    let name = match parse(arg) {
        ModelSource::Hub { repo, .. } => repo.rsplit('/').next().map(str::to_string),
        ModelSource::HubFile { file, .. } => {
            let name = file.rsplit('/').next().unwrap_or(&file);
            Some(name.get(..name.len() - ".gguf".len()).unwrap_or(name).to_string())
        }
        ModelSource::Local(path) if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) => {
            path.file_stem().map(|n| n.to_string_lossy().to_string())
        }
        ModelSource::Local(dir) => dir.file_name().map(|n| n.to_string_lossy().to_string()),
    };
    name.unwrap_or_else(|| "model".to_string())
}

/// The model directory for a `--model` argument: the directory itself, or the hub snapshot
/// (downloaded first unless it is complete in the cache).
pub fn resolve(arg: &Path) -> Result<PathBuf, String> {
    match parse(arg) {
        ModelSource::Local(dir) => Ok(dir),
        ModelSource::Hub { repo, revision } => resolve_hub(&repo, &revision, &HubSettings::from_env()?),
        ModelSource::HubFile { repo, revision, file } => {
            resolve_hub_file(&repo, &revision, &file, &HubSettings::from_env()?)
        }
    }
}

/// One file of `repo` at `revision`: from the cache when it is there, else downloaded.
pub fn resolve_hub_file(repo: &str, revision: &str, file: &str, settings: &HubSettings) -> Result<PathBuf, String> {
    let repo_dir = settings
        .cache_dir
        .join(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()).folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|hash| hash.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let cached = repo_dir.join("snapshots").join(commit).join(file);
    if cached.is_file() {
        return Ok(cached);
    }
    if settings.offline {
        return Err(format!(
            "{file} of {repo}@{revision} is not in the Hugging Face cache at {}, and HF_HUB_OFFLINE is set",
            settings.cache_dir.display()
        ));
    }
    let hub_repo =
        hub_api(settings)?.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    tracing::info!("fetching {file} of {repo}@{revision} into {}", settings.cache_dir.display());
    hub_repo.get(file).map_err(|e| format!("cannot fetch {file} of {repo}@{revision}: {e}"))
}

/// A Hugging Face client on the cache, token and endpoint of `settings`, with progress bars.
fn hub_api(settings: &HubSettings) -> Result<hf_hub::api::sync::Api, String> {
    let mut builder = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone())).with_progress(true);
    if let Some(token) = &settings.token {
        builder = builder.with_token(Some(token.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder.build().map_err(|e| format!("Hugging Face client: {e}"))
}

/// The snapshot of `repo` at `revision`: from the cache when complete there, else downloaded.
pub fn resolve_hub(repo: &str, revision: &str, settings: &HubSettings) -> Result<PathBuf, String> {
    if let Some(dir) = cached_snapshot(&settings.cache_dir, repo, revision) {
        return Ok(dir);
    }
    if settings.offline {
        return Err(format!(
            "the model {repo}@{revision} is not (completely) in the Hugging Face cache at {}, \
             and HF_HUB_OFFLINE is set",
            settings.cache_dir.display()
        ));
    }
    download(repo, revision, settings)
}

/// A complete snapshot of `repo` at `revision` in the cache at `cache_dir`, if there is one.
pub fn cached_snapshot(cache_dir: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir =
        cache_dir.join(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()).folder_name());
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        // A pinned commit has a snapshot but no ref.
        Err(_) => revision.to_string(),
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    is_complete(&snapshot).then_some(snapshot)
}

/// Whether a directory holds a loadable model: the required files and every weight file
/// (those named by the safetensors index, or at least one `*.safetensors`).
pub fn is_complete(dir: &Path) -> bool {
    if !REQUIRED_FILES.iter().all(|f| dir.join(f).is_file()) {
        return false;
    }
    match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        Ok(index) => match weight_files(&index) {
            Some(files) => !files.is_empty() && files.iter().all(|f| dir.join(f).is_file()),
            None => false,
        },
        Err(_) => std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors") && e.path().is_file())
        }),
    }
}

/// The shard files a safetensors index names.
fn weight_files(index: &str) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(index).ok()?;
    let mut files: Vec<String> =
        value.get("weight_map")?.as_object()?.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Some(files)
}

/// Downloads the files a model directory needs into the cache (with a progress bar) and
/// returns the snapshot directory.
fn download(repo: &str, revision: &str, settings: &HubSettings) -> Result<PathBuf, String> {
    let hub_repo =
        hub_api(settings)?.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let info = hub_repo.info().map_err(|e| format!("cannot list {repo}@{revision} on the Hugging Face Hub: {e}"))?;
    let available: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let wanted: Vec<&str> = available
        .iter()
        .copied()
        .filter(|f| {
            REQUIRED_FILES.contains(f)
                || OPTIONAL_FILES.contains(f)
                || (f.ends_with(".safetensors") && !f.contains('/'))
        })
        .collect();
    if let Some(missing) = REQUIRED_FILES.iter().find(|f| !available.contains(f)) {
        return Err(format!("{repo}@{revision} has no {missing}: not a model pagemesh can load"));
    }
    if !wanted.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(format!("{repo}@{revision} has no .safetensors weights"));
    }
    tracing::info!("fetching {repo}@{revision} ({} files) into {}", wanted.len(), settings.cache_dir.display());
    let mut snapshot = None;
    for file in wanted {
        let path = hub_repo.get(file).map_err(|e| format!("cannot fetch {file} of {repo}: {e}"))?;
        if file == "config.json" {
            snapshot = path.parent().map(Path::to_path_buf);
        }
    }
    snapshot.ok_or_else(|| format!("{repo}: config.json was not stored"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cache_dir: &Path, offline: bool) -> HubSettings {
        HubSettings { cache_dir: cache_dir.to_path_buf(), offline, token: None, endpoint: None }
    }

    /// A fresh directory under the system temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pagemesh-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// Lays out a snapshot the way the hub cache does: blobs named by hash, the snapshot's
    /// files symlinks to them, a ref naming the commit.
    fn cache_snapshot(
        cache: &Path,
        repo: &str,
        commit: &str,
        refname: Option<&str>,
        files: &[(&str, &str)],
    ) -> PathBuf {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = repo_dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).expect("snapshot dir");
        std::fs::create_dir_all(repo_dir.join("blobs")).expect("blobs dir");
        for (i, (name, content)) in files.iter().enumerate() {
            let blob = repo_dir.join("blobs").join(format!("{commit}{i}"));
            std::fs::write(&blob, content).expect("blob");
            std::os::unix::fs::symlink(&blob, snapshot.join(name)).expect("symlink");
        }
        if let Some(refname) = refname {
            std::fs::create_dir_all(repo_dir.join("refs")).expect("refs dir");
            std::fs::write(repo_dir.join("refs").join(refname), format!("{commit}\n")).expect("ref");
        }
        snapshot
    }

    const MODEL_FILES: &[(&str, &str)] =
        &[("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", "weights")];

    #[test]
    fn parses_paths_and_hub_ids() {
        let hub = |repo: &str, revision: &str| ModelSource::Hub { repo: repo.into(), revision: revision.into() };
        assert_eq!(parse(Path::new("karpathy/tinyllamas")), hub("karpathy/tinyllamas", "main"));
        assert_eq!(parse(Path::new("gpt2")), hub("gpt2", "main"));
        assert_eq!(
            parse(Path::new("TinyLlama/TinyLlama-1.1B-Chat-v1.0@v1.0")),
            hub("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "v1.0")
        );
        for local in ["./models/x", "./models/stories260K", "/abs/model", "a/b/c", "~/m", "bad name/x"] {
            assert_eq!(parse(Path::new(local)), ModelSource::Local(local.into()), "{local}");
        }
        // An existing directory is local even when it reads like a hub id.
        let dir = scratch("existing");
        assert_eq!(parse(&dir), ModelSource::Local(dir.to_path_buf()));
        assert_eq!(default_name(Path::new("owner/tiny@v2")), "tiny");
        assert_eq!(default_name(Path::new("models/stories260K")), "stories260K");
        assert_eq!(default_name(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M-Instruct.Q4_1");
    }

    #[test]
    fn a_gguf_file_of_a_hub_repository_parses_and_is_used_from_the_cache() {
        let file = |repo: &str, revision: &str, file: &str| ModelSource::HubFile {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
        };
        assert_eq!(parse(Path::new("owner/m-GGUF:m.Q4_K_M.gguf")), file("owner/m-GGUF", "main", "m.Q4_K_M.gguf"));
        assert_eq!(parse(Path::new("owner/m@v2:q/m.gguf")), file("owner/m", "v2", "q/m.gguf"));
        for local in ["owner/m:m.bin", "owner/m:../m.gguf", "owner/m:/m.gguf", "a/b/c:m.gguf", "owner/m:"] {
            assert_eq!(parse(Path::new(local)), ModelSource::Local(local.into()), "{local}");
        }
        assert_eq!(default_name(Path::new("owner/m:q/m.Q8_0.gguf")), "m.Q8_0");
        let cache = scratch("gguf");
        let snapshot = cache_snapshot(&cache, "owner/m", "c9", Some("main"), &[("m.gguf", "GGUF")]);
        assert_eq!(resolve_hub_file("owner/m", "main", "m.gguf", &settings(&cache, true)), Ok(snapshot.join("m.gguf")));
        let error = resolve_hub_file("owner/m", "main", "other.gguf", &settings(&cache, true)).expect_err("absent");
        assert!(error.contains("other.gguf of owner/m@main") && error.contains("HF_HUB_OFFLINE"), "{error}");
    }

    #[test]
    fn a_complete_cached_snapshot_is_used_offline() {
        let cache = scratch("cached");
        let snapshot = cache_snapshot(&cache, "owner/tiny", "abc123", Some("main"), MODEL_FILES);
        assert_eq!(resolve_hub("owner/tiny", "main", &settings(&cache, true)), Ok(snapshot.clone()));
        // Cached and complete: no network either when not offline (the hub is unreachable here).
        assert_eq!(resolve_hub("owner/tiny", "main", &settings(&cache, false)), Ok(snapshot.clone()));
        // A pinned commit needs no ref.
        assert_eq!(resolve_hub("owner/tiny", "abc123", &settings(&cache, true)), Ok(snapshot));
    }

    #[test]
    fn a_missing_or_incomplete_snapshot_is_an_error_offline() {
        let cache = scratch("missing");
        let error = resolve_hub("owner/absent", "main", &settings(&cache, true)).expect_err("not cached");
        assert!(error.contains("HF_HUB_OFFLINE") && error.contains("owner/absent"), "{error}");
        // No weights.
        cache_snapshot(&cache, "owner/noweights", "c1", Some("main"), &MODEL_FILES[..2]);
        assert!(resolve_hub("owner/noweights", "main", &settings(&cache, true)).is_err());
        // A sharded model missing a shard.
        let index =
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        let files = [
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", "w"),
        ];
        let snapshot = cache_snapshot(&cache, "owner/sharded", "c2", Some("main"), &files);
        assert!(resolve_hub("owner/sharded", "main", &settings(&cache, true)).is_err());
        std::fs::write(snapshot.join("model-00002-of-00002.safetensors"), "w").expect("shard");
        assert_eq!(resolve_hub("owner/sharded", "main", &settings(&cache, true)), Ok(snapshot));
        // Another branch of a cached repo is not there.
        assert!(resolve_hub("owner/sharded", "dev", &settings(&cache, true)).is_err());
    }

    #[test]
    fn the_cache_location_token_and_offline_mode_follow_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            HubSettings::from_vars(move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
        };
        let s = vars(&[("HOME", "/home/u")]).expect("settings");
        assert_eq!(s.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert!(!s.offline && s.token.is_none() && s.endpoint.is_none());
        let s = vars(&[("HOME", "/home/u"), ("HF_HOME", "/data/hf"), ("HF_TOKEN", "hf_x"), ("HF_HUB_OFFLINE", "1")])
            .expect("settings");
        assert_eq!(s.cache_dir, Path::new("/data/hf/hub"));
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("hf_x"));
        let s = vars(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/c"), ("HF_HUB_OFFLINE", "0")]).expect("settings");
        assert_eq!(s.cache_dir, Path::new("/c"));
        assert!(!s.offline);
        assert!(vars(&[]).is_err());
    }
}
