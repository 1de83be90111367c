//! `kandinsky serve` under load on loopback with the small model, as a user runs it: 50 concurrent
//! clients for a bounded time, mixing every mode, cancellations, progress streams and invalid
//! requests, against a queue smaller than the load. Every accepted job completes with the pixels
//! the CLI gives for the same parameters and seed (`kandinsky generate`, `img2img`, `inpaint`,
//! `outpaint`, `mix`, `variations`), every refused one gets 429 with `Retry-After`, progress
//! streams end, the server's memory stays bounded. Prints throughput and latency percentiles.
//!
//! `KANDINSKY_LOAD_SECONDS` sets the load's duration (default 15).

mod common;

use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 50;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// `(status, JSON body, Retry-After)` of a request.
fn call(method: &str, url: &str, body: Option<&str>) -> (u16, Value, Option<String>) {
    let agent = agent();
    let mut response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, body) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.unwrap_or("").as_bytes()),
    }
    .expect("request");
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.body_mut().read_to_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json, retry)
}

fn get(url: &str) -> (u16, Value) {
    let (s, v, _) = call("GET", url, None);
    (s, v)
}

/// The pixels of a response's images.
fn pixels(images: &Value) -> Vec<image::RgbImage> {
    images
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b64| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.as_str().expect("a base64 string"))
                        .expect("base64");
                    image::load_from_memory(&bytes).expect("png").to_rgb8()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Resident set size of the server process, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Writes an RGB PNG and returns its base64.
fn png(path: &Path, width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> String {
    image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)))
        .save(path)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

