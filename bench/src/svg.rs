//! Charts as plain SVG (no fonts or libraries needed to make them; any browser shows them): line
//! charts for the benchmarks, timelines (Gantt charts over minutes) for the rotation docs.

use std::fmt::Write as _;

pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    pub markers: bool,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 58.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `target` ticks.
fn step(max: f64, target: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        let v = v.round() as i64;
        if v.abs() >= 10_000 {
            // 12,500
            let s = v.abs().to_string();
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i).is_multiple_of(3) {
                    out.push(',');
                }
                out.push(c);
            }
            if v < 0 { format!("-{out}") } else { out }
        } else {
            v.to_string()
        }
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

pub fn render(chart: &Chart) -> String {
    let max_x = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(0.0, f64::max);
    let max_y = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let (sx, sy) = (step(max_x, 6.0), step(max_y, 5.0));
    let (top_x, top_y) = ((max_x / sx).ceil().max(1.0) * sx, (max_y / sy).ceil().max(1.0) * sy);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + x / top_x * pw;
    let py = |y: f64| TOP + ph - y / top_y * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(&chart.title)
    );
    // Grid and ticks.
    let mut v = 0.0;
    while v <= top_y + sy * 0.01 {
        let y = py(v);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##, LEFT + pw);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v, sy)
        );
        v += sy;
    }
    let mut v = 0.0;
    while v <= top_x + sx * 0.01 {
        let x = px(v);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##, TOP + ph);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            fmt_tick(v, sx)
        );
        v += sx;
    }
    let _ = writeln!(s, r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 14.0,
        esc(&chart.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        esc(&chart.y_label)
    );
    for series in &chart.series {
        if series.points.is_empty() {
            continue;
        }
        let path: Vec<String> = series.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            series.color,
            path.join(" ")
        );
        if series.markers {
            for (x, y) in &series.points {
                let _ =
                    writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#, px(*x), py(*y), series.color);
            }
        }
    }
    // Legend, top left inside the plot, on a veil so that curves under it stay readable.
    let longest = chart.series.iter().map(|s| s.label.chars().count()).max().unwrap_or(0) as f64;
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##,
        LEFT + 6.0,
        TOP + 5.0,
        longest * 6.6 + 50.0,
        chart.series.len() as f64 * 18.0 + 6.0
    );
    for (i, series) in chart.series.iter().enumerate() {
        let y = TOP + 16.0 + i as f64 * 18.0;
        let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
            LEFT + 12.0,
            LEFT + 38.0,
            series.color
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, LEFT + 44.0, y + 4.0, esc(&series.label));
    }
    s.push_str("</svg>\n");
    s
}

/// At most `max` points of a curve, keeping its first and last.
pub fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(max);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(stride).copied().collect();
    if out.last() != points.last() {
        out.push(*points.last().unwrap());
    }
    out
}

/// A style of bar: its colour, the colour of its label, and its label (long, or short where the
/// long one does not fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarStyle {
    pub fill: &'static str,
    pub ink: &'static str,
    pub long: &'static str,
    pub short: &'static str,
}

/// One row of a timeline: its bars `(from, to, style)` in minutes, and where it ended.
pub struct Row {
    pub label: String,
    pub bars: Vec<(i64, i64, BarStyle)>,
    /// The minute the row's subject was deleted, if it was.
    pub deleted_at: Option<i64>,
}

/// A timeline over minutes: rows of bars, and marks (dashed lines, labelled or not) for events.
pub struct Timeline {
    pub title: String,
    /// The minutes shown.
    pub view: (i64, i64),
    pub rows: Vec<Row>,
    pub marks: Vec<(i64, String)>,
}

/// `hh:mm` of a minute.
pub fn hhmm(m: i64) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// Width of a label in 12px sans-serif, roughly.
fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * 6.4
}

