//! Bridge: turning aggregates into the shapes exporters want, at collection time (never on
//! the hot path): explicit-bucket counts, bucket-limited exponential histograms, deltas.

pub mod export;
pub mod histogram;
pub mod names;
