//! `kandinsky download` against a Hugging Face hub stand-in on loopback (the hub's HTTP API: file
//! list, `resolve` with `ETag` / `X-Linked-Etag` / `X-Repo-Commit`, redirects of LFS files to a
//! CDN, `Range`), through `HF_ENDPOINT`: a complete download in `huggingface_hub`'s cache layout,
//! an interrupted one that resumes, a corrupted file that is refused, 401 without the token,
//! offline mode, and `generate --model <id>` from the cache.

mod common;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{bin, fixture};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Normal,
    /// The next CDN download stops after half of the file.
    CutNext,
    /// CDN downloads serve one byte changed.
    Corrupt,
}

struct Hub {
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    token: Option<String>,
    mode: Mutex<Mode>,
    range_requests: AtomicUsize,
    /// CDN downloads under way, and the most seen at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn files_of(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        // metadata() follows the fixtures' symlinked components.
        if std::fs::metadata(e.path()).unwrap().is_dir() {
            files_of(&e.path(), &format!("{name}/"), out);
        } else {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

async fn handle(State(hub): State<Arc<Hub>>, request: Request) -> Response {
    let path = request.uri().path().trim_start_matches('/').to_string();
    let authorized = hub.token.as_ref().is_none_or(|t| {
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {t}"))
    });
    let parts: Vec<&str> = path.splitn(5, '/').collect();
    if parts.len() >= 4 && parts[0] == "api" && parts[1] == "models" {
        if !authorized {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let (org, name) = (parts[2], parts[3]);
        let Some(files) = hub.repos.get(&format!("{org}/{name}")) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let siblings: Vec<_> = files
            .iter()
            .map(|(f, b)| serde_json::json!({"rfilename": f, "size": b.len()}))
            .collect();
        return axum::Json(serde_json::json!({"sha": COMMIT, "siblings": siblings}))
            .into_response();
    }
    if parts.len() == 5 && parts[2] == "resolve" {
        if !authorized {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        let file = parts[4];
        let Some(bytes) = hub.repos.get(&repo).and_then(|r| r.get(file)) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let mut h = HeaderMap::new();
        h.insert("x-repo-commit", COMMIT.parse().unwrap());
        if is_lfs(file) {
            // As the hub: LFS files redirect to the CDN; the sha256 travels in X-Linked-Etag.
            h.insert(
                "x-linked-etag",
                format!("\"{}\"", sha256(bytes)).parse().unwrap(),
            );
            h.insert("x-linked-size", bytes.len().to_string().parse().unwrap());
            h.insert("etag", "\"not-the-sha\"".parse().unwrap());
            h.insert(
                header::LOCATION,
                format!("/cdn/{repo}/{file}").parse().unwrap(),
            );
            return (StatusCode::FOUND, h).into_response();
        }
        h.insert(
            "etag",
            format!("\"{}\"", &sha256(bytes)[..40]).parse().unwrap(),
        );
        if request.method() == Method::HEAD {
            h.insert(header::CONTENT_LENGTH, bytes.len().into());
            return (StatusCode::OK, h).into_response();
        }
        return (StatusCode::OK, h, bytes.clone()).into_response();
    }
    if parts.first() == Some(&"cdn") && parts.len() >= 4 {
        let repo = format!("{}/{}", parts[1], parts[2]);
        let file = path.splitn(4, '/').nth(3).unwrap_or_default();
        let Some(bytes) = hub.repos.get(&repo).and_then(|r| r.get(file)) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let mut bytes = bytes.clone();
        let mode = *hub.mode.lock().unwrap();
        if mode == Mode::Corrupt {
            bytes[0] ^= 0xff;
        }
        let from = request
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok());
        if let Some(from) = from {
            hub.range_requests.fetch_add(1, Ordering::Relaxed);
            let rest = bytes[from..].to_vec();
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_RANGE,
                format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len())
                    .parse()
                    .unwrap(),
            );
            return (StatusCode::PARTIAL_CONTENT, h, rest).into_response();
        }
        if mode == Mode::CutNext {
            *hub.mode.lock().unwrap() = Mode::Normal;
            // Announce the whole file, send half, then fail the connection.
            let half = bytes[..bytes.len() / 2].to_vec();
            // The failure comes a moment later, once the first half has left.
            let stream = futures_util::stream::unfold(Some(half), |half| async move {
                match half {
                    Some(h) => Some((Ok(axum::body::Bytes::from(h)), None)),
                    None => {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        Some((Err(std::io::Error::other("cut")), None))
                    }
                }
            });
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, bytes.len().into());
            return (StatusCode::OK, h, Body::from_stream(stream)).into_response();
        }
        // Long enough for parallel downloads to overlap.
        let now = hub.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        hub.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        hub.in_flight.fetch_sub(1, Ordering::SeqCst);
        return (StatusCode::OK, bytes).into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

struct Running {
    url: String,
    hub: Arc<Hub>,
    _rt: tokio::runtime::Runtime,
}

fn start_hub(token: Option<&str>) -> Running {
    let mut repos = BTreeMap::new();
    for (id, dir) in [
        ("test-org/tiny-decoder", "pipelines/tiny-2-2-decoder"),
        ("test-org/tiny-prior", "pipelines/tiny-2-2-prior"),
    ] {
        let mut files = BTreeMap::new();
        files_of(Path::new(&fixture(dir)), "", &mut files);
        // What a real repository also holds and loading does not need.
        files.insert("README.md".into(), b"# a model card".to_vec());
        if id.ends_with("decoder") {
            files.insert("unet/diffusion_pytorch_model.bin".into(), vec![7; 1000]);
        }
        repos.insert(id.to_string(), files);
    }
    let hub = Arc::new(Hub {
        repos,
        token: token.map(str::to_string),
        mode: Mutex::new(Mode::Normal),
        range_requests: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(handle).with_state(hub.clone());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    Running { url, hub, _rt: rt }
}

/// `kandinsky download` with the hub stand-in and a cache: (success, stdout + stderr).
fn download(hub: &Running, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = bin();
    cmd.arg("download").args(args);
    cmd.env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

#[test]
fn download_into_the_hub_cache_layout() {
    let hub = start_hub(None);
    let cache = tempfile::tempdir().unwrap();
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-decoder"], &[]);
    assert!(ok, "{text}");
    let repo = repo_dir(cache.path(), "test-org/tiny-decoder");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let snap = repo.join("snapshots").join(COMMIT);
    let weights = snap.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let want = &hub.hub.repos["test-org/tiny-decoder"]["unet/diffusion_pytorch_model.safetensors"];
    assert_eq!(&bytes, want);
    // Relative links into blobs/, named by the sha256 for LFS files, as huggingface_hub writes.
    assert_eq!(
        std::fs::read_link(&weights).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", sha256(want)))
    );
    assert!(std::fs::read_link(snap.join("model_index.json"))
        .unwrap()
        .starts_with("../../blobs/"));
    assert!(snap.join("movq/config.json").is_file());
    // Only what loading needs: no model card, one weight format.
    assert!(!snap.join("README.md").exists());
    assert!(!snap.join("unet/diffusion_pytorch_model.bin").exists());
    // A second run fetches nothing.
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-decoder"], &[]);
    assert!(ok && text.contains("0 files fetched"), "{text}");
    // Offline refuses and says so.
    let other = tempfile::tempdir().unwrap();
    for (args, env) in [
        (vec!["test-org/tiny-decoder"], vec![("HF_HUB_OFFLINE", "1")]),
        (vec!["test-org/tiny-decoder", "--offline"], vec![]),
    ] {
        let (ok, text) = download(&hub, other.path(), &args, &env);
        assert!(!ok && text.contains("offline"), "{text}");
    }
    assert!(!repo_dir(other.path(), "test-org/tiny-decoder")
        .join("snapshots")
        .exists());
}

#[test]
fn an_interrupted_download_resumes_and_a_corrupt_file_is_refused() {
    let hub = start_hub(None);
    let cache = tempfile::tempdir().unwrap();
    *hub.hub.mode.lock().unwrap() = Mode::CutNext;
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-prior"], &[]);
    assert!(!ok && text.contains("resume"), "{text}");
    let blobs = repo_dir(cache.path(), "test-org/tiny-prior").join("blobs");
    let partial: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert_eq!(partial.len(), 1, "the cut file stays as .incomplete only");
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-prior"], &[]);
    assert!(ok, "{text}");
    assert_eq!(
        hub.hub.range_requests.load(Ordering::Relaxed),
        1,
        "resumed with a Range request"
    );
    let snap = repo_dir(cache.path(), "test-org/tiny-prior")
        .join("snapshots")
        .join(COMMIT);
    for (name, bytes) in &hub.hub.repos["test-org/tiny-prior"] {
        if name != "README.md" {
            assert_eq!(&std::fs::read(snap.join(name)).unwrap(), bytes, "{name}");
        }
    }
    // A corrupted download is refused: nothing enters the cache.
    let cache = tempfile::tempdir().unwrap();
    *hub.hub.mode.lock().unwrap() = Mode::Corrupt;
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-decoder"], &[]);
    assert!(!ok && text.contains("sha256"), "{text}");
    let repo = repo_dir(cache.path(), "test-org/tiny-decoder");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Every CDN file is corrupted: no LFS blob (64 hex digits) may be complete; downloads stopped
    // by the failure stay `.incomplete` for the next run.
    assert!(
        blobs
            .iter()
            .all(|b| b.len() == 40 || b.ends_with(".incomplete")),
        "only small git blobs and partial files: {blobs:?}"
    );
    assert!(!repo
        .join("snapshots")
        .join(COMMIT)
        .join("unet/diffusion_pytorch_model.safetensors")
        .exists());
    *hub.hub.mode.lock().unwrap() = Mode::Normal;
}

#[test]
fn a_gated_repo_needs_the_token_and_generate_uses_the_cache() {
    let hub = start_hub(Some("hf_secret"));
    let cache = tempfile::tempdir().unwrap();
    let (ok, text) = download(&hub, cache.path(), &["test-org/tiny-decoder"], &[]);
    assert!(
        !ok && text.contains("401") && text.contains("HF_TOKEN"),
        "{text}"
    );
    for id in ["test-org/tiny-decoder", "test-org/tiny-prior"] {
        let (ok, text) = download(&hub, cache.path(), &[id], &[("HF_TOKEN", "hf_secret")]);
        assert!(ok, "{text}");
    }
    // The cache serves `generate --model <id>`, with the pixels of the same run from directories.
    let out = tempfile::tempdir().unwrap();
    let run = |model: &str, prior: &str, name: &str| {
        let path = out.path().join(name);
        let o = bin()
            .args([
                "generate",
                "--model",
                model,
                "--prior",
                prior,
                "--prompt",
                "a red cat",
            ])
            .args("--width 64 --height 64 --steps 3 --prior-steps 2 --seed 5".split(' '))
            .arg("--output")
            .arg(&path)
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(path).unwrap().to_rgb8()
    };
    let from_cache = run("test-org/tiny-decoder", "test-org/tiny-prior", "cache.png");
    let from_dirs = run(
        &fixture("pipelines/tiny-2-2-decoder"),
        &fixture("pipelines/tiny-2-2-prior"),
        "dirs.png",
    );
    assert_eq!(from_cache, from_dirs);
}

/// `generate` with hub ids and the hub stand-in: (success, stdout + stderr, image).
fn generate_from_hub(
    hub: &Running,
    cache: &Path,
    extra: &[&str],
    out: &Path,
) -> (bool, String, Option<image::RgbImage>) {
    let o = bin()
        .args([
            "generate",
            "--model",
            "test-org/tiny-decoder",
            "--prior",
            "test-org/tiny-prior",
            "--prompt",
            "a red cat",
        ])
        .args("--width 64 --height 64 --steps 3 --prior-steps 2 --seed 5".split(' '))
        .args(extra)
        .arg("--output")
        .arg(out)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let image = o
        .status
        .success()
        .then(|| image::open(out).unwrap().to_rgb8());
    (o.status.success(), text, image)
}

#[test]
fn first_use_fetches_in_parallel_and_offline_names_what_is_missing() {
    let hub = start_hub(None);
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("a.png");
    // Offline with an empty cache: refused, nothing fetched.
    let (ok, text, _) = generate_from_hub(&hub, cache.path(), &["--offline"], &png);
    assert!(
        !ok && text.contains("offline") && text.contains("does not hold it"),
        "{text}"
    );
    assert!(!repo_dir(cache.path(), "test-org/tiny-decoder").exists());
    // First use: one line saying what and how much, then the download, then the image.
    let (ok, text, first) = generate_from_hub(&hub, cache.path(), &[], &png);
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("fetching test-org/tiny-decoder@main"))
        .unwrap_or_else(|| panic!("no fetch line: {text}"));
    let decoder_bytes: usize = hub.hub.repos["test-org/tiny-decoder"]
        .iter()
        .filter(|(n, _)| *n != "README.md" && !n.ends_with(".bin"))
        .map(|(_, b)| b.len())
        .sum();
    assert!(
        line.contains(&format!("{:.1} MB", decoder_bytes as f64 / 1e6))
            || line.contains(&format!("{:.1} kB", decoder_bytes as f64 / 1e3)),
        "{line} vs {decoder_bytes} bytes"
    );
    assert!(text.contains("fetching test-org/tiny-prior@main"), "{text}");
    assert!(
        hub.hub.max_in_flight.load(Ordering::SeqCst) >= 2,
        "files are fetched in parallel"
    );
    let from_dirs = {
        let o = bin()
            .args(["generate", "--prompt", "a red cat", "--model"])
            .arg(fixture("pipelines/tiny-2-2-decoder"))
            .arg("--prior")
            .arg(fixture("pipelines/tiny-2-2-prior"))
            .args("--width 64 --height 64 --steps 3 --prior-steps 2 --seed 5".split(' '))
            .arg("--output")
            .arg(out.path().join("dirs.png"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(out.path().join("dirs.png")).unwrap().to_rgb8()
    };
    assert_eq!(first.unwrap(), from_dirs);
    // Second use: no fetch at all, even without --offline.
    let (ok, text, _) = generate_from_hub(&hub, cache.path(), &[], &png);
    assert!(ok && !text.contains("fetching"), "{text}");
    // A snapshot that lost a file: offline names it; online fetches that file only.
    let snap = repo_dir(cache.path(), "test-org/tiny-decoder")
        .join("snapshots")
        .join(COMMIT);
    let weights = snap.join("unet/diffusion_pytorch_model.safetensors");
    let blob = std::fs::canonicalize(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let (ok, text, _) = generate_from_hub(&hub, cache.path(), &["--offline"], &png);
    assert!(!ok && text.contains("missing: unet/ weights"), "{text}");
    let (ok, text, again) = generate_from_hub(&hub, cache.path(), &[], &png);
    assert!(ok, "{text}");
    assert!(
        text.contains("test-org/tiny-decoder@main (0123456789ab): 1 files"),
        "{text}"
    );
    assert_eq!(again.unwrap(), from_dirs);
}
