//! The HTTP APIs on loopback with the shipped small model: every mode, the limits (each a 4xx
//! that says what is wrong), the queue (429, cancel, positions, progress events), 8 concurrent
//! clients, the A1111 subset and the token.

mod common;

use common::{call, decode, get, png_b64, post, start};
use kandinsky_server::ServerConfig;
use serde_json::{json, Value};
use std::io::BufRead;

const PROMPT: &str = "a large blue square in the centre on a yellow background";

fn job(url: &str, body: Value) -> Value {
    let (status, v) = post(&format!("{url}/api/v1/jobs?wait=true"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "done", "{v}");
    v
}

#[test]
fn every_mode_through_the_native_api() {
    let s = start(ServerConfig::default());
    let (status, models) = get(&format!("{}/api/v1/models", s.url));
    assert_eq!(status, 200);
    assert_eq!(models[0]["name"], "small");
    assert_eq!(models[0]["native_size"], 64);
    let drawing = png_b64(64, 64, |x, y| {
        if (16..48).contains(&x) && (16..48).contains(&y) {
            [200, 30, 30]
        } else {
            [240, 240, 40]
        }
    });
    let base = json!({"prompt": PROMPT, "steps": 8, "prior_steps": 4, "seed": 3});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let t2i = job(&s.url, with(json!({"num_images": 2})));
    let images = t2i["result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(decode(&images[0]).dimensions(), (64, 64));
    assert_eq!(t2i["result"]["seed"], 3);
    let i2i = job(
        &s.url,
        with(
            json!({"mode": "image_to_image", "image": format!("data:image/png;base64,{drawing}"), "strength": 0.5}),
        ),
    );
    assert_eq!(decode(&i2i["result"]["images"][0]).dimensions(), (64, 64));
    // Inpainting: the right half repainted; the left part keeps the input exactly.
    let mask = png_b64(64, 64, |x, _| if x >= 32 { [255; 3] } else { [0; 3] });
    let inp = job(
        &s.url,
        with(json!({"mode": "inpainting", "image": drawing, "mask": mask, "mask_blur": 2})),
    );
    let out = decode(&inp["result"]["images"][0]);
    let input = decode(&Value::String(drawing.clone()));
    for y in 0..64 {
        for x in 0..24 {
            assert_eq!(
                out.get_pixel(x, y),
                input.get_pixel(x, y),
                "kept pixel ({x},{y})"
            );
        }
    }
    assert!(
        (40..64).any(|x| out.get_pixel(x, 5) != input.get_pixel(x, 5)),
        "the masked half was repainted"
    );
    let small = png_b64(48, 48, |_, _| [240, 240, 40]);
    let outp = job(
        &s.url,
        with(
            json!({"mode": "outpainting", "image": small, "margins": {"left": 16, "top": 8, "bottom": 8}}),
        ),
    );
    assert_eq!(decode(&outp["result"]["images"][0]).dimensions(), (64, 64));
    let mix = job(
        &s.url,
        with(
            json!({"mode": "mixing", "inputs": [{"text": "a red circle", "weight": 0.5}, {"image": drawing, "weight": 0.5}]}),
        ),
    );
    assert_eq!(mix["result"]["images"].as_array().unwrap().len(), 1);
    let var = job(
        &s.url,
        with(json!({"mode": "variations", "image": drawing})),
    );
    assert_eq!(var["result"]["images"].as_array().unwrap().len(), 1);
    for sampler in ["euler-a", "euler", "ddim", "ddpm", "dpm++2m", "default"] {
        job(&s.url, with(json!({"sampler": sampler})));
    }
    // Same request and seed, same pixels; another seed, other pixels.
    let again = job(&s.url, with(json!({"num_images": 2})));
    assert_eq!(again["result"]["images"], t2i["result"]["images"]);
    let other = job(&s.url, with(json!({"seed": 4})));
    assert_ne!(other["result"]["images"][0], t2i["result"]["images"][0]);
    let (status, doc) = get(&format!("{}/api/v1/openapi.json", s.url));
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/v1/jobs"]["post"].is_object(), "{doc}");
    assert!(doc["components"]["schemas"]["GenerateRequest"]["properties"]["mask_blur"].is_object());
    let (status, page) = call("GET", &format!("{}/", s.url), None, &[]).into_two();
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("id=\"canvas\""));
}

trait Two {
    fn into_two(self) -> (u16, Value);
}
impl Two for (u16, Value, Option<String>) {
    fn into_two(self) -> (u16, Value) {
        (self.0, self.1)
    }
}

#[test]
fn bad_requests_get_a_4xx_that_says_what_is_wrong() {
    let s = start(ServerConfig::default());
    let url = format!("{}/api/v1/jobs", s.url);
    let img = png_b64(64, 64, |_, _| [10, 20, 30]);
    let bomb = {
        // 5000x5000 of zeros: 75 MB of pixels in a ~100 KB PNG.
        png_b64(5000, 5000, |_, _| [0, 0, 0])
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"prompt": "x", "model": "nope"}),
            400,
            "unknown model",
        ),
        (
            json!({"prompt": "x", "sampler": "LMS"}),
            400,
            "unknown sampler",
        ),
        (json!({"prompt": "x", "width": 100000}), 400, "width"),
        (json!({"prompt": "x", "steps": 0}), 400, "steps"),
        (json!({"prompt": "x", "steps": 100000}), 400, "steps"),
        (json!({"prompt": "x", "num_images": 100}), 400, "images"),
        (json!({"prompt": "x", "guidance": -1}), 400, "guidance"),
        (
            json!({"prompt": "x", "mode": "inpainting", "image": img, "mask": png_b64(32, 32, |_, _| [255; 3])}),
            400,
            "same size",
        ),
        (
            json!({"prompt": "x", "mode": "inpainting", "image": img}),
            400,
            "mask",
        ),
        (
            json!({"prompt": "x", "mode": "image_to_image", "image": "%%%not base64"}),
            400,
            "base64",
        ),
        (
            json!({"prompt": "x", "mode": "image_to_image", "image": "aGVsbG8gd29ybGQ="}),
            400,
            "image",
        ),
        (
            json!({"prompt": "x", "mode": "image_to_image", "image": bomb}),
            413,
            "4096x4096",
        ),
        (
            json!({"prompt": "x", "mode": "image_to_image", "image": img, "strength": 2.0}),
            400,
            "strength",
        ),
        (
            json!({"prompt": "x", "mode": "controlnet", "hint": img}),
            400,
            "ControlNet",
        ),
        (json!({"mode": "mixing"}), 400, "inputs"),
        (json!({"prompt": "x", "mode": "teleport"}), 400, "JSON"),
    ];
    for (body, want, words) in cases {
        let (status, v) = post(&url, &body);
        let msg = v["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, want, "{body:.200}: {v}");
        assert!(
            msg.to_lowercase().contains(&words.to_lowercase()),
            "{msg} should say {words}"
        );
    }
    let (status, v, _) = call("POST", &url, Some("{not json"), &[]);
    assert_eq!(status, 400, "{v}");
    // A body over the limit is refused from its Content-Length, before it is read.
    {
        use std::io::{Read, Write};
        let addr = s.url.trim_start_matches("http://");
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        write!(tcp, "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"prompt\": \"aaaa", 70u64 << 20).unwrap();
        // The server answers without reading the body, and may keep the connection open:
        // read until the JSON error has arrived.
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = String::new();
        let mut buf = [0u8; 4096];
        while !answer.contains("\"}") {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.300}");
        assert!(
            answer.contains("larger than the server's limit"),
            "{answer:.500}"
        );
    }
    let (status, v) = get(&format!("{}/api/v1/jobs/job-999", s.url));
    assert_eq!(status, 404, "{v}");
    // The server still works.
    job(
        &s.url,
        json!({"prompt": PROMPT, "steps": 2, "prior_steps": 2}),
    );
}

