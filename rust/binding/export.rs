//! `ExportState`: one OpenTelemetry reader's view of the registry, turned straight into the
//! SDK's point objects at collection time.
//!
//! Building ten thousand points through Python code (a frozen-dataclass `__init__` or a
//! kwargs call each) was most of a collection's cost. Here the windows, deltas and bucket
//! layouts are worked out in plain Rust (`bridge::export`) and each point is made by
//! `object.__new__(cls)` and filling its `__dict__` with interned field names, which gives
//! an object equal to one the SDK's constructor makes. The Python side says per class
//! whether that is safe (the class keeps its fields in `__dict__` and has exactly the
//! fields filled here); otherwise the class's constructor is called.

use super::convert::{attributes_to_dict, value_to_python};
use crate::aggregate::attributes::{AttributeSet, AttributeValue};
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::registry::registry;
use crate::bridge::export::{
    Alias, AliasSource, CallMetric, ExportOptions, ExportState, ExtraAttributes, HistogramLayout,
    MetricKind, MetricSpec, Point, PointData,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple, PyType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// An SDK dataclass and whether its instances may be filled through `__dict__`.
struct PointClass {
    class: Py<PyType>,
    fill_dict: bool,
    /// `object.__new__`, which makes an instance without running `__init__`.
    object_new: Py<PyAny>,
}

impl PointClass {
    fn from_python(entry: &Bound<'_, PyAny>, role: &str) -> PyResult<Self> {
        let (class, fill_dict): (Bound<'_, PyType>, bool) = entry.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "point_classes[{role:?}] must be a (class, fill_dict: bool) pair"
            ))
        })?;
        let object_new = entry
            .py()
            .get_type::<PyAny>()
            .getattr(intern!(entry.py(), "__new__"))?;
        Ok(PointClass {
            class: class.unbind(),
            fill_dict,
            object_new: object_new.unbind(),
        })
    }

    /// A new instance with these fields.
    fn make<'py>(
        &self,
        py: Python<'py>,
        fields: &[(&Bound<'py, PyString>, Bound<'py, PyAny>)],
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = self.class.bind(py);
        if !self.fill_dict {
            let kwargs = PyDict::new(py);
            for (name, value) in fields {
                kwargs.set_item(name, value)?;
            }
            return class.call((), Some(&kwargs));
        }
        let point = self.object_new.bind(py).call1((class,))?;
        for (name, value) in fields {
            // SAFETY: the three objects are alive (held by `Bound`s) for the call.
            let status = unsafe {
                pyo3::ffi::PyObject_GenericSetAttr(point.as_ptr(), name.as_ptr(), value.as_ptr())
            };
            if status != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(point)
    }
}

/// The SDK classes points are made of.
struct PointClasses {
    histogram: PointClass,
    exponential: PointClass,
    number: PointClass,
    buckets: PointClass,
    /// Called with (filtered_attributes, value, time_unix_nano, span_id, trace_id).
    exemplar: Py<PyAny>,
}

/// One reader's export state (see `bridge::export::ExportState`), producing SDK points.
#[pyclass(module = "meterage._native", name = "ExportState", frozen)]
pub struct PyExportState {
    state: Mutex<Tracked>,
    classes: PointClasses,
    /// In multiprocess mode: this process's own numbers, not the group's.
    process_only: bool,
}

/// The state with the registry resets it has seen.
struct Tracked {
    export: ExportState,
    resets_seen: u64,
}

fn boundaries_of(values: Vec<f64>, what: &str) -> PyResult<Arc<[f64]>> {
    let increasing = values.iter().all(|bound| bound.is_finite())
        && values.windows(2).all(|pair| pair[0] < pair[1]);
    if !increasing {
        return Err(PyValueError::new_err(format!(
            "{what} must be finite and strictly increasing, got {values:?}"
        )));
    }
    Ok(values.into())
}

type SpecTuple = (String, String, String, Vec<(String, String)>, Vec<f64>);
/// (name, unit, description, extra attribute pairs): a counter's spec.
type CounterTuple = (String, String, String, Vec<(String, String)>);
/// (name, unit, description, source, boundaries): an alias of an operation's call series.
type AliasTuple = (String, String, String, String, Vec<f64>);

