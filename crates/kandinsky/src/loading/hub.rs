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

/// Progress reports: `(file, bytes done, bytes total)`.
pub type HubProgress<'a> = &'a mut dyn FnMut(&str, u64, u64);

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

/// Downloads what a pipeline repository needs into the cache and returns its snapshot.
pub fn download(
    repo: &str,
    revision: &str,
    options: &HubOptions,
    progress: HubProgress,
) -> Result<Downloaded> {
    let folder = repo_folder(&options.cache, repo);
    if options.offline {
        return Err(hub_error(
            repo,
            format!(
                "offline (HF_HUB_OFFLINE / --offline): nothing is fetched; the cache {} {}",
                folder.display(),
                if folder.is_dir() {
                    "holds only part of it or another revision"
                } else {
                    "does not hold it"
                }
            ),
        ));
    }
    let client = Client {
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
    };
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
    let files = pipeline_files(&info.siblings);
    if !files.iter().any(|f| f.rfilename == "model_index.json") {
        return Err(hub_error(
            repo,
            "no model_index.json: not a diffusers pipeline repository",
        ));
    }
    let commit = info.sha;
    let blobs = folder.join("blobs");
    let snapshot = folder.join("snapshots").join(&commit);
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
    let (mut fetched, mut bytes, mut cached) = (0, 0, 0);
    for file in &files {
        let link = snapshot.join(&file.rfilename);
        if link.exists() {
            cached += 1;
            continue;
        }
        let url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            options.endpoint, file.rfilename
        );
        // The ETag names the blob: the sha256 of LFS files, the git sha1 of the others.
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
        let total = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|v| v.parse().ok())
            .or(file.size)
            .unwrap_or(0);
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            let partial = blobs.join(format!("{etag}.incomplete"));
            let mut have = std::fs::metadata(&partial).map_or(0, |m| m.len());
            if have >= total {
                have = 0;
            }
            // Resume: ask for the rest only.
            let mut response = client
                .get(&url, have)
                .map_err(|e| hub_error(repo, format!("{}: {e}", file.rfilename)))?;
            let status = response.status().as_u16();
            if status != 200 && status != 206 {
                return Err(status_error(repo, &file.rfilename, status));
            }
            let resumed = response.status().as_u16() == 206;
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
                bytes += n as u64;
                progress(&file.rfilename, done, total);
            }
            out.sync_all().map_err(|e| io(&partial, e))?;
            drop(out);
            if total > 0 && done != total {
                return Err(hub_error(
                    repo,
                    format!(
                        "{}: got {done} of {total} bytes; run again to resume",
                        file.rfilename
                    ),
                ));
            }
            if etag.len() == 64 {
                let digest = sha256_of(&partial)?;
                if digest != etag {
                    let _ = std::fs::remove_file(&partial);
                    return Err(hub_error(
                        repo,
                        format!(
                            "{}: its sha256 {digest} is not the hub's {etag}; the file was discarded",
                            file.rfilename
                        ),
                    ));
                }
            }
            std::fs::rename(&partial, &blob).map_err(|e| io(&blob, e))?;
            fetched += 1;
        } else {
            cached += 1;
        }
        link_blob(&link, &etag, &file.rfilename)?;
    }
    let refs = folder.join("refs");
    std::fs::create_dir_all(&refs).map_err(|e| io(&refs, e))?;
    if revision != commit {
        let r = refs.join(revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&r, &commit).map_err(|e| io(&r, e))?;
    }
    Ok(Downloaded {
        snapshot,
        commit,
        fetched: (fetched, bytes),
        cached,
    })
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
