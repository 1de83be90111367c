//! Downloading a pipeline repository from the Hugging Face hub into the hub cache, in exactly
//! the layout of Python's `huggingface_hub` (`blobs/<etag>`, `snapshots/<commit>/<file>` relative
//! symlinks, `refs/<revision>`), so diffusers and we share one cache both ways.
//!
//! Only what a pipeline needs is fetched: `model_index.json`, and for each component its configs,
//! tokenizer files and one weight format (fp16 safetensors variant, else safetensors, else
//! `.bin`). Files are written to `blobs/<etag>.incomplete`, resumed with `Range` requests after
//! an interruption, checked against their sha256 (the hub's ETag of LFS files) and only then
//! renamed into place. `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`, `HF_HUB_CACHE` and
//! `HF_HUB_OFFLINE` are honoured.

use crate::error::{Error, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The access token (`HF_TOKEN`).
    pub token: Option<String>,
    /// The cache directory ([`super::hf_hub_cache`]).
    pub cache: PathBuf,
    /// Refuse any network access (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// The options from the environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN"),
            cache: super::hf_hub_cache(),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
        }
    }
}

/// One file of a repository.
#[derive(Debug, Clone, Deserialize)]
pub struct RepoFile {
    /// Its path in the repository.
    pub rfilename: String,
    /// Its size in bytes, when the hub says.
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<RepoFile>,
}

/// What a download did.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The snapshot directory (usable as a model directory).
    pub snapshot: PathBuf,
    /// The commit.
    pub commit: String,
    /// Files fetched now, and bytes fetched.
    pub fetched: (usize, u64),
    /// Files already in the cache.
    pub cached: usize,
}

/// Progress of a [`fetch`]: bytes of the files being fetched (resumed bytes count as done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStatus {
    /// Bytes on disk so far, over every file of the fetch.
    pub done: u64,
    /// Bytes of every file of the fetch.
    pub total: u64,
    /// Files finished (checked and in the cache).
    pub files_done: usize,
    /// Files of the fetch.
    pub files: usize,
}

/// Progress reports, called from the download threads.
pub type HubProgress<'a> = &'a (dyn Fn(HubStatus) + Sync);

/// Files fetched at once by [`fetch`].
pub const PARALLEL_FILES: usize = 4;

fn hub_error(repo: &str, message: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("downloading {repo}: {}", message.into()))
}

/// The files of a diffusers pipeline repository that loading it needs.
pub fn pipeline_files(files: &[RepoFile]) -> Vec<RepoFile> {
    let names: Vec<&str> = files.iter().map(|f| f.rfilename.as_str()).collect();
    let mut keep = Vec::new();
    let mut dirs: Vec<&str> = names
        .iter()
        .filter_map(|n| n.split_once('/').map(|(d, _)| d))
        .collect();
    dirs.sort();
    dirs.dedup();
    for f in files {
        let n = f.rfilename.as_str();
        if n == "model_index.json" {
            keep.push(f.clone());
        }
    }
    for dir in dirs {
        let in_dir: Vec<&RepoFile> = files
            .iter()
            .filter(|f| {
                f.rfilename
                    .split_once('/')
                    .is_some_and(|(d, rest)| d == dir && !rest.contains('/'))
            })
            .collect();
        let is_weight = |n: &str| {
            n.ends_with(".safetensors")
                || n.ends_with(".bin")
                || n.ends_with(".safetensors.index.json")
                || n.ends_with(".bin.index.json")
                || n.ends_with(".ckpt")
                || n.ends_with(".msgpack")
                || n.ends_with(".h5")
                || n.ends_with(".onnx")
                || n.ends_with(".pb")
        };
        for f in &in_dir {
            let n = &f.rfilename;
            if !is_weight(n)
                && (n.ends_with(".json") || n.ends_with(".txt") || n.ends_with(".model"))
            {
                keep.push((*f).clone());
            }
        }
        // One weight format: fp16 safetensors, else safetensors, else .bin.
        let pick = |pred: &dyn Fn(&str) -> bool| -> Vec<RepoFile> {
            in_dir
                .iter()
                .filter(|f| pred(&f.rfilename))
                .map(|f| (*f).clone())
                .collect()
        };
        let fp16 = pick(&|n| {
            n.contains(".fp16")
                && (n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json"))
        });
        let st = pick(&|n| {
            !n.contains(".fp16")
                && (n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json"))
        });
        let bin = pick(&|n| {
            !n.contains(".fp16") && (n.ends_with(".bin") || n.ends_with(".bin.index.json"))
        });
        keep.extend(if !fp16.is_empty() {
            fp16
        } else if !st.is_empty() {
            st
        } else {
            bin
        });
    }
    keep
}

/// The cache folder of a repository: `models--org--name`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

struct Client {
    agent: ureq::Agent,
    /// For `HEAD`: redirects are not followed, so the hub's own headers (`X-Linked-Etag`, the
    /// sha256 of LFS files) are read, not the CDN's.
    meta: ureq::Agent,
    options: HubOptions,
}

impl Client {
    fn head(&self, url: &str) -> std::result::Result<ureq::http::Response<ureq::Body>, String> {
        let mut request = self.meta.head(url);
        if let Some(t) = &self.options.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        request.call().map_err(|e| e.to_string())
    }

    fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, String> {
        let mut request = self.agent.get(url);
        if let Some(t) = &self.options.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        if range_from > 0 {
            request = request.header("Range", format!("bytes={range_from}-"));
        }
        request.call().map_err(|e| e.to_string())
    }
}

fn status_error(repo: &str, what: &str, status: u16) -> Error {
    let why = match status {
        401 | 403 => {
            "the hub refused access (401/403): the repository is gated or private; set HF_TOKEN"
        }
        404 => "not found on the hub (404): check the repository id and revision",
        _ => "the hub answered with an error",
    };
    hub_error(repo, format!("{what}: HTTP {status}: {why}"))
}

/// One file a [`Plan`] fetches.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// Its path in the repository.
    pub rfilename: String,
    /// Its blob name: the sha256 of LFS files, the git sha1 of the others.
    pub etag: String,
    /// Its size in bytes (0 when the hub does not say).
    pub size: u64,
    /// Bytes already in `blobs/<etag>.incomplete` from an interrupted download.
    pub partial: u64,
}

/// What [`fetch`] will do: the repository's commit and the files it lacks.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The repository id.
    pub repo: String,
    /// The revision asked for (branch, tag or commit).
    pub revision: String,
    /// The commit it names.
    pub commit: String,
    /// Files to fetch.
    pub files: Vec<PlannedFile>,
    /// Files of the pipeline already in the snapshot.
    pub cached: Vec<String>,
    /// The cache's folder of the repository.
    pub folder: PathBuf,
}