/// The requests of the load, by name: every mode, two seeds; each with its CLI arguments.
fn requests(dir: &Path) -> Vec<(String, Value, Vec<String>)> {
    let file = |name: &str| dir.join(name).display().to_string();
    let drawing = png(&dir.join("drawing.png"), 64, 64, |x, y| {
        if (16..48).contains(&x) && (16..48).contains(&y) {
            [200, 30, 30]
        } else {
            [240, 240, 40]
        }
    });
    let mask = png(&dir.join("mask.png"), 64, 64, |x, _| {
        if x >= 32 {
            [255; 3]
        } else {
            [0; 3]
        }
    });
    let small = png(&dir.join("small.png"), 48, 48, |_, _| [240, 240, 40]);
    let prompt = "a large blue square in the centre on a yellow background";
    let mut out = Vec::new();
    for seed in [1, 2] {
        let base = json!({"prompt": prompt, "steps": 4, "prior_steps": 2, "seed": seed});
        let with = |extra: Value| {
            let mut b = base.clone();
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let cli = |command: &str, extra: &[&str]| {
            let mut args = common::strings(&[command]);
            if command != "mix" && command != "variations" {
                args.extend(common::strings(&["--prompt", prompt]));
            }
            args.extend(common::strings(&[
                "--steps",
                "4",
                "--prior-steps",
                "2",
                "--seed",
                &seed.to_string(),
            ]));
            args.extend(common::strings(extra));
            args
        };
        for (name, body, args) in [
            ("text", with(json!({})), cli("generate", &[])),
            (
                "euler-a",
                with(json!({"sampler": "euler-a"})),
                cli("generate", &["--scheduler", "euler-a"]),
            ),
            (
                "image",
                with(json!({"mode": "image_to_image", "image": drawing, "strength": 0.5})),
                cli(
                    "img2img",
                    &["--image", &file("drawing.png"), "--strength", "0.5"],
                ),
            ),
            (
                "inpaint",
                with(json!({"mode": "inpainting", "image": drawing, "mask": mask})),
                cli(
                    "inpaint",
                    &["--image", &file("drawing.png"), "--mask", &file("mask.png")],
                ),
            ),
            (
                "outpaint",
                with(json!({"mode": "outpainting", "image": small, "margins": {"left": 16}})),
                cli("outpaint", &["--image", &file("small.png"), "--left", "16"]),
            ),
            (
                "mix",
                with(
                    json!({"mode": "mixing", "inputs": [{"text": "a red circle", "weight": 0.5}, {"image": drawing, "weight": 0.5}]}),
                ),
                cli(
                    "mix",
                    &[
                        "--input",
                        "a red circle",
                        "--weight",
                        "0.5",
                        "--input",
                        &file("drawing.png"),
                        "--weight",
                        "0.5",
                    ],
                ),
            ),
            (
                "variations",
                with(json!({"mode": "variations", "image": drawing})),
                cli("variations", &["--image", &file("drawing.png")]),
            ),
        ] {
            out.push((format!("{name}-{seed}"), body, args));
        }
    }
    out
}

const INVALID: [&str; 4] = [
    r#"{"prompt": "x", "steps": 0}"#,
    r#"{"prompt": "x", "width": 100000}"#,
    r#"{"prompt": "x", "mode": "inpainting"}"#,
    r#"{"prompt": "#,
];

#[derive(Default)]
struct Tally {
    done: usize,
    refused: usize,
    cancelled: usize,
    invalid: usize,
    streams: usize,
    latencies: Vec<f64>,
    failures: Vec<String>,
}

/// Reads a job's event stream to its end; its last state.
fn stream_end(url: &str, id: &str) -> String {
    let mut response = agent()
        .get(&format!("{url}/api/v1/jobs/{id}/events"))
        .call()
        .unwrap();
    let reader = std::io::BufReader::new(response.body_mut().as_reader());
    let mut last = Value::Null;
    for line in reader.lines() {
        if let Some(data) = line.unwrap().strip_prefix("data: ") {
            last = serde_json::from_str(data).unwrap();
        }
    }
    last["state"].as_str().unwrap_or("none").to_string()
}

#[test]
fn fifty_clients_against_a_small_queue() {
    let seconds: u64 = std::env::var("KANDINSKY_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut reference = BTreeMap::new();
    let dir = tempfile::tempdir().unwrap();
    let requests: Vec<(String, Value)> = requests(dir.path())
        .into_iter()
        .map(|(name, body, args)| {
            // The reference: what the CLI writes for the same parameters and seed.
            let out = dir.path().join(format!("{name}.png"));
            common::run_ok(&args, &out);
            reference.insert(name.clone(), vec![image::open(&out).unwrap().to_rgb8()]);
            (name, body)
        })
        .collect();
    let s = common::serve(&["--queue", "4"]);
    let url = s.url.clone();
    // Each request once before the load (which also loads both decoders): the CLI's pixels.
    for (name, body) in &requests {
        let (status, v, _) = call(
            "POST",
            &format!("{url}/api/v1/jobs?wait=true"),
            Some(&body.to_string()),
        );
        assert_eq!(
            (status, v["state"].as_str()),
            (200, Some("done")),
            "{name}: {v:.300}"
        );
        assert!(
            pixels(&v["result"]["images"]) == reference[name],
            "{name}: the server's pixels differ from the CLI's"
        );
    }
    let rss_before = rss(s.child.id());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let requests = Arc::new(requests);
    let reference = Arc::new(reference);
    let end = Instant::now() + Duration::from_secs(seconds);
    let start_load = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, tally, requests, reference) = (
                url.clone(),
                tally.clone(),
                requests.clone(),
                reference.clone(),
            );
            std::thread::spawn(move || {
                let jobs = format!("{url}/api/v1/jobs");
                let mut i = c;
                // With 50 clients on a queue of 4 a slot is won by chance; the clients that cancel
                // (one in ten) go on past the end until each has cancelled once, so that a run in
                // which they never won a slot does not read as cancellation failing.
                let mut cancelled_once = false;
                let overtime = end + Duration::from_secs(60);
                while Instant::now() < end
                    || (c % 10 == 1 && !cancelled_once && Instant::now() < overtime)
                {
                    i += CLIENTS;
                    let (name, body) = &requests[i % requests.len()];
                    match i % 10 {
                        // Invalid requests: a 4xx that says what is wrong, never a 5xx.
                        0 => {
                            let bad = INVALID[(i / 10) % INVALID.len()];
                            let (status, v, _) = call("POST", &jobs, Some(bad));
                            let mut t = tally.lock().unwrap();
                            if (400..500).contains(&status) && status != 429 {
                                assert!(v["error"].is_string(), "{v}");
                                t.invalid += 1;
                            } else if status == 429 {
                                t.refused += 1;
                            } else {
                                t.failures.push(format!("invalid {bad}: {status} {v}"));
                            }
                            drop(t);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        // Submitted, then cancelled (queued or running), or followed to its end.
                        1 | 2 => {
                            let (status, v, _) = call("POST", &jobs, Some(&body.to_string()));
                            if status == 429 {
                                tally.lock().unwrap().refused += 1;
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                            assert_eq!(status, 202, "{v}");
                            let id = v["id"].as_str().unwrap().to_string();
                            if i % 10 == 1 {
                                let (_, v, _) = call("DELETE", &format!("{jobs}/{id}"), None);
                                let state = v["state"].as_str().unwrap_or("").to_string();
                                let end_state = stream_end(&url, &id);
                                let mut t = tally.lock().unwrap();
                                if matches!(end_state.as_str(), "cancelled" | "done") {
                                    cancelled_once = true;
                                    t.cancelled += 1;
                                    t.streams += 1;
                                } else {
                                    t.failures.push(format!("cancel: {state} → {end_state}"));
                                }
                            } else {
                                let end_state = stream_end(&url, &id);
                                let (_, v) = get(&format!("{jobs}/{id}"));
                                let mut t = tally.lock().unwrap();
                                t.streams += 1;
                                if end_state == "done"
                                    && pixels(&v["result"]["images"]) == reference[name]
                                {
                                    t.done += 1;
                                } else {
                                    t.failures.push(format!("{name} streamed: {end_state}"));
                                }
                            }
                        }
                        // Waited for: the reference pixels.
                        _ => {
                            let t0 = Instant::now();
                            let (status, v, retry) = call(
                                "POST",
                                &format!("{jobs}?wait=true"),
                                Some(&body.to_string()),
                            );
                            let mut t = tally.lock().unwrap();
                            match status {
                                200 if pixels(&v["result"]["images"]) == reference[name] => {
                                    t.done += 1;
                                    t.latencies.push(t0.elapsed().as_secs_f64());
                                }
                                429 => {
                                    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()));
                                    t.refused += 1;
                                    drop(t);
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                                _ => t.failures.push(format!("{name}: {status} {v:.200}")),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = start_load.elapsed().as_secs_f64();
    // The server is still healthy and drains.
    let (status, _) = get(&format!("{url}/api/v1/models"));
    assert_eq!(status, 200);
    let rss_after = rss(s.child.id());
    let mut t = tally.lock().unwrap();
    t.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let l = &t.latencies;
        l[((l.len() - 1) as f64 * p).round() as usize]
    };
    eprintln!(
        "{CLIENTS} clients, {seconds} s (ran {elapsed:.1} s): {} jobs done ({:.2}/s), {} refused (429), {} cancelled, {} invalid (4xx), {} progress streams ended; waited jobs p50 {:.2} s, p99 {:.2} s; RSS {:.0} MB before, {:.0} MB after",
        t.done,
        t.done as f64 / elapsed,
        t.refused,
        t.cancelled,
        t.invalid,
        t.streams,
        pct(0.5),
        pct(0.99),
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6,
    );
    assert!(t.failures.is_empty(), "{:#?}", t.failures);
    assert!(t.done >= 10 && t.refused > 0 && t.invalid > 0 && t.cancelled > 0);
    // Bounded: finished jobs are kept (64 at most) and dropped after; nothing grows with the load.
    assert!(
        rss_after < rss_before + 400_000_000,
        "RSS grew from {rss_before} to {rss_after}"
    );
}