/// Reads a job's event stream to its end: the states seen and the last event.
fn events(url: &str, id: &str) -> (Vec<Value>, Value) {
    let mut response = common::agent()
        .get(&format!("{url}/api/v1/jobs/{id}/events"))
        .call()
        .unwrap();
    let reader = std::io::BufReader::new(response.body_mut().as_reader());
    let mut seen = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            seen.push(serde_json::from_str::<Value>(data).unwrap());
        }
    }
    let last = seen.last().cloned().unwrap_or(Value::Null);
    (seen, last)
}

#[test]
fn queue_full_cancel_and_progress_events() {
    let s = start(ServerConfig {
        queue: 1,
        ..ServerConfig::default()
    });
    let url = format!("{}/api/v1/jobs", s.url);
    let long = json!({"prompt": PROMPT, "steps": 400, "prior_steps": 2, "seed": 1});
    let (status, a) = post(&url, &long);
    assert_eq!(status, 202, "{a}");
    let a_id = a["id"].as_str().unwrap().to_string();
    // Wait until A runs, so B waits alone in the queue.
    for _ in 0..200 {
        if get(&format!("{url}/{a_id}")).1["state"] == "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, b) = post(&url, &long);
    assert_eq!(status, 202, "{b}");
    assert_eq!(b["position"], 0);
    let (status, c, retry) = call("POST", &url, Some(&long.to_string()), &[]);
    assert_eq!(status, 429, "{c}");
    assert!(c["error"].as_str().unwrap().contains("queue is full"));
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    // Cancel the waiting job: it leaves the queue at once.
    let b_id = b["id"].as_str().unwrap();
    let (_, v, _) = call("DELETE", &format!("{url}/{b_id}"), None, &[]);
    assert_eq!(v["state"], "cancelled", "{v}");
    // Follow A's events in the background, then cancel it once the decoder has made progress.
    let events_url = s.url.clone();
    let id = a_id.clone();
    let reader = std::thread::spawn(move || events(&events_url, &id));
    loop {
        let v = get(&format!("{url}/{a_id}")).1;
        if v["stage"] == "decoder" && v["step"].as_u64().unwrap() >= 25 {
            assert!(
                v["preview"].is_string(),
                "a preview every few steps: {v:.300}"
            );
            assert!(v["eta_s"].as_f64().unwrap() > 0.0);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (_, v, _) = call("DELETE", &format!("{url}/{a_id}"), None, &[]);
    assert!(v["state"] == "running" || v["state"] == "cancelled", "{v}");
    let (seen, last) = reader.join().unwrap();
    assert_eq!(last["state"], "cancelled", "{last:.300}");
    assert!(last["result"].is_null());
    assert!(seen.iter().any(|e| e["stage"] == "prior"));
    assert!(seen.iter().filter(|e| e["stage"] == "decoder").count() >= 10);
    // The server goes on.
    job(
        &s.url,
        json!({"prompt": PROMPT, "steps": 2, "prior_steps": 2}),
    );
}

#[test]
fn eight_concurrent_clients_are_all_served() {
    let s = start(ServerConfig::default());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": PROMPT, "steps": 6, "prior_steps": 3, "seed": i % 4});
                job(&url, body)["result"]["images"][0].clone()
            })
        })
        .collect();
    let images: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..4 {
        assert_eq!(images[i], images[i + 4], "seed {i} twice, same image");
    }
    assert_ne!(images[0], images[1]);
}