fn extra_attributes(attributes: Vec<(String, String)>) -> ExtraAttributes {
    attributes
        .into_iter()
        .map(|(key, value)| (Arc::from(key), AttributeValue::Str(value.into())))
        .collect::<Vec<_>>()
        .into()
}

fn spec_of(measure: &str, spec: SpecTuple) -> PyResult<MetricSpec> {
    let (name, unit, description, attributes, boundaries) = spec;
    Ok(MetricSpec {
        name: name.into(),
        unit: unit.into(),
        description: description.into(),
        attributes: extra_attributes(attributes),
        boundaries: boundaries_of(boundaries, &format!("boundaries of {measure:?}"))?,
    })
}

/// Each call measure with its histogram and, where `estimated` names one, its
/// estimated-total counter.
fn call_metrics_of(
    histograms: HashMap<String, SpecTuple>,
    mut estimated: HashMap<String, CounterTuple>,
) -> PyResult<HashMap<String, CallMetric>> {
    let metrics = histograms
        .into_iter()
        .map(|(measure, spec)| {
            let histogram = Arc::new(spec_of(&measure, spec)?);
            let estimated = estimated.remove(&measure).map(|counter| {
                let (name, unit, description, attributes) = counter;
                let mut attributes = extra_attributes(attributes);
                if attributes[..] == histogram.attributes[..] {
                    // One set: the histogram's and the counter's points share their dict.
                    attributes = Arc::clone(&histogram.attributes);
                }
                Arc::new(MetricSpec {
                    name: name.into(),
                    unit: unit.into(),
                    description: description.into(),
                    attributes,
                    boundaries: Arc::from([]),
                })
            });
            Ok((
                measure,
                CallMetric {
                    histogram,
                    estimated,
                },
            ))
        })
        .collect::<PyResult<HashMap<_, _>>>()?;
    if let Some(measure) = estimated.keys().next() {
        return Err(PyValueError::new_err(format!(
            "estimated_metrics has {measure:?}, which is not in call_metrics"
        )));
    }
    Ok(metrics)
}

