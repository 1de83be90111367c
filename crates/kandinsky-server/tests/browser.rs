//! The web editor in headless Chromium (Debian's `chromium` + `chromium-driver`, over
//! WebDriver): generate from a prompt and see the progress, paint a mask and inpaint, move the
//! window off the image and outpaint, mix two inputs. Every step asserts on what the page shows.
//!
//! Without `chromedriver` on the PATH the test says so and passes, unless
//! `KANDINSKY_BROWSER_TEST=require` (what `.ci/run` sets after installing it). With
//! `KANDINSKY_SCREENSHOTS=DIR` it saves screenshots of the editor there (README's pictures).

mod common;

use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::{Client, ClientBuilder, Locator};
use kandinsky_server::ServerConfig;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect(script)
}

async fn text(c: &Client, id: &str) -> String {
    js(
        c,
        &format!("return document.getElementById('{id}').textContent.trim();"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// Polls `script` until it returns true.
async fn wait_until(c: &Client, what: &str, script: &str, seconds: u64) {
    let start = Instant::now();
    loop {
        if js(c, script).await == json!(true) {
            return;
        }
        let error = text(c, "error").await;
        assert!(error.is_empty(), "{what}: the page shows an error: {error}");
        assert!(
            start.elapsed() < Duration::from_secs(seconds),
            "{what}: timed out (status: {})",
            text(c, "status").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn set(c: &Client, id: &str, value: &str) {
    let e = c.find(Locator::Id(id)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .expect(css)
        .click()
        .await
        .expect(css);
}

/// The viewport position of a world point of the canvas.
async fn screen(c: &Client, x: f64, y: f64) -> (f64, f64) {
    let v = js(c, &format!("return editor.worldToClient({x}, {y});")).await;
    (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
}

/// A left-button drag along world points.
async fn drag(c: &Client, points: &[(f64, f64)]) {
    let mut mouse = MouseActions::new("mouse".into());
    for (i, &(x, y)) in points.iter().enumerate() {
        let (sx, sy) = screen(c, x, y).await;
        mouse = mouse.then(PointerAction::MoveTo {
            duration: Some(Duration::from_millis(30)),
            x: sx.round(),
            y: sy.round(),
        });
        if i == 0 {
            mouse = mouse.then(PointerAction::Down {
                button: MOUSE_BUTTON_LEFT,
            });
        }
    }
    mouse = mouse.then(PointerAction::Up {
        button: MOUSE_BUTTON_LEFT,
    });
    c.perform_actions(mouse).await.unwrap();
}

async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("KANDINSKY_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
    }
}

#[test]
fn the_editor_in_a_real_browser() {
    let required = std::env::var("KANDINSKY_BROWSER_TEST").is_ok_and(|v| v == "require");
    let (Some(driver), Some(browser)) = (
        which("chromedriver"),
        which("chromium").or_else(|| which("chromium-browser")),
    ) else {
        assert!(
            !required,
            "KANDINSKY_BROWSER_TEST=require but chromium / chromedriver are not installed"
        );
        eprintln!("skipped: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)");
        return;
    };
    let server = common::start(ServerConfig::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _driver = Driver(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let start = Instant::now();
        let c = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(30), "chromedriver: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        c.goto(&server.url).await.unwrap();
        wait_until(&c, "page ready", "return document.body.dataset.ready === 'true';", 30).await;

        // Text to image, long enough to see the progress.
        set(&c, "prompt", "a large blue square in the centre on a yellow background").await;
        set(&c, "steps", "80").await;
        set(&c, "seed", "1").await;
        click(&c, "#generate").await;
        let mut seen = Vec::new();
        let t0 = Instant::now();
        while js(&c, "return document.querySelectorAll('#gallery .result').length;").await != json!(1) {
            let s = text(&c, "status").await;
            if !seen.contains(&s) {
                seen.push(s);
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "no image; status {seen:?}");
            assert!(text(&c, "error").await.is_empty());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(seen.iter().any(|s| s.starts_with("Decoder")), "progress shown: {seen:?}");
        let size = js(&c, "const i = document.querySelector('#gallery img.result-image'); return [i.naturalWidth, i.naturalHeight, i.dataset.seed];").await;
        assert_eq!(size, json!([64, 64, "1"]));
        wait_until(&c, "done", "return document.getElementById('status').textContent.trim() === 'Done';", 10).await;
        screenshot(&c, "editor-txt2img.png").await;

        // Inpainting: the image onto the canvas, a brush stroke across its middle, generate.
        click(&c, "#gallery .result .to-canvas").await;
        wait_until(&c, "on the canvas", "return document.getElementById('canvas-size').textContent.trim() === '64×64';", 10).await;
        click(&c, "#tool-brush").await;
        set(&c, "canvas-prompt", "a red circle").await;
        drag(&c, &[(8.0, 32.0), (24.0, 30.0), (40.0, 34.0), (56.0, 32.0)]).await;
        let undo = js(&c, "return editor.undoDepth();").await.as_u64().unwrap();
        screenshot(&c, "editor-mask.png").await;
        click(&c, "#canvas-generate").await;
        wait_until(&c, "inpainted", &format!("return editor.undoDepth() > {undo} && document.getElementById('status').textContent.trim() === 'Done';"), 120).await;
        assert_eq!(text(&c, "canvas-size").await, "64×64");

        // Outpainting: drag the window 32 px to the right, off the image, and generate.
        click(&c, "#tool-window").await;
        drag(&c, &[(32.0, 32.0), (48.0, 32.0), (64.0, 32.0)]).await;
        let pos = js(&c, "return editor.windowPos();").await;
        assert_eq!(pos, json!([32, 0]), "the window moved");
        let undo = js(&c, "return editor.undoDepth();").await.as_u64().unwrap();
        click(&c, "#canvas-generate").await;
        wait_until(&c, "outpainted", &format!("return editor.undoDepth() > {undo} && document.getElementById('status').textContent.trim() === 'Done';"), 120).await;
        assert_eq!(text(&c, "canvas-size").await, "96×64", "the canvas grew");
        screenshot(&c, "editor-canvas.png").await;
        // Undo takes the outpainting back.
        click(&c, "#canvas-undo").await;
        assert_eq!(text(&c, "canvas-size").await, "64×64");

        // Mixing two texts.
        click(&c, "#tab-mix").await;
        let rows = c.find_all(Locator::Css("#mix-inputs .mix-text")).await.unwrap();
        assert!(rows.len() >= 2);
        rows[0].clear().await.unwrap();
        rows[0].send_keys("a red circle").await.unwrap();
        rows[1].clear().await.unwrap();
        rows[1].send_keys("a green background").await.unwrap();
        let before = js(&c, "return document.querySelectorAll('#gallery .result').length;").await;
        click(&c, "#mix-generate").await;
        wait_until(&c, "mixed", &format!("return document.querySelectorAll('#gallery .result').length > {before} && document.getElementById('status').textContent.trim() === 'Done';"), 120).await;
        screenshot(&c, "editor-mix.png").await;
        c.close().await.unwrap();
    });
}
