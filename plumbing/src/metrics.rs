//! Prometheus text exposition (format 0.0.4), written in one place.
//!
//! A [`Writer`] collects samples family by family: each family gets its `# HELP` and `# TYPE`
//! once, followed by all its samples, whatever order the caller produced them in. That lets a
//! caller walk its objects once (disk by disk, say) and add a sample to several families from
//! each. Label values and help text are escaped as the format asks (backslash, double quote,
//! newline), so a name with odd bytes cannot break the text. Families without samples are left
//! out.
//!
//! ```
//! use plumbing::metrics::{Kind, Writer};
//!
//! let mut w = Writer::new();
//! w.family("requests_total", Kind::Counter, "Requests finished.");
//! w.sample("requests_total", &[("disk", "a")], 3u64);
//! assert_eq!(w.finish(), "# HELP requests_total Requests finished.\n# TYPE requests_total counter\nrequests_total{disk=\"a\"} 3\n");
//! ```

use std::fmt::Write as _;

/// The type of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Written with [`Writer::histogram`]: `_bucket`, `_sum` and `_count` series.
    Histogram,
    /// Samples added to a family nobody declared.
    Untyped,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Untyped => "untyped",
        }
    }
}

/// A sample's value: integers are written exactly, floats as the format spells them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(u64::from(v))
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

struct Family {
    name: String,
    kind: Kind,
    help: String,
    /// The family's sample lines, complete.
    body: String,
}

/// Prometheus text being built; [`Writer::finish`] gives it, families in the order they were
/// first declared (or first sampled).
#[derive(Default)]
pub struct Writer {
    families: Vec<Family>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Declares a family. Declaring it again changes nothing, so a caller may declare in a loop.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Writer {
        if let Some(f) = self.find(name) {
            if f.kind == Kind::Untyped && f.help.is_empty() {
                (f.kind, f.help) = (kind, help.to_owned());
            }
        } else {
            debug_assert!(valid_name(name), "metric name {name:?}");
            self.families.push(Family { name: name.to_owned(), kind, help: help.to_owned(), body: String::new() });
        }
        self
    }

    /// Adds one sample to family `name` (declared as untyped if it was not declared).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) -> &mut Writer {
        let value = value.into();
        let body = self.body(name);
        series(body, name, "", labels, None);
        let _ = writeln!(body, " {value}");
        self
    }

    /// Adds one histogram to family `name`: `buckets` are (upper bound, count of observations
    /// in that bucket alone), bounds rising; a `+Inf` bucket is added when the last bound is
    /// finite. `_count` is the sum of the counts.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: impl IntoIterator<Item = (f64, u64)>,
        sum: f64,
    ) -> &mut Writer {
        let body = self.body(name);
        let mut cumulative = 0u64;
        let mut last = f64::NEG_INFINITY;
        for (le, n) in buckets {
            cumulative = cumulative.saturating_add(n);
            last = le;
            let le = Value::Float(le).to_string();
            series(body, name, "_bucket", labels, Some(&le));
            let _ = writeln!(body, " {cumulative}");
        }
        if last != f64::INFINITY {
            series(body, name, "_bucket", labels, Some("+Inf"));
            let _ = writeln!(body, " {cumulative}");
        }
        series(body, name, "_sum", labels, None);
        let _ = writeln!(body, " {}", Value::Float(sum));
        series(body, name, "_count", labels, None);
        let _ = writeln!(body, " {cumulative}");
        self
    }

    /// The text: each family with samples, its header first.
    pub fn finish(self) -> String {
        let mut out = String::with_capacity(self.families.iter().map(|f| f.body.len() + 80).sum());
        for f in self.families.iter().filter(|f| !f.body.is_empty()) {
            if !f.help.is_empty() {
                let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            }
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.name());
            out.push_str(&f.body);
        }
        out
    }

    fn find(&mut self, name: &str) -> Option<&mut Family> {
        self.families.iter_mut().find(|f| f.name == name)
    }

    fn body(&mut self, name: &str) -> &mut String {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.family(name, Kind::Untyped, "");
                self.families.len() - 1
            }
        };
        &mut self.families[i].body
    }
}

