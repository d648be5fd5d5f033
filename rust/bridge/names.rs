//! Names a custom instrument cannot take: meterage's own exported metrics, under any
//! spelling that an exporter would turn into the same name.
//!
//! A custom histogram called `meterage.call.duration` (or `meterage_call_duration_seconds`,
//! which Prometheus spells the same) would be merged into meterage's own metric or make
//! the exposition hold one name twice, which fails every scrape.

/// Metric names meterage exports outside its own `meterage.` namespace.
pub const EXPORTED: &[&str] = &[
    "process.cpu.time",
    "process.cpu.utilization",
    "process.memory.usage",
    "process.memory.virtual",
    "process.disk.io",
    "process.network.io",
    "process.paging.faults",
    "process.context_switches",
    "process.thread.count",
    "process.unix.file_descriptor.count",
    "process.uptime",
    "system.cpu.time",
    "system.cpu.utilization",
    "system.memory.usage",
    "system.memory.utilization",
    "system.memory.limit",
    "system.disk.io",
    "system.disk.operations",
    "system.network.io",
    "system.network.packets",
    "system.network.errors",
    "system.filesystem.usage",
    "container.cpu.time",
    "container.cpu.limit",
    "container.memory.usage",
    "container.memory.limit",
    "hw.gpu.utilization",
    "hw.gpu.memory.usage",
    "hw.gpu.memory.limit",
    "hw.gpu.memory.utilization",
    "hw.power",
    "hw.energy",
    "hw.temperature",
    // Semantic-convention aliases of call series (python/meterage/otel/_names.py ALIASES).
    "http.server.request.duration",
    "http.server.active_requests",
    "messaging.process.duration",
];

/// Every name in meterage's own namespace is its own.
const NAMESPACE: &str = "meterage_";

/// Suffixes the Prometheus exporter adds for units and counters.
const SUFFIXES: &[&str] = &[
    "_total",
    "_seconds",
    "_bytes",
    "_ratio",
    "_joules",
    "_watts",
    "_celsius",
    "_milliseconds",
];

/// The name as Prometheus spells it: every character outside `[a-zA-Z0-9_:]` becomes `_`.
pub fn normalized(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Strips the exporter's suffixes (a unit, then `_total`, in either order).
fn base(mut name: &str) -> &str {
    for _ in 0..2 {
        if let Some(stripped) = SUFFIXES.iter().find_map(|suffix| name.strip_suffix(suffix)) {
            name = stripped;
        }
    }
    name
}

/// The family a name is exported in, by Prometheus: its spelling with the exporter's
/// suffixes taken off (a unit's, `_total`), so "lat" with unit s and "lat_seconds" are one.
pub fn family(name: &str) -> String {
    base(&normalized(name)).to_owned()
}

/// The metric of meterage's that `name` would collide with, if any.
pub fn reserved_by(name: &str) -> Option<String> {
    let normalized = normalized(name).to_ascii_lowercase();
    if normalized.starts_with(NAMESPACE) || normalized == "meterage" {
        return Some("the meterage.* namespace".to_owned());
    }
    let base = base(&normalized);
    EXPORTED
        .iter()
        .find(|exported| {
            self::normalized(exported) == base || self::normalized(exported) == normalized
        })
        .map(|exported| format!("meterage's {exported} metric"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meterage_names_and_their_spellings_are_reserved() {
        for name in [
            "meterage.call.duration",
            "meterage_call_duration_seconds",
            "Meterage.Series",
            "process.cpu.time",
            "process_cpu_time_seconds_total",
            "hw.power",
            "system.network.io",
            "http.server.request.duration",
            "http_server_request_duration_seconds",
            "http_server_active_requests",
            "messaging.process.duration",
        ] {
            assert!(reserved_by(name).is_some(), "{name}");
        }
        for name in [
            "llm.tokens",
            "process.queue.depth",
            "my.meterage.thing",
            "hw",
            "http.server.request.size",
            "messaging.process.count",
        ] {
            assert!(reserved_by(name).is_none(), "{name}");
        }
    }
}
