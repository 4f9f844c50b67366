//! An SVG of a sweep, written by hand (no plotting stack): the latency–throughput curve
//! (median TTFT and E2E against output tokens per second, one point per run) and the
//! distributions (CDFs) of TTFT and end-to-end latency of every run.

use std::fmt::Write;

use crate::report::Report;

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 330.0;
const MARGIN: (f64, f64, f64, f64) = (60.0, 20.0, 40.0, 50.0); // left, right, top, bottom
const COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// About five round tick values covering `0..=max`.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel at horizontal offset `x0`, axes from 0 to the largest tick above the data.
struct Panel {
    x0: f64,
    xmax: f64,
    ymax: f64,
}

impl Panel {
    fn new(index: usize, xmax: f64, ymax: f64) -> Panel {
        Panel {
            x0: index as f64 * PANEL_W,
            xmax: *ticks(xmax).last().expect("ticks are never empty"),
            ymax: *ticks(ymax).last().expect("ticks are never empty"),
        }
    }

    fn x(&self, v: f64) -> f64 {
        self.x0 + MARGIN.0 + v / self.xmax * (PANEL_W - MARGIN.0 - MARGIN.1)
    }

    fn y(&self, v: f64) -> f64 {
        PANEL_H - MARGIN.3 - v / self.ymax * (PANEL_H - MARGIN.2 - MARGIN.3)
    }

    fn axes(&self, svg: &mut String, title: &str, xlabel: &str, ylabel: &str) {
        let (left, bottom) = (self.x(0.0), self.y(0.0));
        let (right, top) = (self.x(self.xmax), self.y(self.ymax));
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="22" text-anchor="middle" font-weight="bold">{}</text>"#,
            (left + right) / 2.0,
            escape(title)
        );
        for t in ticks(self.xmax) {
            let x = self.x(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                bottom + 15.0,
                label(t)
            );
        }
        for t in ticks(self.ymax) {
            let y = self.y(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left - 5.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            svg,
            r##"<polyline points="{left:.1},{top:.1} {left:.1},{bottom:.1} {right:.1},{bottom:.1}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (left + right) / 2.0,
            PANEL_H - 12.0,
            escape(xlabel)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            self.x0 + 15.0,
            (top + bottom) / 2.0,
            escape(ylabel)
        );
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str, markers: bool) {
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", self.x(*x), self.y(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            coords.join(" ")
        );
        if markers {
            for (x, y) in points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                    self.x(*x),
                    self.y(*y)
                );
            }
        }
    }

    /// Entries top left, or bottom right (where CDFs, rising from the left, leave room).
    fn legend(&self, svg: &mut String, entries: &[(String, &str)], bottom_right: bool) {
        let (x, y0) = match bottom_right {
            false => (self.x0 + MARGIN.0 + 10.0, MARGIN.2 + 8.0),
            true => (
                self.x0 + PANEL_W - MARGIN.1 - 130.0,
                PANEL_H - MARGIN.3 - 10.0 - (entries.len() as f64 - 1.0) * 16.0,
            ),
        };
        for (i, (name, color)) in entries.iter().enumerate() {
            let y = y0 + i as f64 * 16.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="12" height="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                y - 4.0,
                x + 16.0,
                y + 1.0,
                escape(name)
            );
        }
    }
}

/// Points of the empirical CDF of `samples`: (value, fraction ≤ value), in percent.
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, x)| (*x, (i + 1) as f64 / n * 100.0))
        .collect()
}

/// The whole figure for `reports` (one run or a sweep's runs), with `title` above it.
pub fn svg(reports: &[Report], title: &str) -> String {
    let mut svg = String::new();
    let width = 3.0 * PANEL_W;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" viewBox="0 -24 {width} {}" font-family="sans-serif" font-size="11">"#,
        PANEL_H + 24.0,
        PANEL_H + 24.0
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="-24" width="{width}" height="{}" fill="white"/><text x="{}" y="-6" text-anchor="middle" font-size="13">{}</text>"#,
        PANEL_H + 24.0,
        width / 2.0,
        escape(title)
    );

    // Latency against throughput.
    let median = |s: Option<crate::report::Stats>| s.map(|s| s.median);
    let e2e: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| Some((r.output_throughput, median(r.e2e_ms)?)))
        .collect();
    let ttft: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| Some((r.output_throughput, median(r.ttft_ms)?)))
        .collect();
    let fmax = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).fold(0.0, f64::max);
    let curve = Panel::new(
        0,
        fmax(&e2e, |p| p.0),
        fmax(&e2e, |p| p.1).max(fmax(&ttft, |p| p.1)),
    );
    curve.axes(
        &mut svg,
        "Latency vs throughput",
        "output tokens/s",
        "median latency (ms)",
    );
    curve.line(&mut svg, &e2e, COLORS[0], true);
    curve.line(&mut svg, &ttft, COLORS[1], true);
    for r in reports {
        let Some(y) = median(r.e2e_ms) else { continue };
        let short = r.label.rsplit('=').next().unwrap_or(&r.label);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            curve.x(r.output_throughput) + 5.0,
            curve.y(y) - 5.0,
            escape(short)
        );
    }
    curve.legend(
        &mut svg,
        &[("E2E".into(), COLORS[0]), ("TTFT".into(), COLORS[1])],
        false,
    );

    // Distributions.
    let entries: Vec<(String, &str)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| (r.label.clone(), COLORS[i % COLORS.len()]))
        .collect();
    type Pick = fn(&crate::report::RequestRecord) -> Option<f64>;
    let picks: [(&str, Pick); 2] = [
        ("TTFT distribution", |r| r.ttft_ms),
        ("End-to-end latency distribution", |r| Some(r.e2e_ms)),
    ];
    for (index, (name, pick)) in picks.into_iter().enumerate() {
        let series: Vec<Vec<(f64, f64)>> = reports
            .iter()
            .map(|r| {
                let ok = r.requests.iter().filter(|q| q.error.is_none());
                cdf(&ok.filter_map(pick).collect::<Vec<_>>())
            })
            .collect();
        let xmax = series.iter().flatten().map(|p| p.0).fold(0.0, f64::max);
        let panel = Panel::new(index + 1, xmax, 100.0);
        panel.axes(&mut svg, name, "ms", "% of requests ≤");
        for (s, (_, color)) in series.iter().zip(&entries) {
            panel.line(&mut svg, s, color, false);
        }
        panel.legend(&mut svg, &entries, true);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ticks() {
        assert_eq!(ticks(100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(7.0), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(0.0).len(), 6);
        assert!(*ticks(1234.0).last().unwrap() >= 1234.0);
    }

    #[test]
    fn cdf_ends_at_all_requests() {
        let c = cdf(&[3.0, 1.0, 2.0, 4.0]);
        assert_eq!(c.first(), Some(&(1.0, 25.0)));
        assert_eq!(c.last(), Some(&(4.0, 100.0)));
    }
}