impl Plan {
    /// Bytes still to transfer (sizes less the resumable parts).
    pub fn bytes_to_fetch(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.size.saturating_sub(f.partial))
            .sum()
    }

    /// The snapshot directory (usable as a model directory once fetched).
    pub fn snapshot(&self) -> PathBuf {
        self.folder.join("snapshots").join(&self.commit)
    }
}

impl Client {
    fn new(options: &HubOptions) -> Self {
        Client {
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
            meta: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .max_redirects_will_error(false)
                .build()
                .into(),
            options: options.clone(),
        }
    }

    fn resolve_url(&self, repo: &str, commit: &str, rfilename: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{rfilename}",
            self.options.endpoint
        )
    }
}

fn offline_error(repo: &str, options: &HubOptions) -> Error {
    let folder = repo_folder(&options.cache, repo);
    let what = match cached_snapshot(repo, "main", &options.cache) {
        Some(snapshot) => {
            let missing = missing_files(&snapshot);
            if missing.is_empty() {
                "holds a complete snapshot of another revision".to_string()
            } else {
                format!("holds only part of it; missing: {}", missing.join(", "))
            }
        }
        None if folder.is_dir() => "holds only part of it (no snapshot)".to_string(),
        None => "does not hold it".to_string(),
    };
    hub_error(
        repo,
        format!(
            "offline (HF_HUB_OFFLINE / --offline): nothing is fetched; the cache {} {what}",
            options.cache.display()
        ),
    )
}