/// Writes `name{suffix}{labels,le="..."}` without the value.
fn series(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], le: Option<&str>) {
    out.push_str(name);
    out.push_str(suffix);
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    for (i, (key, value)) in all.enumerate() {
        if i > 0 {
            out.push(',');
        }
        debug_assert!(valid_name(key), "label name {key:?}");
        out.push_str(key);
        out.push_str("=\"");
        escape_into(out, value, true);
        out.push('"');
    }
    out.push('}');
}

/// A label value as the format writes it: backslash, double quote and newline escaped.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    escape_into(&mut out, value, true);
    out
}

/// Help text as the format writes it: backslash and newline escaped (a quote is fine there).
fn escape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    escape_into(&mut out, help, false);
    out
}

fn escape_into(out: &mut String, s: &str, quote: bool) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the names the format allows (checked in debug builds: names come
/// from code, never from input).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_keep_their_samples_together_whatever_the_order_they_came_in() {
        let mut w = Writer::new();
        w.family("a_total", Kind::Counter, "A.").family("b", Kind::Gauge, "B.");
        for disk in ["x", "y"] {
            w.sample("a_total", &[("disk", disk)], 1u64);
            w.sample("b", &[("disk", disk)], 2.5);
        }
        w.family("a_total", Kind::Gauge, "declared again: ignored");
        assert_eq!(
            w.finish(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{disk=\"x\"} 1\na_total{disk=\"y\"} 1\n\
             # HELP b B.\n# TYPE b gauge\nb{disk=\"x\"} 2.5\nb{disk=\"y\"} 2.5\n"
        );
    }

    #[test]
    fn empty_families_are_left_out_and_unlabelled_samples_have_no_braces() {
        let mut w = Writer::new();
        w.family("unused", Kind::Gauge, "Nothing.");
        w.family("up", Kind::Gauge, "Up.");
        w.sample("up", &[], true);
        w.sample("stray", &[], 7u32);
        assert_eq!(w.finish(), "# HELP up Up.\n# TYPE up gauge\nup 1\n# TYPE stray untyped\nstray 7\n");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut w = Writer::new();
        w.family("m", Kind::Gauge, "back\\slash \"quoted\"\nsecond line");
        w.sample("m", &[("disk", "a\"b\\c\nd")], 0u64);
        assert_eq!(
            w.finish(),
            "# HELP m back\\\\slash \"quoted\"\\nsecond line\n# TYPE m gauge\nm{disk=\"a\\\"b\\\\c\\nd\"} 0\n"
        );
        assert_eq!(escape_label("plain"), "plain");
    }

    #[test]
    fn floats_are_spelled_as_the_format_wants() {
        let text = |v: f64| Value::Float(v).to_string();
        assert_eq!(text(f64::INFINITY), "+Inf");
        assert_eq!(text(f64::NEG_INFINITY), "-Inf");
        assert_eq!(text(f64::NAN), "NaN");
        assert_eq!(text(0.000001), "0.000001");
        assert_eq!(text(1.0), "1");
        assert_eq!(Value::from(usize::MAX).to_string(), u64::MAX.to_string());
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket_sum_and_count() {
        let mut w = Writer::new();
        w.family("lat_seconds", Kind::Histogram, "Latency.");
        w.histogram("lat_seconds", &[("k", "r")], [(0.5, 2), (1.0, 0), (2.0, 3)], 4.25);
        w.histogram("lat_seconds", &[], [(1.0, 1), (f64::INFINITY, 1)], 3.0);
        assert_eq!(
            w.finish(),
            "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{k=\"r\",le=\"0.5\"} 2\nlat_seconds_bucket{k=\"r\",le=\"1\"} 2\n\
             lat_seconds_bucket{k=\"r\",le=\"2\"} 5\nlat_seconds_bucket{k=\"r\",le=\"+Inf\"} 5\n\
             lat_seconds_sum{k=\"r\"} 4.25\nlat_seconds_count{k=\"r\"} 5\n\
             lat_seconds_bucket{le=\"1\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 2\n\
             lat_seconds_sum 3\nlat_seconds_count 2\n"
        );
    }
}
