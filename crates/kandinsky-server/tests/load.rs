//! The server under load on loopback with the small model: 50 concurrent clients for a bounded
//! time, mixing every mode, cancellations, progress streams and invalid requests, against a queue
//! smaller than the load. Every accepted job completes with its reference pixels (same request and
//! seed as before the load), every refused one gets 429 with `Retry-After`, progress streams end,
//! memory stays bounded. Prints throughput and latency percentiles.
//!
//! `KANDINSKY_LOAD_SECONDS` sets the load's duration (default 15).

mod common;

use common::{call, get, png_b64, post, start};
use kandinsky_server::ServerConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 50;

/// Resident set size of this process (server and clients), bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The requests of the load, by name: every mode, two seeds.
fn requests() -> Vec<(String, Value)> {
    let drawing = png_b64(64, 64, |x, y| {
        if (16..48).contains(&x) && (16..48).contains(&y) {
            [200, 30, 30]
        } else {
            [240, 240, 40]
        }
    });
    let mask = png_b64(64, 64, |x, _| if x >= 32 { [255; 3] } else { [0; 3] });
    let small = png_b64(48, 48, |_, _| [240, 240, 40]);
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
        for (name, body) in [
            ("text", with(json!({}))),
            ("euler-a", with(json!({"sampler": "euler-a"}))),
            (
                "image",
                with(json!({"mode": "image_to_image", "image": drawing, "strength": 0.5})),
            ),
            (
                "inpaint",
                with(json!({"mode": "inpainting", "image": drawing, "mask": mask})),
            ),
            (
                "outpaint",
                with(json!({"mode": "outpainting", "image": small, "margins": {"left": 16}})),
            ),
            (
                "mix",
                with(
                    json!({"mode": "mixing", "inputs": [{"text": "a red circle", "weight": 0.5}, {"image": drawing, "weight": 0.5}]}),
                ),
            ),
            (
                "variations",
                with(json!({"mode": "variations", "image": drawing})),
            ),
        ] {
            out.push((format!("{name}-{seed}"), body));
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
    let mut response = common::agent()
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
    let s = start(ServerConfig {
        queue: 4,
        ..ServerConfig::default()
    });
    let url = s.url.clone();
    // References: each request once, before the load.
    let requests = requests();
    let mut reference = BTreeMap::new();
    for (name, body) in &requests {
        let (status, v) = post(&format!("{url}/api/v1/jobs?wait=true"), body);
        assert_eq!(
            (status, v["state"].as_str()),
            (200, Some("done")),
            "{name}: {v:.300}"
        );
        reference.insert(name.clone(), v["result"]["images"].clone());
    }
    let rss_before = rss();
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
                while Instant::now() < end {
                    i += CLIENTS;
                    let (name, body) = &requests[i % requests.len()];
                    match i % 10 {
                        // Invalid requests: a 4xx that says what is wrong, never a 5xx.
                        0 => {
                            let bad = INVALID[(i / 10) % INVALID.len()];
                            let (status, v, _) = call("POST", &jobs, Some(bad), &[]);
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
                            let (status, v, _) = call("POST", &jobs, Some(&body.to_string()), &[]);
                            if status == 429 {
                                tally.lock().unwrap().refused += 1;
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                            assert_eq!(status, 202, "{v}");
                            let id = v["id"].as_str().unwrap().to_string();
                            if i % 10 == 1 {
                                let (_, v, _) = call("DELETE", &format!("{jobs}/{id}"), None, &[]);
                                let state = v["state"].as_str().unwrap_or("").to_string();
                                let end_state = stream_end(&url, &id);
                                let mut t = tally.lock().unwrap();
                                if matches!(end_state.as_str(), "cancelled" | "done") {
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
                                if end_state == "done" && v["result"]["images"] == reference[name] {
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
                                &[],
                            );
                            let mut t = tally.lock().unwrap();
                            match status {
                                200 if v["result"]["images"] == reference[name] => {
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
    let rss_after = rss();
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