/// Timelines one under the other, then a legend (two entries a line) and a footnote.
/// `generated_by` goes into a comment at the top.
pub fn render_timelines(
    timelines: &[Timeline],
    legend: &[(BarStyle, &str)],
    footnote: &str,
    generated_by: &str,
) -> String {
    const W: f64 = 980.0;
    const LEFT: f64 = 110.0;
    const RIGHT: f64 = 30.0;
    const LANE: f64 = 26.0;
    let mut out = String::new();
    let mut body = String::new();
    let mut y = 10.0;
    for tl in timelines {
        let (v0, v1) = tl.view;
        let x = |m: i64| LEFT + (m.clamp(v0, v1) - v0) as f64 / (v1 - v0) as f64 * (W - LEFT - RIGHT);
        body.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"bold\" font-size=\"14\">{}</text>\n",
            y + 16.0,
            esc(&tl.title)
        ));
        let lanes_top = y + 28.0;
        let marks_top = lanes_top + tl.rows.len() as f64 * (LANE + 8.0) + 4.0;
        // Marks, with labels stacked so they do not overlap.
        let mut label_rows: Vec<f64> = vec![];
        let mut labels = String::new();
        for (m, label) in &tl.marks {
            let mx = x(*m);
            body.push_str(&format!(
                "<line x1=\"{mx:.1}\" y1=\"{lanes_top:.1}\" x2=\"{mx:.1}\" y2=\"{:.1}\" stroke=\"#455a64\" stroke-dasharray=\"3,3\"/>\n",
                marks_top + 4.0
            ));
            body.push_str(&format!(
                "<circle cx=\"{mx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#455a64\"/>\n",
                marks_top + 4.0
            ));
            if label.is_empty() {
                continue;
            }
            let row = label_rows.iter().position(|end| *end < mx - 4.0).unwrap_or_else(|| {
                label_rows.push(f64::MIN);
                label_rows.len() - 1
            });
            label_rows[row] = mx + text_width(label);
            labels.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#263238\">{}</text>\n",
                mx + 3.0,
                marks_top + 20.0 + row as f64 * 15.0,
                esc(label)
            ));
        }
        let axis_y = marks_top + 26.0 + label_rows.len() as f64 * 15.0;
        for (i, row) in tl.rows.iter().enumerate() {
            let ly = lanes_top + i as f64 * (LANE + 8.0);
            body.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"13\" text-anchor=\"end\">{}</text>\n",
                LEFT - 8.0,
                ly + 17.0,
                esc(&row.label)
            ));
            for &(from, to, style) in &row.bars {
                if to <= v0 || from >= v1 {
                    continue;
                }
                let (x0, x1) = (x(from), x(to));
                body.push_str(&format!(
                    "<rect x=\"{x0:.1}\" y=\"{ly:.1}\" width=\"{:.1}\" height=\"{LANE}\" rx=\"3\" fill=\"{}\"/>\n",
                    x1 - x0,
                    style.fill
                ));
                let label = [style.long, style.short].into_iter().find(|l| text_width(l) + 10.0 < x1 - x0);
                if let Some(label) = label {
                    body.push_str(&format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"{}\">{}</text>\n",
                        x0 + 6.0,
                        ly + 17.0,
                        style.ink,
                        esc(label)
                    ));
                }
            }
            if let Some(d) = row.deleted_at {
                body.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#b71c1c\">✕ deleted</text>\n",
                    x(d) + 4.0,
                    ly + 17.0
                ));
            }
        }
        body.push_str(&labels);
        body.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#90a4ae\"/>\n",
            W - RIGHT
        ));
        let mut m = v0 + (15 - v0.rem_euclid(15)) % 15;
        while m <= v1 {
            body.push_str(&format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#90a4ae\"/>\n\
                 <text x=\"{0:.1}\" y=\"{3:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#546e7a\">{4}</text>\n",
                x(m),
                axis_y,
                axis_y + 4.0,
                axis_y + 16.0,
                hhmm(m)
            ));
            m += 15;
        }
        y = axis_y + 34.0;
    }
    for (i, (style, text)) in legend.iter().enumerate() {
        let lx = LEFT + (i % 2) as f64 * 330.0;
        if i > 0 && i % 2 == 0 {
            y += 20.0;
        }
        body.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"14\" rx=\"2\" fill=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#263238\">{}</text>\n",
            y - 12.0,
            style.fill,
            lx + 19.0,
            y,
            esc(text)
        ));
    }
    body.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"11\" fill=\"#78909c\">{}</text>\n",
        y + 20.0,
        esc(footnote)
    ));
    y += 32.0;
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{y:.0}\" viewBox=\"0 0 {W} {y:.0}\" \
         font-family=\"Helvetica, Arial, sans-serif\">\n\
         <!-- Generated by {generated_by}. Do not edit. -->\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    ));
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(step(100.0, 5.0), 20.0);
        assert_eq!(step(5000.0, 6.0), 1000.0);
        assert_eq!(step(0.7, 5.0), 0.2);
        assert_eq!(fmt_tick(12500.0, 2500.0), "12,500");
        assert_eq!(fmt_tick(0.4, 0.2), "0.4");
    }

    #[test]
    fn renders_series_and_legend() {
        let svg = render(&Chart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                label: "a".into(),
                color: "#123456",
                points: vec![(0.0, 0.0), (1.0, 2.0)],
                dashed: true,
                markers: true,
            }],
        });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("polyline") && svg.contains("circle"));
    }
}
