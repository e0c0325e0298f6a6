//! The files msghandler serves itself: the browser client and the demo page
//! (docs/TRANSPORTS.md). They are compiled into the binary, so that an installed
//! msghandler needs no file beside it and always serves the client that matches it.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::http::{self, Body, Reply};
use crate::x0::X0Error;

/// The client as a classic script: it ends by setting `globalThis.MicroMsg`.
const SCRIPT: &str = include_str!("../static/micromsg.js");

/// The same source as an ES module. The script declares `class MicroMsg` at its top
/// level and imports nothing, so exporting that name is all a module needs; one
/// source, no build step.
const MODULE: &str = concat!(
    include_str!("../static/micromsg.js"),
    "\nexport default MicroMsg;\nexport { MicroMsg };\n"
);

const DEMO: &str = include_str!("../static/demo.html");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Script,
    Module,
    Demo,
}

impl Asset {
    pub fn of(path: &str) -> Option<Asset> {
        match path {
            "/v1/micromsg.js" => Some(Asset::Script),
            "/v1/micromsg.mjs" => Some(Asset::Module),
            "/demo" => Some(Asset::Demo),
            _ => None,
        }
    }

    fn content(self) -> (&'static str, &'static str) {
        match self {
            Asset::Script => (SCRIPT, "text/javascript; charset=utf-8"),
            Asset::Module => (MODULE, "text/javascript; charset=utf-8"),
            Asset::Demo => (DEMO, "text/html; charset=utf-8"),
        }
    }
}

/// The file, for `GET` and `HEAD` (hyper leaves the body out of the latter).
pub fn reply(asset: Asset, method: &Method) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        let error = X0Error::new(
            "MethodNotAllowed",
            format!("{method} is not supported here; use GET"),
        );
        return http::refusal(error, "GET, HEAD, OPTIONS");
    }
    let (content, content_type) = asset.content();
    let mut reply = Response::new(Body::Left(Full::new(Bytes::from_static(
        content.as_bytes(),
    ))));
    *reply.status_mut() = StatusCode::OK;
    let headers = reply.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The client may be cached a little: a page load then costs no request for it,
    // and a new version reaches every browser within five minutes of a restart.
    // The demo is a page to try things with, so it is always fetched anew.
    let cache = match asset {
        Asset::Script | Asset::Module => "public, max-age=300",
        Asset::Demo => "no-cache",
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_is_the_script_with_its_exports() {
        assert!(MODULE.starts_with(SCRIPT));
        assert!(MODULE.ends_with("\nexport default MicroMsg;\nexport { MicroMsg };\n"));
        // What the footer relies on.
        assert!(SCRIPT.contains("class MicroMsg"));
        assert!(!SCRIPT.contains("\nexport "));
    }

    #[test]
    fn each_file_has_its_path_and_type() {
        assert_eq!(Asset::of("/v1/micromsg.js"), Some(Asset::Script));
        assert_eq!(Asset::of("/v1/micromsg.mjs"), Some(Asset::Module));
        assert_eq!(Asset::of("/demo"), Some(Asset::Demo));
        assert_eq!(Asset::of("/demo/"), None);
        let script = reply(Asset::Script, &Method::GET);
        assert_eq!(
            script.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            script.headers()[header::CACHE_CONTROL],
            "public, max-age=300"
        );
        let demo = reply(Asset::Demo, &Method::HEAD);
        assert_eq!(
            demo.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(
            reply(Asset::Demo, &Method::POST).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
