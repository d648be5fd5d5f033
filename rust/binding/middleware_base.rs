//! The native bases of `meterage.asgi.MeterageMiddleware` and
//! `meterage.wsgi.MeterageMiddleware`: calling a middleware goes straight to its request
//! meter, with no Python frame between.
//!
//! A middleware's `__call__` written in Python ran a frame per request (on 3.10 and 3.11 a
//! coroutine as well, for the servers' check that an ASGI application is a coroutine
//! function): ~1,900 of the ~13,200 instructions a request through the ASGI middleware
//! cost on 3.11. The Python classes define no `__call__`, so they inherit these types'
//! call slot; what servers inspect is an attribute of each instance (see `asgi.py`).

use super::http_request::HttpMeter;
use super::wsgi_request::WsgiMeter;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{intern, PyTraverseError, PyVisit};

fn not_initialized(kind: &str) -> PyErr {
    PyRuntimeError::new_err(format!(
        "this {kind} MeterageMiddleware was never initialized: its class's __init__ must \
         call MeterageMiddleware.__init__"
    ))
}

fn set_once<T>(cell: &mut Option<Py<T>>, meter: Py<T>, kind: &str) -> PyResult<()> {
    if cell.is_some() {
        return Err(PyRuntimeError::new_err(format!(
            "this {kind} MeterageMiddleware is initialized already"
        )));
    }
    *cell = Some(meter);
    Ok(())
}

/// A native base class whose call is its meter's `handle`. Not frozen: its meter (which
/// holds bound methods of the middleware) is cleared when the garbage collector breaks
/// that cycle.
macro_rules! middleware_base {
    ($base:ident, $meter:ident, $kind:literal, $first:ident $(, $argument:ident)*) => {
        #[pyclass(module = "meterage._native", subclass)]
        pub struct $base {
            requests: Option<Py<$meter>>,
        }

        #[pymethods]
        impl $base {
            /// Any arguments: the subclass's `__init__` reads them.
            #[new]
            #[pyo3(signature = (*_args, **_kwargs))]
            fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
                $base { requests: None }
            }

            /// Sets the meter every call goes to, once.
            fn _set_requests(&mut self, requests: Py<$meter>) -> PyResult<()> {
                set_once(&mut self.requests, requests, $kind)
            }

            /// What `copy.copy` of a middleware takes: its attributes (the meter among them).
            fn __getstate__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
                slf.getattr(intern!(slf.py(), "__dict__"))
            }

            /// A copy made by `copy.copy`: the attributes, and the meter among them.
            fn __setstate__(slf: &Bound<'_, Self>, state: &Bound<'_, PyDict>) -> PyResult<()> {
                let py = slf.py();
                slf.getattr(intern!(py, "__dict__"))?
                    .call_method1(intern!(py, "update"), (state,))?;
                if let Some(requests) = state.get_item(intern!(py, "_requests"))? {
                    if let Ok(requests) = requests.cast::<$meter>() {
                        slf.borrow_mut().requests = Some(requests.clone().unbind());
                    }
                }
                Ok(())
            }

            fn __call__<'py>(
                &self,
                $first: &Bound<'py, PyAny>,
                $($argument: &Bound<'py, PyAny>),*
            ) -> PyResult<Bound<'py, PyAny>> {
                let requests = self.requests.as_ref().ok_or_else(|| not_initialized($kind))?;
                $meter::handle(requests.bind($first.py()), $first, $($argument),*)
            }

            fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
                if let Some(requests) = &self.requests {
                    visit.call(requests)?;
                }
                Ok(())
            }

            fn __clear__(&mut self) {
                self.requests = None;
            }
        }
    };
}

middleware_base!(AsgiMiddlewareBase, HttpMeter, "ASGI", scope, receive, send);
middleware_base!(
    WsgiMiddlewareBase,
    WsgiMeter,
    "WSGI",
    environ,
    start_response
);
