//! The web editor's files, embedded in the binary (no CDN, no network at run time).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

const INDEX: &str = include_str!("../web/index.html");
const APP: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");

fn file(
    content_type: &'static str,
    body: &'static str,
) -> impl Fn() -> std::future::Ready<axum::response::Response> + Clone {
    move || {
        std::future::ready(
            (
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response(),
        )
    }
}

/// `/`, `/app.js`, `/style.css`.
pub fn routes() -> Router<Arc<crate::AppState>> {
    Router::new()
        .route("/", get(file("text/html; charset=utf-8", INDEX)))
        .route("/app.js", get(file("text/javascript; charset=utf-8", APP)))
        .route("/style.css", get(file("text/css; charset=utf-8", STYLE)))
}
