//! With the `python` feature: PyO3's cfgs (`Py_3_12`, `Py_3_14`, ...) for the binding,
//! which reads a few CPython structures directly where their layout is stable.

fn main() {
    #[cfg(feature = "python")]
    pyo3_build_config::use_pyo3_cfgs();
}