#[test]
fn a1111_api_subset() {
    let s = start(ServerConfig::default());
    let u = |p: &str| format!("{}/sdapi/v1/{p}", s.url);
    // The progress of an idle server, as webuiapi's util_wait_for_ready reads it.
    let (status, p) = get(&u("progress"));
    assert_eq!(status, 200);
    assert_eq!(
        (p["progress"].as_f64(), p["state"]["job_count"].as_u64()),
        (Some(0.0), Some(0))
    );
    let (_, models) = get(&u("sd-models"));
    assert_eq!(models[0]["title"], "small");
    let (_, samplers) = get(&u("samplers"));
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"Euler a") && names.contains(&"DPM++ 2M"),
        "{names:?}"
    );
    let (_, options) = get(&u("options"));
    assert_eq!(options["sd_model_checkpoint"], "small");
    // Clients post the whole options dict back.
    let (status, v) = post(&u("options"), &options);
    assert_eq!((status, v), (200, Value::Null));
    let (status, v) = post(&u("options"), &json!({"sd_model_checkpoint": "nope"}));
    assert_eq!(status, 500);
    assert!(v["errors"].as_str().unwrap().contains("not found"));
    // txt2img as webuiapi sends it (strings where numbers are expected are coerced).
    let body = json!({"prompt": PROMPT, "negative_prompt": "", "seed": 11, "steps": "6", "cfg_scale": 4,
        "width": 64, "height": 64, "batch_size": 2, "n_iter": 1, "sampler_name": "Euler a",
        "sampler_index": "Euler a", "scheduler": "automatic", "enable_hr": false, "styles": [],
        "override_settings": {}, "alwayson_scripts": {}, "send_images": true, "save_images": false});
    let (status, r) = post(&u("txt2img"), &body);
    assert_eq!(status, 200, "{r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert!(!images[0].as_str().unwrap().starts_with("data:"));
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([11, 12]));
    assert_eq!(info["seed"], 11);
    assert_eq!(info["sampler_name"], "Euler a");
    assert!(info["infotexts"][1].as_str().unwrap().contains("Seed: 12"));
    assert_eq!(r["parameters"]["steps"], "6");
    assert_eq!(r["parameters"]["sampler_index"], "Euler a");
    // Each image is its own seed's: batch image 1 equals a run with seed 12.
    let (_, one) = post(
        &u("txt2img"),
        &json!({"prompt": PROMPT, "seed": 12, "steps": 6, "cfg_scale": 4, "width": 64, "height": 64, "sampler_name": "Euler a"}),
    );
    assert_eq!(one["images"][0], images[1]);
    // img2img with a mask: inpainting; the unmasked part kept, images with a data: prefix.
    let init = png_b64(64, 64, |x, _| {
        if x < 32 {
            [30, 60, 200]
        } else {
            [240, 240, 40]
        }
    });
    let mask = png_b64(64, 64, |x, _| if x < 32 { [0; 3] } else { [255; 3] });
    let body = json!({"prompt": "a red circle", "init_images": [format!("data:image/png;base64,{init}")],
        "mask": format!("data:image/png;base64,{mask}"), "mask_blur": 2, "inpainting_fill": 0,
        "inpaint_full_res": true, "denoising_strength": 0.75, "width": 64, "height": 64, "steps": 6, "seed": 5,
        "sampler_name": "DDIM"});
    let (status, r) = post(&u("img2img"), &body);
    assert_eq!(status, 200, "{r}");
    let out = decode(&r["images"][0]);
    let input = decode(&Value::String(init));
    for y in 0..64 {
        for x in 0..24 {
            assert_eq!(out.get_pixel(x, y), input.get_pixel(x, y));
        }
    }
    assert_eq!(r["parameters"]["init_images"], Value::Null);
    // inpainting_mask_invert repaints the other side.
    let mut inv = body.clone();
    inv["inpainting_mask_invert"] = json!(1);
    let out = decode(&post(&u("img2img"), &inv).1["images"][0]);
    for y in 0..64 {
        for x in 40..64 {
            assert_eq!(out.get_pixel(x, y), input.get_pixel(x, y));
        }
    }
    // img2img without a mask.
    let body = json!({"prompt": "a red circle", "init_images": [init_b64()], "denoising_strength": 0.5, "width": 64, "height": 64, "steps": 6});
    let (status, r) = post(&u("img2img"), &body);
    assert_eq!(status, 200, "{r}");
    // Errors in A1111's shapes.
    let (status, v) = post(&u("img2img"), &json!({"prompt": "x"}));
    assert_eq!(
        (status, v["detail"].as_str()),
        (404, Some("Init image not found"))
    );
    let (status, v) = post(
        &u("txt2img"),
        &json!({"prompt": "x", "sampler_name": "LMS"}),
    );
    assert_eq!(status, 404, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("Sampler not found"));
    let (status, v) = post(&u("txt2img"), &json!({"prompt": ["a", "b"]}));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "prompt"]));
    let (status, v) = post(&u("txt2img"), &json!({"steps": "many"}));
    assert_eq!(status, 422, "{v}");
    let (status, _, _) = call("POST", &u("txt2img"), Some(""), &[]);
    assert_eq!(status, 422);
    let (status, v) = post(&u("interrupt"), &json!({}));
    assert_eq!((status, v), (200, json!({})));
    // Interrupt a running batch: 200 with the unfinished first image, the second never made.
    let url = s.url.clone();
    let long = std::thread::spawn(move || {
        post(
            &format!("{url}/sdapi/v1/txt2img"),
            &json!({"prompt": PROMPT, "seed": 1, "steps": 400, "width": 64, "height": 64, "batch_size": 2}),
        )
    });
    loop {
        let (_, p) = get(&u("progress"));
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 5 && p["state"]["job_count"] == 2 {
            assert!(p["progress"].as_f64().unwrap() > 0.0, "{p:.300}");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, v) = post(&u("interrupt"), &json!({}));
    assert_eq!((status, v), (200, json!({})));
    let (status, r) = long.join().unwrap();
    assert_eq!(status, 200, "{r:.300}");
    assert_eq!(
        r["images"].as_array().unwrap().len(),
        1,
        "the unfinished image only"
    );
    assert_eq!(decode(&r["images"][0]).dimensions(), (64, 64));
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    // The server goes on, idle again.
    let (_, p) = get(&u("progress"));
    assert_eq!(p["state"]["job_count"], 0);
}

