//! The str keys the request drivers read on every request (of ASGI scopes and messages,
//! WSGI environs), interned once and kept side by side in one static: a few cache lines
//! to miss when the caches are cold, where an `intern!` per call site is a line each.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

macro_rules! request_keys {
    ($($field:ident = $text:literal),* $(,)?) => {
        pub struct RequestKeys {
            $(pub $field: Py<PyString>,)*
        }

        impl RequestKeys {
            fn make(py: Python<'_>) -> RequestKeys {
                RequestKeys {
                    $($field: PyString::intern(py, $text).unbind(),)*
                }
            }
        }
    };
}

request_keys! {
    // ASGI scopes and messages.
    kind = "type",
    method = "method",
    scheme = "scheme",
    http_version = "http_version",
    app = "app",
    route = "route",
    body = "body",
    more_body = "more_body",
    status = "status",
    path = "path",
    // WSGI environs.
    request_method = "REQUEST_METHOD",
    url_scheme = "wsgi.url_scheme",
    server_protocol = "SERVER_PROTOCOL",
    content_length = "CONTENT_LENGTH",
    werkzeug_request = "werkzeug.request",
    file_wrapper = "wsgi.file_wrapper",
    // Flask's URL rule (on werkzeug's request), a WSGI body's close.
    url_rule = "url_rule",
    rule = "rule",
    close = "close",
}

/// The keys, made at the first request.
pub fn request_keys(py: Python<'_>) -> &RequestKeys {
    static KEYS: PyOnceLock<RequestKeys> = PyOnceLock::new();
    KEYS.get_or_init(py, || RequestKeys::make(py))
}
