//! Aggregation: lock-free histograms, series keyed by attributes, the registry, the
//! sampling policy and the call wrapper's logic.

pub mod alongside;
pub mod attributes;
pub mod boundaries;
pub mod call;
pub mod call_key;
pub mod epoch;
pub mod exemplars;
pub mod histogram;
pub mod lazy;
pub mod registry;
pub mod request_series;
pub mod sampling;
pub mod series;
pub mod series_map;
pub mod snapshot;