fn init_b64() -> String {
    png_b64(64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 100])
}

#[test]
fn the_token_guards_every_api_call() {
    let s = start(ServerConfig {
        api_token: Some("s3cret".into()),
        ..ServerConfig::default()
    });
    let (status, v, _) = call("GET", &format!("{}/api/v1/models", s.url), None, &[]);
    assert_eq!(status, 401, "{v}");
    let (status, _, _) = call("GET", &format!("{}/sdapi/v1/sd-models", s.url), None, &[]);
    assert_eq!(status, 401);
    let (status, _, _) = call(
        "GET",
        &format!("{}/api/v1/models", s.url),
        None,
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401);
    let (status, v, _) = call(
        "GET",
        &format!("{}/api/v1/models", s.url),
        None,
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(status, 200, "{v}");
    // The page itself is public (it asks for the token).
    let (status, _, _) = call("GET", &format!("{}/", s.url), None, &[]);
    assert_eq!(status, 200);
}

/// Copies a directory tree (files only).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn model_directories_with_symlinks_leading_outside_are_not_served() {
    use kandinsky::pipelines::auto_pipeline::DecoderKind;
    use kandinsky_server::Server;
    let small = kandinsky::loading::small_model_dirs(false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let decoder = tmp.path().join("decoder");
    copy_tree(&small.decoder, &decoder);
    let weights = decoder.join("unet/diffusion_pytorch_model.safetensors");
    let config = |follow_symlinks| ServerConfig {
        models: vec![format!("m={}", decoder.display())],
        prior: Some(small.prior.display().to_string()),
        follow_symlinks,
        ..ServerConfig::default()
    };
    // A copy is served; the served directory then gains a link to a file outside it, which is
    // refused when the weights are about to load.
    let server = Server::start(config(false)).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink(
        small
            .decoder
            .join("unet/diffusion_pytorch_model.safetensors"),
        &weights,
    )
    .unwrap();
    let err = server
        .state()
        .catalog
        .dirs("m", DecoderKind::TextToImage)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a symlink to") && err.contains("outside the model directory"),
        "{err}"
    );
    drop(server);
    // At start-up: refused with the way out named; allowed when asked for.
    let err = match Server::start(config(false)) {
        Ok(_) => panic!("served a directory whose weights link outside it"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("model 'm=")
            && err.contains("outside the model directory")
            && err.contains("--follow-symlinks"),
        "{err}"
    );
    let server = Server::start(config(true)).unwrap();
    assert!(server
        .state()
        .catalog
        .dirs("m", DecoderKind::TextToImage)
        .is_ok());
}