/// Asks the hub what a pipeline repository holds and which of its files the cache lacks (one
/// `HEAD` per missing file for its ETag and size). Nothing is written.
pub fn plan(repo: &str, revision: &str, options: &HubOptions) -> Result<Plan> {
    if options.offline {
        return Err(offline_error(repo, options));
    }
    let client = Client::new(options);
    let info_url = format!(
        "{}/api/models/{repo}/revision/{revision}?blobs=true",
        options.endpoint
    );
    let mut response = client
        .get(&info_url, 0)
        .map_err(|e| hub_error(repo, format!("cannot reach {}: {e}", options.endpoint)))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(status_error(repo, "listing its files", status));
    }
    let info: RepoInfo = serde_json::from_reader(response.body_mut().as_reader())
        .map_err(|e| hub_error(repo, format!("unreadable file list: {e}")))?;
    let wanted = pipeline_files(&info.siblings);
    if !wanted.iter().any(|f| f.rfilename == "model_index.json") {
        return Err(hub_error(
            repo,
            "no model_index.json: not a diffusers pipeline repository",
        ));
    }
    if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(hub_error(repo, "the hub named no usable commit"));
    }
    let folder = repo_folder(&options.cache, repo);
    let snapshot = folder.join("snapshots").join(&info.sha);
    let mut plan = Plan {
        repo: repo.to_string(),
        revision: revision.to_string(),
        commit: info.sha,
        files: Vec::new(),
        cached: Vec::new(),
        folder,
    };
    for file in wanted {
        if !safe_relative(&file.rfilename) {
            return Err(hub_error(
                repo,
                format!("refusing the file name {:?}", file.rfilename),
            ));
        }
        if snapshot.join(&file.rfilename).exists() {
            plan.cached.push(file.rfilename);
            continue;
        }
        let url = client.resolve_url(repo, &plan.commit, &file.rfilename);
        let head = client
            .head(&url)
            .map_err(|e| hub_error(repo, format!("{}: {e}", file.rfilename)))?;
        let status = head.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(status_error(repo, &file.rfilename, status));
        }
        let header = |k: &str| {
            head.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
        };
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .ok_or_else(|| hub_error(repo, format!("{}: no usable ETag", file.rfilename)))?;
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|v| v.parse().ok())
            .or(file.size)
            .unwrap_or(0);
        let blobs = plan.folder.join("blobs");
        if blobs.join(&etag).is_file() {
            // The blob is there (another revision, or a link that was removed): link it only.
            link_blob(&snapshot.join(&file.rfilename), &etag, &file.rfilename)?;
            plan.cached.push(file.rfilename);
            continue;
        }
        let partial = std::fs::metadata(blobs.join(format!("{etag}.incomplete")))
            .map_or(0, |m| m.len())
            .min(size);
        plan.files.push(PlannedFile {
            rfilename: file.rfilename,
            etag,
            size,
            partial,
        });
    }
    Ok(plan)
}