/// Operation -> its aliases; a source is "active" (the calls in flight) or a measure of
/// `call_metrics` (its histogram).
fn aliases_of(
    aliases: HashMap<String, Vec<AliasTuple>>,
    call_metrics: &HashMap<String, CallMetric>,
) -> PyResult<HashMap<String, Arc<[Alias]>>> {
    aliases
        .into_iter()
        .map(|(operation, specs)| {
            let specs = specs
                .into_iter()
                .map(|(name, unit, description, source, boundaries)| {
                    let source = match &*source {
                        "active" => AliasSource::Active,
                        measure if call_metrics.contains_key(measure) => {
                            AliasSource::Measure(Arc::from(measure))
                        }
                        other => {
                            return Err(PyValueError::new_err(format!(
                                "alias {name:?} of {operation:?}: source {other:?} is neither \
                                 \"active\" nor a measure of call_metrics"
                            )))
                        }
                    };
                    let boundaries =
                        boundaries_of(boundaries, &format!("boundaries of alias {name:?}"))?;
                    let spec = MetricSpec {
                        name: name.into(),
                        unit: unit.into(),
                        description: description.into(),
                        attributes: Arc::from([]),
                        boundaries,
                    };
                    Ok(Alias {
                        spec: Arc::new(spec),
                        source,
                    })
                })
                .collect::<PyResult<Vec<_>>>()?;
            Ok((operation, specs.into()))
        })
        .collect()
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

#[pymethods]
impl PyExportState {
    /// `call_metrics`: measure name -> (metric name, unit, description, extra attribute
    /// pairs, default boundaries); `active_calls`: (name, unit, description);
    /// `point_classes`: "histogram", "exponential", "number", "buckets" -> (class,
    /// fill_dict), "exemplar" -> class; `estimated_metrics`: measure name -> (counter
    /// name, unit, description, extra attribute pairs) of its estimated total;
    /// `aliases`: operation -> [(name, unit, description, source, boundaries)], source
    /// "active" (an up-down counter of the calls in flight) or a measure name (its
    /// histogram).
    #[new]
    #[pyo3(signature = (
        *, delta_histograms, delta_counters, exponential, max_buckets, max_scale,
        boundaries, call_metrics, active_calls, operation_key, default_boundaries,
        point_classes, attached_ns = None, process_only = false, estimated_metrics = None,
        aliases = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        delta_histograms: bool,
        delta_counters: bool,
        exponential: bool,
        max_buckets: usize,
        max_scale: i32,
        boundaries: Option<Vec<f64>>,
        call_metrics: HashMap<String, SpecTuple>,
        active_calls: (String, String, String),
        operation_key: String,
        default_boundaries: Vec<f64>,
        point_classes: &Bound<'_, PyDict>,
        attached_ns: Option<u64>,
        process_only: bool,
        estimated_metrics: Option<HashMap<String, CounterTuple>>,
        aliases: Option<HashMap<String, Vec<AliasTuple>>>,
    ) -> PyResult<Self> {
        let layout = if exponential {
            if max_buckets < 2 {
                return Err(PyValueError::new_err(format!(
                    "max_buckets must be at least 2, got {max_buckets}"
                )));
            }
            HistogramLayout::Exponential {
                max_buckets,
                max_scale,
            }
        } else {
            HistogramLayout::Explicit {
                boundaries: boundaries
                    .map(|b| boundaries_of(b, "boundaries"))
                    .transpose()?,
            }
        };
        let call_metrics = call_metrics_of(call_metrics, estimated_metrics.unwrap_or_default())?;
        let aliases = aliases_of(aliases.unwrap_or_default(), &call_metrics)?;
        let (name, unit, description) = active_calls;
        let active_calls = Arc::new(MetricSpec {
            name: name.into(),
            unit: unit.into(),
            description: description.into(),
            attributes: Arc::from([]),
            boundaries: Arc::from([]),
        });
        let options = ExportOptions {
            delta_histograms,
            delta_counters,
            layout,
            call_metrics,
            active_calls,
            aliases,
            operation_key: operation_key.into(),
            default_boundaries: boundaries_of(default_boundaries, "default_boundaries")?,
        };
        let class = |role: &str| -> PyResult<PointClass> {
            let entry = point_classes.get_item(role)?.ok_or_else(|| {
                PyValueError::new_err(format!("point_classes has no {role:?} entry"))
            })?;
            PointClass::from_python(&entry, role)
        };
        let exemplar = point_classes
            .get_item("exemplar")?
            .ok_or_else(|| PyValueError::new_err("point_classes has no \"exemplar\" entry"))?
            .unbind();
        let classes = PointClasses {
            histogram: class("histogram")?,
            exponential: class("exponential")?,
            number: class("number")?,
            buckets: class("buckets")?,
            exemplar,
        };
        let export = ExportState::new(options, attached_ns.unwrap_or_else(now_unix_ns));
        let (resets_seen, _) = registry().resets();
        Ok(PyExportState {
            state: Mutex::new(Tracked {
                export,
                resets_seen,
            }),
            classes,
            process_only,
        })
    }

    /// Series in the latest collection.
    #[getter]
    fn series_count(&self) -> usize {
        self.lock().export.series_count()
    }

    /// Values and start times kept for the next collection.
    #[getter]
    fn remembered(&self) -> usize {
        self.lock().export.remembered()
    }

    /// Every series with data as a list of (name, unit, description, kind, points), kind
    /// being "counter", "active" (an up-down counter), "explicit" or "exponential".
    #[pyo3(signature = (now_ns = None))]
    fn collect<'py>(&self, py: Python<'py>, now_ns: Option<u64>) -> PyResult<Bound<'py, PyList>> {
        let now_ns = now_ns.unwrap_or_else(now_unix_ns);
        let metrics = py.detach(|| {
            let mut state = self.lock();
            let group = super::group::in_group() && !self.process_only;
            // A group's totals never reset (a fork child's new epoch is its own values').
            if !group {
                let (resets, last_reset_ns) = registry().resets();
                if resets != state.resets_seen {
                    state.resets_seen = resets;
                    state.export.restart(last_reset_ns);
                }
            }
            let series = if group {
                super::group::series_now()?
            } else {
                registry().snapshot()
            };
            Ok::<_, PyErr>(state.export.collect(&series, now_ns))
        })?;
        let mut builder = Builder::new(py, &self.classes, now_ns);
        let out = PyList::empty(py);
        for metric in &metrics {
            let kind = match metric.kind {
                MetricKind::Counter => "counter",
                MetricKind::UpDownCounter => "active",
                MetricKind::Histogram => "explicit",
                MetricKind::ExponentialHistogram => "exponential",
            };
            let points = metric
                .points
                .iter()
                .map(|point| builder.point(point))
                .collect::<PyResult<Vec<_>>>()?;
            out.append((
                &*metric.name,
                &*metric.unit,
                &*metric.description,
                kind,
                PyList::new(py, points)?,
            ))?;
        }
        Ok(out)
    }
}

