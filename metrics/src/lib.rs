//! Prometheus metrics in the text exposition format (0.0.4), kept small on purpose: counters,
//! gauges and histograms, each a labelled family. The coordinator and every worker keep a
//! [`Registry`] and serve its rendering on `/metrics`.
//!
//! Values are atomics so the hot paths (a step, an exchange) record without locks; a family's
//! label map is locked only to find or create a child.

mod serve;

pub use serve::{serve_http, MAX_CONNECTIONS};

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A value that only goes up.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into cumulative buckets, with their sum and count.
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus `+Inf`; not cumulative (rendering sums them).
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// How a metric renders its samples.
pub trait Metric: Send + Sync + 'static {
    const TYPE: &'static str;
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), number(self.get()));
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| number(*b));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), number(self.sum()));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

fn braces(labels: &str) -> String {
    match labels {
        "" => String::new(),
        l => format!("{{{l}}}"),
    }
}

fn number(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => format!("{v}"),
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Metrics of one name, one child per set of label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    children: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
    make: Box<dyn Fn() -> M + Send + Sync>,
}

impl<M: Metric> Family<M> {
    /// The child for these label values (one per label name, in order), made on first use.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        assert_eq!(
            values.len(),
            self.labels.len(),
            "{}: label values",
            self.name
        );
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.children
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_insert_with(|| Arc::new((self.make)()))
            .clone()
    }

    /// Forgets every child (for gauges whose label sets change, e.g. after a re-plan).
    pub fn clear(&self) {
        self.children.lock().expect("not poisoned").clear();
    }

    /// Every child with its label values.
    pub fn children(&self) -> Vec<(Vec<String>, Arc<M>)> {
        let children = self.children.lock().expect("not poisoned");
        children
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }
}

trait Render: Send + Sync {
    fn name(&self) -> &'static str;
    fn header(&self, out: &mut String);
    fn samples(&self, constant: &str, out: &mut String);
}

impl<M: Metric> Render for Family<M> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn header(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
    }

    fn samples(&self, constant: &str, out: &mut String) {
        for (values, m) in self.children() {
            let mut labels: Vec<String> = self
                .labels
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(&v)))
                .collect();
            if !constant.is_empty() {
                labels.push(constant.to_string());
            }
            m.render(self.name, &labels.join(","), out);
        }
    }
}

/// A set of families, with labels added to every sample (e.g. `worker="…"`).
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<dyn Render>>>,
    constant: Mutex<Vec<(String, String)>>,
}

pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

impl Registry {
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Arc<Family<Counter>> {
        self.add(name, help, labels, Counter::default)
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Arc<Family<Gauge>> {
        self.add(name, help, labels, Gauge::default)
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Arc<Family<Histogram>> {
        self.add(name, help, labels, move || Histogram::new(bounds))
    }

    fn add<M: Metric>(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Arc<Family<M>> {
        let family = Arc::new(Family {
            name,
            help,
            labels,
            children: Mutex::default(),
            make: Box::new(make),
        });
        let mut families = self.families.lock().expect("not poisoned");
        assert!(
            families.iter().all(|f| f.name() != name),
            "metric {name} registered twice"
        );
        families.push(family.clone());
        family
    }

    /// Adds `key="value"` to every sample (replacing an earlier value of `key`).
    pub fn set_label(&self, key: &str, value: &str) {
        let mut constant = self.constant.lock().expect("not poisoned");
        constant.retain(|(k, _)| k != key);
        constant.push((key.to_string(), value.to_string()));
    }

    fn constant_labels(&self) -> String {
        let constant = self.constant.lock().expect("not poisoned");
        constant
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn render(&self) -> String {
        render(&[self])
    }
}

/// A family and the constant labels of its registry.
type Member = (Arc<dyn Render>, String);

/// The text of several registries as one exposition: families of the same name (e.g. the same
/// worker metric from several in-process workers) share one HELP/TYPE header.
pub fn render(registries: &[&Registry]) -> String {
    // Each name's members: the family of every registry that has it, with that registry's
    // constant labels.
    let mut by_name: BTreeMap<&'static str, Vec<Member>> = BTreeMap::new();
    for r in registries {
        let constant = r.constant_labels();
        for f in r.families.lock().expect("not poisoned").iter() {
            by_name
                .entry(f.name())
                .or_default()
                .push((f.clone(), constant.clone()));
        }
    }
    let mut out = String::new();
    for members in by_name.values() {
        members[0].0.header(&mut out);
        for (f, constant) in members {
            f.samples(constant, &mut out);
        }
    }
    out
}

/// An HTTP router serving `render()` on `GET /metrics` in the text format.
pub fn router<F>(render: F) -> axum::Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::default();
        let c = r.counter("x_total", "Things.", &["kind"]);
        c.with(&["a\"b"]).add(3);
        let h = r.histogram("lat_seconds", "Latency.", &[], &[0.125, 1.0]);
        let h = h.with(&[]);
        for v in [0.0625, 0.125, 0.5, 7.0] {
            h.observe(v);
        }
        r.set_label("worker", "w1");
        let text = r.render();
        assert!(text.contains("# TYPE x_total counter\n"), "{text}");
        assert!(
            text.contains("x_total{kind=\"a\\\"b\",worker=\"w1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{worker=\"w1\",le=\"0.125\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{worker=\"w1\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{worker=\"w1\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_sum{worker=\"w1\"} 7.6875\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_count{worker=\"w1\"} 4\n"),
            "{text}"
        );
    }

    #[test]
    fn merges_registries_under_one_header() {
        let (a, b) = (Registry::default(), Registry::default());
        for (r, w) in [(&a, "a"), (&b, "b")] {
            r.gauge("up", "Up.", &[]).with(&[]).set(1.0);
            r.set_label("worker", w);
        }
        let text = render(&[&a, &b]);
        assert_eq!(text.matches("# HELP up").count(), 1, "{text}");
        assert!(
            text.contains("up{worker=\"a\"} 1\nup{worker=\"b\"} 1\n"),
            "{text}"
        );
    }
}