/// A repository path that stays inside the snapshot.
fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Fetches a [`Plan`]'s files, [`PARALLEL_FILES`] at a time, each checked before it enters the
/// cache; writes `refs/<revision>`. The first failure stops the others (their partial files stay
/// for the next run to resume).
pub fn fetch(plan: &Plan, options: &HubOptions, progress: HubProgress) -> Result<Downloaded> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    let blobs = plan.folder.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
    let client = Client::new(options);
    let total: u64 = plan.files.iter().map(|f| f.size).sum();
    let done = AtomicU64::new(plan.files.iter().map(|f| f.partial).sum());
    let fetched_bytes = AtomicU64::new(0);
    let files_done = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let errors = std::sync::Mutex::new(Vec::new());
    let report = || {
        progress(HubStatus {
            done: done.load(Ordering::Relaxed),
            total,
            files_done: files_done.load(Ordering::Relaxed),
            files: plan.files.len(),
        })
    };
    report();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_FILES.min(plan.files.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.files.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let file = &plan.files[i];
                let on_bytes = |n: u64, restart: u64| {
                    // A server that ignores `Range` sends the file again from its start.
                    done.fetch_sub(restart, Ordering::Relaxed);
                    done.fetch_add(n, Ordering::Relaxed);
                    fetched_bytes.fetch_add(n, Ordering::Relaxed);
                    report();
                };
                match fetch_one(&client, plan, file, &stop, &on_bytes) {
                    Ok(()) => {
                        files_done.fetch_add(1, Ordering::Relaxed);
                        report();
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .next()
    {
        return Err(e);
    }
    let refs = plan.folder.join("refs");
    std::fs::create_dir_all(&refs).map_err(|e| io(&refs, e))?;
    if plan.revision != plan.commit {
        let r = refs.join(&plan.revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&r, &plan.commit).map_err(|e| io(&r, e))?;
    }
    Ok(Downloaded {
        snapshot: plan.snapshot(),
        commit: plan.commit.clone(),
        fetched: (plan.files.len(), fetched_bytes.into_inner()),
        cached: plan.cached.len(),
    })
}

/// One file: `blobs/<etag>.incomplete` (resumed with `Range`), checked, renamed to its blob,
/// linked from the snapshot.
fn fetch_one(
    client: &Client,
    plan: &Plan,
    file: &PlannedFile,
    stop: &std::sync::atomic::AtomicBool,
    on_bytes: &dyn Fn(u64, u64),
) -> Result<()> {
    let repo = plan.repo.as_str();
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    let blobs = plan.folder.join("blobs");
    let blob = blobs.join(&file.etag);
    let partial = blobs.join(format!("{}.incomplete", file.etag));
    let url = client.resolve_url(repo, &plan.commit, &file.rfilename);
    let have = if file.size > 0 && file.partial >= file.size {
        0
    } else {
        file.partial
    };
    let mut response = client
        .get(&url, have)
        .map_err(|e| hub_error(repo, format!("{}: {e}", file.rfilename)))?;
    let status = response.status().as_u16();
    if status != 200 && status != 206 {
        return Err(status_error(repo, &file.rfilename, status));
    }
    let resumed = status == 206;
    if !resumed && file.partial > 0 {
        on_bytes(0, file.partial);
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&partial)
        .map_err(|e| io(&partial, e))?;
    let mut done = if resumed { have } else { 0 };
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(hub_error(
                repo,
                format!("{}: stopped after {done} bytes", file.rfilename),
            ));
        }
        let n = reader.read(&mut buf).map_err(|e| {
            hub_error(
                repo,
                format!(
                    "{}: interrupted after {done} bytes ({e}); run again to resume",
                    file.rfilename
                ),
            )
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| io(&partial, e))?;
        done += n as u64;
        on_bytes(n as u64, 0);
    }
    out.sync_all().map_err(|e| io(&partial, e))?;
    drop(out);
    if file.size > 0 && done != file.size {
        return Err(hub_error(
            repo,
            format!(
                "{}: got {done} of {} bytes; run again to resume",
                file.rfilename, file.size
            ),
        ));
    }
    if file.etag.len() == 64 {
        let digest = sha256_of(&partial)?;
        if digest != file.etag {
            let _ = std::fs::remove_file(&partial);
            return Err(hub_error(
                repo,
                format!(
                    "{}: its sha256 {digest} is not the hub's {}; the file was discarded",
                    file.rfilename, file.etag
                ),
            ));
        }
    }
    std::fs::rename(&partial, &blob).map_err(|e| io(&blob, e))?;
    link_blob(
        &plan.snapshot().join(&file.rfilename),
        &file.etag,
        &file.rfilename,
    )
}

/// Downloads what a pipeline repository needs into the cache and returns its snapshot:
/// [`plan`], then [`fetch`].
pub fn download(
    repo: &str,
    revision: &str,
    options: &HubOptions,
    progress: HubProgress,
) -> Result<Downloaded> {
    fetch(&plan(repo, revision, options)?, options, progress)
}

/// The snapshot of `repo`'s `main` for loading: the cached one when it is complete (no network
/// access at all), else — unless offline — what [`plan`] finds missing is fetched, after
/// `on_plan` has been told what and how much.
pub fn ensure(
    repo: &str,
    options: &HubOptions,
    on_plan: &mut dyn FnMut(&Plan),
    progress: HubProgress,
) -> Result<PathBuf> {
    if let Some(snapshot) = cached_snapshot(repo, "main", &options.cache) {
        if missing_files(&snapshot).is_empty() {
            return Ok(snapshot);
        }
    }
    let plan = plan(repo, "main", options)?;
    if !plan.files.is_empty() {
        on_plan(&plan);
    }
    Ok(fetch(&plan, options, progress)?.snapshot)
}

/// The cached snapshot of `repo` at `revision` (what `refs/<revision>` names, or the revision
/// itself when it is a cached commit), complete or not.
pub fn cached_snapshot(repo: &str, revision: &str, cache: &Path) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = folder.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// What a pipeline directory lacks for loading: `model_index.json`, and per component of it a
/// folder whose model components hold a config and weights (dangling cache links count as
/// missing). Empty when it looks complete.
pub fn missing_files(dir: &Path) -> Vec<String> {
    let Ok(index) = super::ModelIndex::load(dir) else {
        return vec!["model_index.json".into()];
    };
    let mut missing = Vec::new();
    for name in index.components.keys() {
        let sub = dir.join(name);
        let files: Vec<String> = std::fs::read_dir(&sub)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if files.is_empty() {
            missing.push(format!("{name}/"));
            continue;
        }
        let has_config = files.iter().any(|f| f == "config.json");
        let has_weights = files.iter().any(|f| {
            f.ends_with(".safetensors") || f.ends_with(".bin") || f.ends_with(".index.json")
        });
        if has_config && !has_weights {
            missing.push(format!("{name}/ weights"));
        }
    }
    missing
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (one more `..` per folder of the file).
fn link_blob(link: &Path, etag: &str, rfilename: &str) -> Result<()> {
    let parent = link.parent().expect("a file in a snapshot");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let depth = rfilename.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, link).map_err(|e| Error::io(link, e))
    }
    #[cfg(not(unix))]
    {
        let blob = parent.join(&target);
        std::fs::copy(&blob, link)
            .map(|_| ())
            .map_err(|e| Error::io(link, e))
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
