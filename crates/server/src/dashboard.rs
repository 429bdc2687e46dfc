//! The dashboard: one web page (`GET /dashboard`) that shows the libraries, a live feed of the
//! change stream, search, the event bus's statistics, consumer groups and jobs, built only on
//! the public v1 API.
//!
//! This module owns serving the page's three files, which are compiled into the binary
//! (`assets/dashboard/`), so the page works offline and matches the server's version. It must
//! never give the page a private route (the page is a client like any other: what it shows, a
//! user can get with curl) and never serve anything the page did not ask for. The page's own
//! rules (snapshot then tail by `seq`, resume after a drop, bounded buffers, text never
//! rendered as HTML) are written at the top of `app.js`.
//!
//! Every file goes out with a Content-Security-Policy that allows scripts, styles and
//! connections from this server only, so even a rendering bug could not run injected script
//! or send data elsewhere.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../assets/dashboard/style.css");

/// Scripts, styles, fetches and images from this origin only; no frames, no plugins, no
/// inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` (a redirect to the page), `/dashboard` and the page's script and style sheet.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/dashboard") }))
        .route(
            "/dashboard",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; a reload after an upgrade must not mix versions.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page names exactly the files this module serves, so a rename cannot leave it
    /// loading a 404 (the browser test in `crates/cli/tests/dashboard.rs` drives the rest).
    #[test]
    fn the_page_loads_only_what_is_served() {
        assert!(INDEX_HTML.contains(r#"<script src="/dashboard/app.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="/dashboard/style.css">"#));
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(!APP_JS.contains("http://") && !APP_JS.contains("https://"));
        // No inline script: the policy forbids it, so it would not run.
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        // Nothing the server sends is rendered as HTML.
        assert!(!APP_JS.contains("innerHTML") && !APP_JS.contains("insertAdjacentHTML"));
    }
}