impl PyExportState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        // A panic mid-collection leaves nothing half-written that a later one relies on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type PythonPairs<'py> = Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>;

/// Builds the Python points of one collection, sharing what points have in common.
struct Builder<'a, 'py> {
    py: Python<'py>,
    classes: &'a PointClasses,
    now: Bound<'py, PyAny>,
    /// Attribute dicts by the set they were made from (the sets are alive for the whole
    /// collection, so an address is never reused within it).
    attributes: HashMap<usize, Bound<'py, PyDict>>,
    /// A metric's own attributes as Python (key, value) pairs, by the pairs' address.
    extra_attributes: HashMap<usize, PythonPairs<'py>>,
    /// A series' dict with a metric's own attributes added, by the addresses of both (the
    /// points of metrics with the same own attributes share it: a probe measure's
    /// histogram and its estimated total).
    merged: HashMap<(usize, usize), Bound<'py, PyDict>>,
    /// The latest start time made, as Python (the points of a collection mostly share it).
    start: Option<(u64, Bound<'py, PyAny>)>,
    boundaries: HashMap<usize, Bound<'py, PyTuple>>,
    empty_buckets: Option<Bound<'py, PyAny>>,
}

impl<'a, 'py> Builder<'a, 'py> {
    fn new(py: Python<'py>, classes: &'a PointClasses, now_ns: u64) -> Self {
        Builder {
            py,
            classes,
            now: now_ns.into_pyobject(py).unwrap().into_any(),
            attributes: HashMap::new(),
            extra_attributes: HashMap::new(),
            merged: HashMap::new(),
            start: None,
            boundaries: HashMap::new(),
            empty_buckets: None,
        }
    }

    /// The point's attributes: the series' dict (made once per collection and shared by
    /// its points), or a copy of it with the metric's own attributes added.
    fn attributes(
        &mut self,
        set: &AttributeSet,
        extra: &ExtraAttributes,
    ) -> PyResult<Bound<'py, PyDict>> {
        let base = match self.attributes.get(&set.address()) {
            Some(dict) => dict.clone(),
            None => {
                let dict = attributes_to_dict(self.py, set.iter())?;
                self.attributes.insert(set.address(), dict.clone());
                dict
            }
        };
        if extra.is_empty() {
            return Ok(base);
        }
        let address = extra.as_ptr() as usize;
        if let Some(dict) = self.merged.get(&(set.address(), address)) {
            return Ok(dict.clone());
        }
        if !self.extra_attributes.contains_key(&address) {
            let pairs = extra
                .iter()
                .map(|(key, value)| {
                    Ok((
                        PyString::new(self.py, key).into_any(),
                        value_to_python(self.py, value)?,
                    ))
                })
                .collect::<PyResult<Vec<_>>>()?;
            self.extra_attributes.insert(address, pairs);
        }
        let dict = base.copy()?;
        for (key, value) in &self.extra_attributes[&address] {
            dict.set_item(key, value)?;
        }
        self.merged.insert((set.address(), address), dict.clone());
        Ok(dict)
    }

