//! The probe declarations as Python data: what the OpenTelemetry bridge exports, the docs
//! tables and the command line's columns are built from.

use crate::aggregate::boundaries::{NAMED, SDK_DEFAULT};
use crate::probe::{Measure, ProbeSet, DURATION};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

fn measure_dict<'py>(
    py: Python<'py>,
    measure: &Measure,
    probe: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("key", measure.key)?;
    dict.set_item("probe", probe)?;
    dict.set_item("unit", measure.unit)?;
    dict.set_item("combine", measure.combine.name())?;
    dict.set_item("metric", measure.metric)?;
    dict.set_item("attributes", PyTuple::new(py, measure.attributes)?)?;
    dict.set_item("description", measure.description)?;
    dict.set_item("boundaries", PyTuple::new(py, measure.boundaries)?)?;
    dict.set_item("source", measure.source)?;
    Ok(dict)
}

/// Adds `PROBES` (a tuple of dicts: name, default, measures), `DURATION_MEASURE`,
/// `DEFAULT_BOUNDARIES` and `BOUNDARIES` (every boundary set the histograms count exactly,
/// by name) to the module.
pub fn add_to(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    let mut probes = Vec::new();
    for (_, info) in ProbeSet::ALL.each() {
        let dict = PyDict::new(py);
        dict.set_item("name", info.name)?;
        dict.set_item("default", info.default)?;
        let measures = info
            .measures
            .iter()
            .map(|measure| measure_dict(py, measure, info.name))
            .collect::<PyResult<Vec<_>>>()?;
        dict.set_item("measures", PyTuple::new(py, measures)?)?;
        probes.push(dict);
    }
    module.add("PROBES", PyTuple::new(py, probes)?)?;
    module.add("DURATION_MEASURE", measure_dict(py, &DURATION, "")?)?;
    module.add("DEFAULT_BOUNDARIES", PyTuple::new(py, SDK_DEFAULT)?)?;
    let named = PyDict::new(py);
    for (name, values) in NAMED {
        named.set_item(name, PyTuple::new(py, values)?)?;
    }
    module.add("BOUNDARIES", named)?;
    Ok(())
}
