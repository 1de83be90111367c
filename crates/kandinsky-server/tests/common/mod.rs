//! A server on a loopback port in the test process, and a small JSON client.
#![allow(dead_code)]

use base64::Engine;
use kandinsky_server::{Server, ServerConfig};
use serde_json::Value;

/// A running server: its base URL.
pub struct TestServer {
    pub url: String,
    _runtime: tokio::runtime::Runtime,
}

/// Starts a server with the small model on a free loopback port.
pub fn start(config: ServerConfig) -> TestServer {
    let server = Server::start(config).expect("server starts");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = server.router();
    runtime.spawn(async move {
        let _keep = server;
        axum_serve(listener, app).await;
    });
    TestServer {
        url,
        _runtime: runtime,
    }
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.unwrap();
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .build()
        .into()
}

/// `(status, JSON body)` of a request.
pub fn call(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value, Option<String>) {
    let agent = agent();
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        ("DELETE", _) => agent.delete(url).call(),
        (_, body) => {
            let mut r = agent.post(url).header("Content-Type", "application/json");
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.send(body.unwrap_or("").as_bytes())
        }
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

pub fn get(url: &str) -> (u16, Value) {
    let (s, v, _) = call("GET", url, None, &[]);
    (s, v)
}

pub fn post(url: &str, body: &Value) -> (u16, Value) {
    let (s, v, _) = call("POST", url, Some(&body.to_string()), &[]);
    (s, v)
}

/// A base64 PNG of an RGB image.
pub fn png_b64(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> String {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a base64 PNG of a response.
pub fn decode(b64: &Value) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("a base64 string"))
        .expect("base64");
    image::load_from_memory(&bytes).expect("png").to_rgb8()
}
