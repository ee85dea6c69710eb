//! The built-in `echo` upstream: answers with JSON of what it received (method, path, query,
//! headers), after the gateway's header hygiene. It shows exactly what a real upstream would see.

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Map, Value};

pub fn respond(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Response<Full<Bytes>> {
    let mut hs = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(values)
        };
        hs.insert(name.as_str().to_owned(), value);
    }
    let body = serde_json::json!({
        "method": method.as_str(),
        "path": path,
        "query": query,
        "headers": hs,
    });
    let mut json = serde_json::to_vec_pretty(&body).unwrap_or_default();
    json.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