    fn start(&mut self, start_ns: u64) -> PyResult<Bound<'py, PyAny>> {
        if let Some((cached, start)) = &self.start {
            if *cached == start_ns {
                return Ok(start.clone());
            }
        }
        let start = start_ns.into_pyobject(self.py)?.into_any();
        self.start = Some((start_ns, start.clone()));
        Ok(start)
    }

    fn boundaries(&mut self, bounds: &Arc<[f64]>) -> PyResult<Bound<'py, PyTuple>> {
        let address = Arc::as_ptr(bounds) as *const f64 as usize;
        if let Some(tuple) = self.boundaries.get(&address) {
            return Ok(tuple.clone());
        }
        let tuple = PyTuple::new(self.py, bounds.iter())?;
        self.boundaries.insert(address, tuple.clone());
        Ok(tuple)
    }

    fn buckets(&mut self, offset: i32, counts: &[u64]) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if counts.is_empty() && offset == 0 {
            if let Some(empty) = &self.empty_buckets {
                return Ok(empty.clone());
            }
        }
        let buckets = self.classes.buckets.make(
            py,
            &[
                (intern!(py, "offset"), offset.into_pyobject(py)?.into_any()),
                (
                    intern!(py, "bucket_counts"),
                    PyList::new(py, counts)?.into_any(),
                ),
            ],
        )?;
        if counts.is_empty() && offset == 0 {
            self.empty_buckets = Some(buckets.clone());
        }
        Ok(buckets)
    }

    fn exemplars(&self, exemplars: &[Exemplar]) -> PyResult<Bound<'py, PyList>> {
        let py = self.py;
        let class = self.classes.exemplar.bind(py);
        let made = exemplars
            .iter()
            .map(|e| class.call1((py.None(), e.value, e.time_unix_ns, e.span_id, e.trace_id)))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, made)
    }

    fn point(&mut self, point: &Point) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let attributes = self
            .attributes(&point.attributes, &point.extra_attributes)?
            .into_any();
        let start = self.start(point.start_ns)?;
        let exemplars = self.exemplars(&point.exemplars)?.into_any();
        let common = [
            (intern!(py, "attributes"), attributes),
            (intern!(py, "start_time_unix_nano"), start),
            (intern!(py, "time_unix_nano"), self.now.clone()),
            (intern!(py, "exemplars"), exemplars),
        ];
        match &point.data {
            PointData::Number(value) => self.number(common, value.into_pyobject(py)?.into_any()),
            PointData::Integer(value) => self.number(common, value.into_pyobject(py)?.into_any()),
            PointData::Explicit {
                count,
                sum,
                min,
                max,
                bucket_counts,
                boundaries,
            } => {
                let fields = [
                    (intern!(py, "count"), count.into_pyobject(py)?.into_any()),
                    (intern!(py, "sum"), sum.into_pyobject(py)?.into_any()),
                    (
                        intern!(py, "bucket_counts"),
                        PyList::new(py, bucket_counts)?.into_any(),
                    ),
                    (
                        intern!(py, "explicit_bounds"),
                        self.boundaries(boundaries)?.into_any(),
                    ),
                    (intern!(py, "min"), min.into_pyobject(py)?.into_any()),
                    (intern!(py, "max"), max.into_pyobject(py)?.into_any()),
                ];
                let all: Vec<_> = common.into_iter().chain(fields).collect();
                self.classes.histogram.make(py, &all)
            }
            PointData::Exponential(histogram) => self.exponential(common, histogram),
        }
    }

    fn number(
        &self,
        common: [(&Bound<'py, PyString>, Bound<'py, PyAny>); 4],
        value: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let all: Vec<_> = common
            .into_iter()
            .chain([(intern!(py, "value"), value)])
            .collect();
        self.classes.number.make(py, &all)
    }

    fn exponential(
        &mut self,
        common: [(&Bound<'py, PyString>, Bound<'py, PyAny>); 4],
        histogram: &HistogramSnapshot,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let positive = self.buckets(histogram.offset, &histogram.bucket_counts)?;
        let negative = self.buckets(0, &[])?;
        let fields = [
            (
                intern!(py, "count"),
                histogram.count.into_pyobject(py)?.into_any(),
            ),
            (
                intern!(py, "sum"),
                histogram.sum.into_pyobject(py)?.into_any(),
            ),
            (
                intern!(py, "scale"),
                histogram.scale.into_pyobject(py)?.into_any(),
            ),
            (
                intern!(py, "zero_count"),
                histogram.zero_count.into_pyobject(py)?.into_any(),
            ),
            (intern!(py, "positive"), positive),
            (intern!(py, "negative"), negative),
            (intern!(py, "flags"), 0u32.into_pyobject(py)?.into_any()),
            (
                intern!(py, "min"),
                histogram.min.into_pyobject(py)?.into_any(),
            ),
            (
                intern!(py, "max"),
                histogram.max.into_pyobject(py)?.into_any(),
            ),
        ];
        let all: Vec<_> = common.into_iter().chain(fields).collect();
        self.classes.exponential.make(py, &all)
    }
}
