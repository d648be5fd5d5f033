//! `ThreadReading`: this thread's probe counters now, and what they moved by since: a
//! block's cost measured exactly, with nothing recorded in any series (`meterage.budget`).

use super::convert::probe_names;
use crate::probe::{Reading, MEASURES};
use pyo3::prelude::*;
use pyo3::types::PyDict;

#[pyclass(module = "meterage._native", name = "ThreadReading", frozen)]
pub struct ThreadReading {
    before: Reading,
}

#[pymethods]
impl ThreadReading {
    /// Reads `probes` (probe names) on this thread now.
    #[new]
    fn new(probes: &Bound<'_, PyAny>) -> PyResult<ThreadReading> {
        let probes = probe_names("probes", probes)?;
        Ok(ThreadReading {
            before: Reading::take_before(probes),
        })
    }

    /// What each measure moved by since the reading, by snapshot key, in the measure's
    /// unit as a call records it (`cpu.time` in seconds; bytes and counts as ints). None
    /// in another thread than the reading's (the counters are per thread) or across a fork.
    fn since<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let after = Reading::take_after(&self.before);
        let Some(delta) = after.since(&self.before) else {
            return Ok(None);
        };
        let values = PyDict::new(py);
        for (index, measure) in MEASURES.iter().enumerate() {
            if !delta.has(index) {
                continue;
            }
            let raw = delta.values[index];
            if measure.factor == 1.0 {
                values.set_item(measure.key, raw)?;
            } else {
                values.set_item(measure.key, raw as f64 * measure.factor)?;
            }
        }
        Ok(Some(values))
    }
}
