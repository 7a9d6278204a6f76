//! Counters of what the runtime does, rendered in the Prometheus text exposition format.
//!
//! Counters are plain atomics owned by the thing they count (a flow, a circuit breaker), so
//! counting costs one relaxed atomic add on the hot path and nothing else; the [`Metrics`]
//! registry (kept in [`Resources`]) only holds references for rendering. No metrics crate: the
//! text format is small, stable and documented, and the set of series is fixed by the code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_core::Resources;

use crate::resilience::breaker::{CircuitBreakers, CircuitState};

/// What happened to the messages a flow admitted.
#[derive(Debug, Default)]
pub struct FlowMetrics {
    received: AtomicU64,
    completed: AtomicU64,
    handled: AtomicU64,
    dead_lettered: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicI64,
}

/// How a message left a flow, for [`FlowMetrics::finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Every target committed it.
    Completed,
    /// It failed and the flow's `on_error` steps answered instead.
    Handled,
    /// It failed and went to the flow's dead letter.
    DeadLettered,
    /// It failed and was nacked back to its source.
    Failed,
}

impl FlowMetrics {
    /// A message entered the flow.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A message the flow received has left it.
    pub fn finished(&self, how: Finish) {
        let counter = match how {
            Finish::Completed => &self.completed,
            Finish::Handled => &self.handled,
            Finish::DeadLettered => &self.dead_lettered,
            Finish::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Messages received so far.
    pub fn received_count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Messages that left the flow this way so far.
    pub fn finished_count(&self, how: Finish) -> u64 {
        match how {
            Finish::Completed => &self.completed,
            Finish::Handled => &self.handled,
            Finish::DeadLettered => &self.dead_lettered,
            Finish::Failed => &self.failed,
        }
        .load(Ordering::Relaxed)
    }

    /// Messages inside the flow now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Every flow's metrics by flow name; one per process, in [`Resources`].
#[derive(Debug, Default)]
pub struct Metrics {
    flows: Mutex<BTreeMap<String, Arc<FlowMetrics>>>,
}

impl Metrics {
    /// Registers the metrics of the flow called `name` (a rebuilt flow replaces the old one).
    pub fn register_flow(&self, name: &str, metrics: Arc<FlowMetrics>) {
        if let Ok(mut flows) = self.flows.lock() {
            flows.insert(name.to_owned(), metrics);
        }
    }

    fn flows(&self) -> Vec<(String, Arc<FlowMetrics>)> {
        self.flows
            .lock()
            .map(|f| f.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default()
    }
}

/// Renders every metric of the process in the Prometheus text format (version 0.0.4).
pub fn render(resources: &Resources) -> String {
    let mut out = String::new();
    let flows = resources.get_or_default::<Metrics>().flows();
    family(
        &mut out,
        "sluice_flow_messages_total",
        "counter",
        "Messages per flow: received, and how they left (completed, handled by on_error, dead_lettered, failed).",
    );
    for (flow, m) in &flows {
        sample(
            &mut out,
            "sluice_flow_messages_total",
            &[("flow", flow), ("outcome", "received")],
            m.received_count(),
        );
        for (how, outcome) in [
            (Finish::Completed, "completed"),
            (Finish::Handled, "handled"),
            (Finish::DeadLettered, "dead_lettered"),
            (Finish::Failed, "failed"),
        ] {
            sample(
                &mut out,
                "sluice_flow_messages_total",
                &[("flow", flow), ("outcome", outcome)],
                m.finished_count(how),
            );
        }
    }
    family(
        &mut out,
        "sluice_flow_in_flight",
        "gauge",
        "Messages inside each flow now.",
    );
    for (flow, m) in &flows {
        sample(
            &mut out,
            "sluice_flow_in_flight",
            &[("flow", flow)],
            m.in_flight(),
        );
    }

    let breakers = resources.get_or_default::<CircuitBreakers>().snapshots();
    family(
        &mut out,
        "sluice_circuit_breaker_state",
        "gauge",
        "1 for the state each circuit breaker (flow/step) is in, 0 for the others.",
    );
    for b in &breakers {
        for (state, label) in [
            (CircuitState::Closed, "closed"),
            (CircuitState::Open, "open"),
            (CircuitState::HalfOpen, "half_open"),
        ] {
            sample(
                &mut out,
                "sluice_circuit_breaker_state",
                &[("breaker", &b.name), ("state", label)],
                u64::from(b.state == state),
            );
        }
    }
    family(
        &mut out,
        "sluice_circuit_breaker_calls_total",
        "counter",
        "Calls through each circuit breaker: succeeded, failed (counted against it), rejected while open.",
    );
    for b in &breakers {
        for (outcome, value) in [
            ("success", b.counts.successes),
            ("failure", b.counts.failures),
            ("rejected", b.counts.rejected),
        ] {
            sample(
                &mut out,
                "sluice_circuit_breaker_calls_total",
                &[("breaker", &b.name), ("outcome", outcome)],
                value,
            );
        }
    }
    family(
        &mut out,
        "sluice_circuit_breaker_opened_total",
        "counter",
        "Times each circuit breaker opened.",
    );
    for b in &breakers {
        sample(
            &mut out,
            "sluice_circuit_breaker_opened_total",
            &[("breaker", &b.name)],
            b.counts.opened,
        );
    }
    // Only once something opened the store: rendering must not open it (and lock the directory).
    if let Some(in_use) = resources
        .get_or_default::<crate::durable::DurableStore>()
        .reserve_in_use()
    {
        family(
            &mut out,
            "sluice_store_reserve_in_use",
            "gauge",
            "1 while the durable store's disk reserve is in use: the disk filled up, new messages are refused and consumers drain; 0 otherwise.",
        );
        sample(
            &mut out,
            "sluice_store_reserve_in_use",
            &[],
            u64::from(in_use),
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if labels.is_empty() {
        let _ = writeln!(out, " {value}");
        return;
    }
    out.push('{');
    for (i, (label, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{label}=\"");
        escape_label(out, value);
        out.push('"');
    }
    let _ = writeln!(out, "}} {value}");
}

/// Label values escape backslash, double quote and line feed; nothing else.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::breaker::{BreakerConfig, CircuitBreaker};

    #[test]
    fn flows_are_rendered_with_every_outcome_and_in_flight() {
        let resources = Resources::default();
        let m = Arc::new(FlowMetrics::default());
        resources
            .get_or_default::<Metrics>()
            .register_flow("orders \"eu\"", Arc::clone(&m));
        for _ in 0..3 {
            m.received();
        }
        m.finished(Finish::Completed);
        m.finished(Finish::DeadLettered);
        let text = render(&resources);
        assert!(text.contains("# TYPE sluice_flow_messages_total counter\n"));
        assert!(text.contains(
            "sluice_flow_messages_total{flow=\"orders \\\"eu\\\"\",outcome=\"received\"} 3\n"
        ));
        assert!(text.contains(
            "sluice_flow_messages_total{flow=\"orders \\\"eu\\\"\",outcome=\"dead_lettered\"} 1\n"
        ));
        assert!(text.contains(
            "sluice_flow_messages_total{flow=\"orders \\\"eu\\\"\",outcome=\"failed\"} 0\n"
        ));
        assert!(text.contains("sluice_flow_in_flight{flow=\"orders \\\"eu\\\"\"} 1\n"));
    }

    #[test]
    fn a_breaker_shows_its_state_as_one_of_three() {
        let resources = Resources::default();
        let breaker = Arc::new(CircuitBreaker::new(
            "f/call".to_owned(),
            BreakerConfig {
                failure_rate: 50,
                window: 10,
                minimum_calls: 5,
                open_for: sluice_core::duration::HumanDuration(std::time::Duration::from_secs(1)),
                half_open_calls: 1,
                on: None,
                fallback: None,
            },
        ));
        resources
            .get_or_default::<CircuitBreakers>()
            .insert(breaker);
        let text = render(&resources);
        assert!(
            text.contains("sluice_circuit_breaker_state{breaker=\"f/call\",state=\"closed\"} 1\n")
        );
        assert!(
            text.contains("sluice_circuit_breaker_state{breaker=\"f/call\",state=\"open\"} 0\n")
        );
        assert!(text.contains("sluice_circuit_breaker_opened_total{breaker=\"f/call\"} 0\n"));
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        let mut out = String::new();
        escape_label(&mut out, "a\\b\"c\nd");
        assert_eq!(out, "a\\\\b\\\"c\\nd");
    }
}
