//! The pages of a nightly report: `index.html` (self-contained: inline CSS, SVG charts drawn
//! here, a few lines of script; no network, no external assets) and `summary.md`.
//!
//! Owns the drawing only: every number comes from `crate::report::records::Report`.

use std::fmt::Write as _;

use crate::report::records::{by_severity, BisectNumbers, CaseResult, HistoryLine, Report};

/// HTML text escaping.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() && c != '\n' => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

fn sci(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(v) if v == 0.0 => "0".into(),
        Some(v) => format!("{v:.2e}"),
    }
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or("–".into())
}

const PALETTE: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// A blue ramp for one series per step: light (prefill) to dark (last step).
fn ramp(i: usize, n: usize) -> String {
    let t = if n <= 1 { 1.0 } else { i as f64 / (n - 1) as f64 };
    let (r, g, b) = (198.0 - 170.0 * t, 219.0 - 160.0 * t, 239.0 - 100.0 * t);
    format!("#{:02x}{:02x}{:02x}", r as u8, g as u8, b as u8)
}

/// The heatmap's colour scale, the same for every case: log10 of rel-L2 ÷ the site's pass
/// bound, from `SCALE_LO` to `SCALE_HI` decades. Within the pass bound (ratio ≤ 1) the cool
/// half, dark to pale blue; over it the hot half, pale yellow (just over) to dark red.
const SCALE_LO: f64 = -4.0;
const SCALE_HI: f64 = 4.0;

/// Where a ratio (error ÷ pass bound) sits on the fixed scale, in [0, 1]; 0.5 is the pass bound.
fn scale_t(ratio: f64) -> f64 {
    if ratio <= 0.0 {
        return 0.0;
    }
    ((ratio.log10() - SCALE_LO) / (SCALE_HI - SCALE_LO)).clamp(0.0, 1.0)
}

/// The colour of `t` on the fixed scale; `hot` picks the half over the pass bound.
fn scale_colour(t: f64, hot: bool) -> String {
    const COOL: [(f64, f64, f64); 3] = [(8.0, 48.0, 107.0), (66.0, 146.0, 198.0), (198.0, 219.0, 239.0)];
    const HOT: [(f64, f64, f64); 3] = [(254.0, 224.0, 139.0), (244.0, 109.0, 67.0), (165.0, 0.0, 38.0)];
    let (stops, u) = if hot { (HOT, ((t - 0.5) * 2.0).clamp(0.0, 1.0)) } else { (COOL, (t * 2.0).clamp(0.0, 1.0)) };
    let x = u * 2.0;
    let i = (x.floor() as usize).min(1);
    let f = x - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let m = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// A reference line drawn under a chart's series: a bound or the noise floor, one value per
/// x (`None`: none there). A line whose values are all equal spans the whole chart.
pub struct Guide {
    /// `bound-pass`, `bound-fail` or `floor`: the SVG class the page's check and CSS use.
    pub class: &'static str,
    pub label: String,
    pub values: Vec<Option<f64>>,
}

fn guide_style(class: &str) -> (&'static str, &'static str) {
    match class {
        "bound-pass" => ("#2ca02c", "7 4"),
        "bound-fail" => ("#d62728", "7 4"),
        _ => ("#7f7f7f", "2 3"),
    }
}

/// log10 range of the finite positive values, widened to whole decades.
fn decades<'a>(vals: impl Iterator<Item = &'a Option<f64>>) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in vals.flatten().filter(|v| **v > 0.0 && v.is_finite()) {
        lo = lo.min(v.log10());
        hi = hi.max(v.log10());
    }
    if !lo.is_finite() {
        return None;
    }
    let (lo, hi) = (lo.floor(), hi.ceil());
    Some(if hi <= lo { (lo, lo + 1.0) } else { (lo, hi) })
}

const W: f64 = 640.0;
const H: f64 = 240.0;
const ML: f64 = 52.0;
const MR: f64 = 12.0;
const MT: f64 = 12.0;
const MB: f64 = 34.0;

/// The frame and the decade grid of a chart with a log y axis.
fn frame(o: &mut String, lo: f64, hi: f64, x_label: &str, y_label: &str) {
    let (x0, x1, y0, y1) = (ML, W - MR, MT, H - MB);
    let _ = write!(o, r##"<path class="frame" d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" fill="none" stroke="#555"/>"##);
    let n = (hi - lo).round().max(1.0) as usize;
    let step = n.div_ceil(6).max(1);
    for k in (0..=n).step_by(step) {
        let y = y1 - (y1 - y0) * k as f64 / n as f64;
        let _ = write!(
            o,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">1e{}</text>"##,
            x0 - 4.0,
            y + 4.0,
            lo as i64 + k as i64
        );
    }
    let _ = write!(
        o,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="axis">{}</text><text x="12" y="{:.1}" class="axis" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"##,
        (x0 + x1) / 2.0,
        H - 4.0,
        esc(x_label),
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        esc(y_label)
    );
}

/// A line chart with a log y axis; one series per (label, colour, values by x).
pub fn line_chart(title: &str, x_label: &str, y_label: &str, n_x: usize, series: &[(String, String, Vec<Option<f64>>)], guides: &[Guide]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<figure><figcaption>{}</figcaption><svg class="chart line" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"##,
        esc(title),
        esc(title)
    );
    let Some((lo, hi)) = decades(series.iter().flat_map(|s| s.2.iter()).chain(guides.iter().flat_map(|g| g.values.iter()))) else {
        frame(&mut o, -1.0, 0.0, x_label, y_label);
        let _ = write!(o, r##"<text x="{}" y="{}" text-anchor="middle" class="axis">no positive values (exact agreement)</text></svg></figure>"##, W / 2.0, H / 2.0);
        return o;
    };
    frame(&mut o, lo, hi, x_label, y_label);
    let (x0, x1, y0, y1) = (ML, W - MR, MT, H - MB);
    let xs = |i: usize| if n_x <= 1 { (x0 + x1) / 2.0 } else { x0 + 8.0 + (x1 - x0 - 16.0) * i as f64 / (n_x - 1) as f64 };
    let ys = |v: f64| y1 - (y1 - y0) * (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo);
    // x ticks: at most ~12 labels.
    let every = n_x.div_ceil(12).max(1);
    for i in (0..n_x).step_by(every) {
        let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="tick">{i}</text>"##, xs(i), y1 + 14.0);
    }
    for g in guides {
        let (colour, dash) = guide_style(g.class);
        let pts: Vec<(usize, f64)> =
            g.values.iter().enumerate().filter_map(|(i, v)| v.filter(|v| *v >= 0.0 && v.is_finite()).map(|v| (i, v))).collect();
        let Some(&(_, first)) = pts.first() else { continue };
        let d = if n_x <= 1 || pts.iter().all(|(_, v)| *v == first) {
            format!("M{x0:.1},{:.1} L{x1:.1},{:.1}", ys(first), ys(first))
        } else {
            // A staircase: a bound holds per x, it does not slope between two.
            let mut d = format!("M{:.1},{:.1}", xs(pts[0].0), ys(pts[0].1));
            for w in pts.windows(2) {
                let _ = write!(d, " L{:.1},{:.1} L{:.1},{:.1}", xs(w[1].0), ys(w[0].1), xs(w[1].0), ys(w[1].1));
            }
            d
        };
        let _ = write!(
            o,
            r##"<path class="guide {}" d="{d}" fill="none" stroke="{colour}" stroke-width="1.4" stroke-dasharray="{dash}"><title>{}</title></path>"##,
            g.class,
            esc(&g.label)
        );
    }
    for (label, colour, vals) in series {
        let mut d = String::new();
        let mut pen = false;
        for (i, v) in vals.iter().enumerate() {
            match v {
                Some(v) if *v > 0.0 && v.is_finite() => {
                    let _ = write!(d, "{}{:.1},{:.1} ", if pen { "L" } else { "M" }, xs(i), ys(*v));
                    pen = true;
                }
                _ => pen = false,
            }
        }
        if d.is_empty() {
            continue;
        }
        let _ = write!(o, r##"<path class="series" d="{}" fill="none" stroke="{colour}" stroke-width="1.6"><title>{}</title></path>"##, d.trim_end(), esc(label));
        // A single point draws no line: mark every point.
        if vals.iter().filter(|v| v.is_some()).count() == 1 {
            if let Some((i, Some(v))) = vals.iter().enumerate().find(|(_, v)| v.is_some()) {
                let _ = write!(o, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"##, xs(i), ys(*v));
            }
        }
    }
    o.push_str("</svg>");
    if !guides.is_empty() {
        o.push_str(r#"<div class="legend guides">"#);
        for g in guides {
            let (colour, _) = guide_style(g.class);
            let _ = write!(o, r#"<span class="{}"><i class="dash" style="border-color:{colour}"></i>{}</span>"#, g.class, esc(&g.label));
        }
        o.push_str("</div>");
    }
    if series.len() <= 8 {
        o.push_str(r#"<div class="legend">"#);
        for (label, colour, _) in series {
            let _ = write!(o, r#"<span><i style="background:{colour}"></i>{}</span>"#, esc(label));
        }
        o.push_str("</div>");
    } else {
        let _ = write!(
            o,
            r#"<div class="legend"><span><i style="background:{}"></i>{}</span> … <span><i style="background:{}"></i>{}</span></div>"#,
            series[0].1,
            esc(&series[0].0),
            series[series.len() - 1].1,
            esc(&series[series.len() - 1].0)
        );
    }
    o.push_str("</figure>");
    o
}

/// A step × layer heatmap of one site's rel-L2 ÷ its pass bound, on the fixed scale
/// ([`SCALE_LO`]..[`SCALE_HI`] decades, the pass bound in the middle) shared by every case:
/// a clean case is all cool, a case over its bounds has hot cells. `fail_ratio` marks this
/// case's fail bound on the legend.
pub fn heatmap(title: &str, cells: &[Vec<Option<f64>>], pass_bound: &[Option<f64>], fail_bound: &[Option<f64>]) -> String {
    let mut o = String::new();
    let rows = cells.len();
    let cols = cells.iter().map(|r| r.len()).max().unwrap_or(0);
    let _ = write!(
        o,
        r##"<figure><figcaption>{}</figcaption><svg class="chart heatmap" data-scale="{SCALE_LO},{SCALE_HI}" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"##,
        esc(title),
        esc(title)
    );
    let (x0, x1, y0, y1) = (ML, W - MR - 84.0, MT, H - MB);
    let _ = write!(o, r##"<path class="frame" d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" fill="none" stroke="#555"/>"##);
    if rows == 0 || cols == 0 || cells.iter().flatten().all(|v| v.is_none()) {
        let _ = write!(o, r##"<text x="{}" y="{}" text-anchor="middle" class="axis">no data</text></svg></figure>"##, W / 2.0, H / 2.0);
        return o;
    }
    let (cw, ch) = ((x1 - x0) / cols as f64, (y1 - y0) / rows as f64);
    for (s, row) in cells.iter().enumerate() {
        for (l, v) in row.iter().enumerate() {
            let bound = pass_bound.get(l).copied().flatten().filter(|b| *b > 0.0);
            let (class, fill, ratio, tip) = match (v, bound) {
                (Some(v), Some(b)) => {
                    let r = v / b;
                    let hot = r > 1.0;
                    (
                        if hot { "cell hot" } else { "cell cool" },
                        scale_colour(scale_t(r), hot),
                        format!("{r:.3e}"),
                        format!("step {s}, layer {l}: rel-L2 {v:.2e} = {r:.2e} × the pass bound {b:.0e}"),
                    )
                }
                (Some(v), None) => ("cell unbounded", "#ccc".to_string(), String::new(), format!("step {s}, layer {l}: rel-L2 {v:.2e} (no bound recorded)")),
                (None, _) => ("cell none", "#eee".to_string(), String::new(), format!("step {s}, layer {l}: not compared")),
            };
            let _ = write!(
                o,
                r##"<rect class="{class}" data-ratio="{ratio}" x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{fill}"><title>{tip}</title></rect>"##,
                x0 + l as f64 * cw,
                y0 + s as f64 * ch,
                cw + 0.3,
                ch + 0.3
            );
        }
    }
    let every_l = cols.div_ceil(12).max(1);
    for l in (0..cols).step_by(every_l) {
        let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="tick">{l}</text>"##, x0 + (l as f64 + 0.5) * cw, y1 + 14.0);
    }
    let every_s = rows.div_ceil(10).max(1);
    for s in (0..rows).step_by(every_s) {
        let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{s}</text>"##, x0 - 4.0, y0 + (s as f64 + 0.5) * ch + 4.0);
    }
    let _ = write!(
        o,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="axis">layer</text><text x="12" y="{:.1}" class="axis" transform="rotate(-90 12 {:.1})" text-anchor="middle">step</text>"##,
        (x0 + x1) / 2.0,
        H - 4.0,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    // The fixed colour scale: error ÷ pass bound, 1e-4 .. 1e4, the pass bound in the middle.
    let (sx, sw) = (x1 + 30.0, 14.0);
    let n = 32;
    let yt = |t: f64| y1 - (y1 - y0) * t;
    for k in 0..n {
        let t = (k as f64 + 0.5) / n as f64;
        let _ = write!(
            o,
            r##"<rect class="scale" x="{sx}" y="{:.1}" width="{sw}" height="{:.2}" fill="{}"/>"##,
            yt((k + 1) as f64 / n as f64),
            (y1 - y0) / n as f64 + 0.3,
            scale_colour(t, t > 0.5)
        );
    }
    let mut d = SCALE_LO as i64;
    while d <= SCALE_HI as i64 {
        let y = yt(scale_t(10f64.powi(d as i32)));
        let label = if d == 0 { "pass".to_string() } else { format!("1e{d}") };
        let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" class="tick">{label}</text>"##, sx + sw + 3.0, y + 4.0);
        d += 2;
    }
    let fail_ratio = pass_bound.iter().zip(fail_bound).filter_map(|(p, f)| Some(f.as_ref()? / p.as_ref()?)).fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    if let Some(fr) = fail_ratio.filter(|r| r.is_finite() && *r > 0.0) {
        let y = yt(scale_t(fr));
        let _ = write!(
            o,
            r##"<path class="scale-fail" d="M{:.1},{y:.1} L{:.1},{y:.1}" stroke="#000" stroke-width="2"><title>this case's fail bound: {fr:.0} × its pass bound</title></path><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">fail</text>"##,
            sx - 3.0,
            sx + sw + 3.0,
            sx - 4.0,
            y + 4.0
        );
    }
    o.push_str("</svg>");
    o.push_str(r#"<div class="legend">colour: rel-L2 ÷ the site's pass bound, one scale for every case: blue within the pass bound, yellow to red over it (“fail”: this case's fail bound)</div></figure>"#);
    o
}

/// Bars of the engine's top-1 margin per step; red where a reference's top token differs.
pub fn margin_chart(c: &CaseResult) -> String {
    let mut o = String::new();
    let title = "token agreement: the engine's top-1 margin per step (red: a reference chose another token)";
    let _ = write!(
        o,
        r##"<figure><figcaption>{}</figcaption><svg class="chart margins" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"##,
        esc(title),
        esc(title)
    );
    let (x0, x1, y0, y1) = (ML, W - MR, MT, H - MB);
    let _ = write!(o, r##"<path class="frame" d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" fill="none" stroke="#555"/>"##);
    let margins: Vec<f64> = c
        .steps
        .iter()
        .map(|s| s.references.first().and_then(|r| r.engine_margin).unwrap_or(0.0))
        .collect();
    let top = margins.iter().cloned().fold(0.0f64, f64::max).max(1e-3);
    let n = margins.len().max(1);
    let bw = (x1 - x0) / n as f64;
    for (i, (m, st)) in margins.iter().zip(&c.steps).enumerate() {
        let flip = st.references.iter().any(|r| !r.top1_agree);
        let h = (y1 - y0) * (m / top);
        let _ = write!(
            o,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>step {i}: margin {m:.3} nats{}</title></rect>"##,
            x0 + i as f64 * bw + bw * 0.15,
            y1 - h,
            bw * 0.7,
            h.max(0.5),
            if flip { "#d62728" } else { "#2ca02c" },
            if flip { ", top-1 differs" } else { "" }
        );
    }
    let every = n.div_ceil(12).max(1);
    for i in (0..n).step_by(every) {
        let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="tick">{i}</text>"##, x0 + (i as f64 + 0.5) * bw, y1 + 14.0);
    }
    let _ = write!(
        o,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{top:.2}</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">0</text><text x="{:.1}" y="{:.1}" text-anchor="middle" class="axis">step</text><text x="12" y="{:.1}" class="axis" transform="rotate(-90 12 {:.1})" text-anchor="middle">margin (nats)</text>"##,
        x0 - 4.0,
        y0 + 8.0,
        x0 - 4.0,
        y1,
        (x0 + x1) / 2.0,
        H - 4.0,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    o.push_str("</svg></figure>");
    o
}

/// A small trend of a case's mean KL over the last nights (log scale), dots by verdict.
pub fn sparkline(lines: &[HistoryLine]) -> String {
    let (w, h) = (120.0, 28.0);
    let mut o = format!(r##"<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">"##);
    let vals: Vec<Option<f64>> = lines.iter().map(|l| l.mean_kl).collect();
    let (lo, hi) = decades(vals.iter()).unwrap_or((-1.0, 0.0));
    let n = lines.len();
    let xs = |i: usize| if n <= 1 { w / 2.0 } else { 4.0 + (w - 8.0) * i as f64 / (n - 1) as f64 };
    let ys = |v: f64| h - 4.0 - (h - 8.0) * (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo);
    let mut d = String::new();
    for (i, v) in vals.iter().enumerate() {
        if let Some(v) = v.filter(|v| *v > 0.0) {
            let _ = write!(d, "{}{:.1},{:.1} ", if d.is_empty() { "M" } else { "L" }, xs(i), ys(v));
        }
    }
    if d.is_empty() {
        let _ = write!(d, "M4,{:.1} L{:.1},{:.1}", h - 4.0, w - 4.0, h - 4.0);
    }
    let _ = write!(o, r##"<path d="{}" fill="none" stroke="#555" stroke-width="1.2"/>"##, d.trim_end());
    for (i, l) in lines.iter().enumerate() {
        let y = l.mean_kl.filter(|v| *v > 0.0).map(ys).unwrap_or(h - 4.0);
        let col = if !l.as_expected { "#d62728" } else if l.verdict == "pass" { "#2ca02c" } else { "#ff7f0e" };
        let _ = write!(
            o,
            r##"<circle cx="{:.1}" cy="{y:.1}" r="2.5" fill="{col}"><title>{}: {} mean KL {}</title></circle>"##,
            xs(i),
            esc(&l.date),
            esc(&l.verdict),
            sci(l.mean_kl)
        );
    }
    o.push_str("</svg>");
    o
}

fn badge(c: &CaseResult) -> String {
    let (cls, text) = match c.verdict.as_str() {
        "pass" if c.drift => ("pass", "pass · drift"),
        "pass" => ("pass", "pass"),
        "diverged" => ("diverged", "diverged"),
        _ => ("error", "error"),
    };
    let exp = if c.as_expected { "" } else { " unexpected" };
    format!(r#"<span class="badge {cls}{exp}">{text}</span>"#)
}

/// `error`, `diverged`, `drift` or `pass`: the class a case sorts in.
fn verdict_class(c: &CaseResult) -> &'static str {
    match c.verdict_rank() {
        0 => "error",
        1 => "diverged",
        2 => "drift",
        _ => "pass",
    }
}

/// The summary's diagnosis: bisect's named cause when it found one, what bisect said
/// otherwise, the error of a case that did not run, and for a passing case where it is
/// closest to its bound.
fn diagnosis(c: &CaseResult) -> String {
    if let Some(e) = &c.error {
        return format!("error: {}", e.lines().next().unwrap_or("").chars().take(90).collect::<String>());
    }
    match &c.bisect {
        Some(b) if b.error.is_some() => format!("bisect failed: {}", b.error.as_deref().unwrap_or("").lines().next().unwrap_or("")),
        Some(b) if b.diagnosis_title.is_some() => {
            format!("{} [{}]", b.diagnosis_title.as_deref().unwrap_or(""), b.diagnosis.as_deref().unwrap_or(""))
        }
        Some(b) if !b.found => "bisect found nothing over its bounds".into(),
        Some(_) => "localized by bisect, no named cause".into(),
        None if c.verdict == "diverged" => "not bisected".into(),
        None if c.drift => drift_diagnosis(c),
        None if c.worst.is_some() => "within bounds".into(),
        None => "–".into(),
    }
}

/// What drifted first: a top-1 token that differs on a near tie, a next-token distribution
/// or a site over its pass bound but not failed (under the fail bound, or within the noise
/// floor).
fn drift_diagnosis(c: &CaseResult) -> String {
    for s in &c.steps {
        if let Some(r) = s.references.iter().find(|r| r.verdict == "drift") {
            return if !r.top1_agree {
                format!("drift: at step {} the top-1 token differs from {}'s on a near tie", s.step, r.reference)
            } else {
                format!("drift: at step {} vs {}, over a pass bound but not failed", s.step, r.reference)
            };
        }
    }
    match c.references.iter().find(|r| r.verdict == "drift") {
        Some(r) => format!("drift: over the run vs {}, over a pass bound but not failed", r.reference),
        None => "drift: over a pass bound but not failed".into(),
    }
}

/// The worst error ÷ its pass bound, with where it is as a tooltip.
fn worst_cell(c: &CaseResult) -> String {
    match &c.worst {
        None => "–".into(),
        Some(w) => format!(
            r#"<span title="{} {:.2e} at step {}, {}{} vs {} (pass bound {:.0e}, fail bound {:.0e})">{}×</span>"#,
            if w.metric == "kl" { "KL" } else { "rel-L2" },
            w.value,
            w.step,
            w.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
            esc(&w.site),
            esc(&w.reference),
            w.pass_bound,
            w.fail_bound,
            sci(Some(w.ratio))
        ),
    }
}

fn anchor(name: &str) -> String {
    format!("case-{}", name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
}

const CSS: &str = r#"
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
main{max-width:1160px;margin:0 auto;padding:12px 16px 48px}
h1{font-size:1.5rem;margin:.6em 0 .2em}h2{font-size:1.2rem;margin:1.6em 0 .4em}h3{font-size:1rem;margin:1.2em 0 .3em}
.meta{color:#555;font-size:.9rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9rem}
th,td{border-bottom:1px solid #e4e4e4;padding:5px 8px;text-align:left;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;min-width:14em}
th{background:#f0f0f0;position:sticky;top:0}
tr.unexpected td:first-child{border-left:4px solid #d62728}
.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.8rem;font-weight:600;color:#fff}
.badge.pass{background:#2ca02c}.badge.diverged{background:#ff7f0e}.badge.error{background:#7f7f7f}
.badge.unexpected{outline:2px solid #d62728;outline-offset:1px}
.totals span{margin-right:1em}
.reg{background:#fdecea;border-left:4px solid #d62728;padding:8px 12px;margin:10px 0}
.ok{background:#eaf6ea;border-left:4px solid #2ca02c;padding:8px 12px;margin:10px 0}
details.case{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:4px 12px}
details.case>summary{cursor:pointer;font-weight:600;padding:6px 0}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:14px}
figure{margin:0;background:#fff}figcaption{font-size:.85rem;color:#333;margin:4px 0}
svg.chart{width:100%;height:auto;display:block;background:#fff}
svg .tick{font-size:12px;fill:#555}svg .axis{font-size:13px;fill:#333}
.legend{font-size:.8rem;color:#444}.legend span{margin-right:10px;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
pre{white-space:pre-wrap;word-break:break-word;background:#f4f4f4;padding:8px;border-radius:4px;font-size:.85rem}
.diff td{background:#fff4e5}.agree{color:#2ca02c}.flip{color:#d62728;font-weight:700}
code{font-size:.88em}
.first-divergence{background:#fff4e5;border-left:4px solid #ff7f0e;padding:6px 10px}.first-divergence .by{color:#555;font-size:.85rem}
.secondary-evidence{margin-top:-.4em}
.legend.guides i.dash{width:18px;height:0;border-top:2px dashed;background:none}
td.diagnosis{min-width:12em}#summary td.wrap:nth-child(3){min-width:9em}
@media (max-width:640px){body{font-size:14px}main{padding:8px}th,td{padding:4px 5px}.hide-sm{display:none}}
"#;

/// After load, the page checks itself: every chart has drawn paths with a real size (what
/// the headless-browser test reads back from `data-render`; closed cases are opened for the
/// measurement and closed again), and it writes what it shows as JSON into
/// `<script id="self-check">` for the test: the summary rows in order with their verdict
/// class, rank, worst ratio and diagnosis, and per case card whether it is open, how many
/// "first divergence" lines it has, its secondary evidence, the bound and floor lines of
/// its charts and its heatmap's cool and hot cells.
const JS: &str = r#"
(function(){
  var cards=Array.prototype.slice.call(document.querySelectorAll('details.case'));
  var wasOpen=cards.map(function(d){return d.open;});
  cards.forEach(function(d){d.open=true;});
  var charts=document.querySelectorAll('svg.chart'),bad=0,drawn=0;
  charts.forEach(function(s){
    var ps=s.querySelectorAll('path'),ok=false;
    ps.forEach(function(p){var d=p.getAttribute('d')||'';var b=p.getBBox();if(d.trim().length>0&&(b.width>0||b.height>0))ok=true;});
    if(ok)drawn++;else bad++;
  });
  var guides=0,guidesDrawn=0;
  document.querySelectorAll('svg.chart path.guide').forEach(function(p){guides++;var b=p.getBBox();if(b.width>0||b.height>0)guidesDrawn++;});
  cards.forEach(function(d,i){d.open=wasOpen[i];});
  var rows=document.querySelectorAll('#summary tbody tr');
  var count=function(re,t){var m=t.match(re);return m?m.length:0;};
  var n=function(el,sel){return el?el.querySelectorAll(sel).length:0;};
  var check={guides:guides,guides_drawn:guidesDrawn,summary:[],cases:[]};
  rows.forEach(function(r){
    var dg=r.querySelector('td.diagnosis');
    check.summary.push({case:r.getAttribute('data-case'),verdict:r.getAttribute('data-verdict'),rank:Number(r.getAttribute('data-rank')),
      ratio:r.getAttribute('data-ratio')===''?null:Number(r.getAttribute('data-ratio')),diagnosis:dg?dg.textContent:null});
  });
  cards.forEach(function(d){
    var line=d.querySelector('svg.chart.line'),heat=d.querySelector('svg.chart.heatmap'),kl=d.querySelectorAll('svg.chart.line')[1];
    var lines=function(s){return s?{pass:n(s,'path.guide.bound-pass'),fail:n(s,'path.guide.bound-fail'),floor:n(s,'path.guide.floor')}:null;};
    check.cases.push({case:d.getAttribute('data-case'),verdict:d.getAttribute('data-verdict'),open:d.open,
      first_divergence:n(d,'.first-divergence'),first_divergence_text:count(/first divergence/gi,d.textContent),
      secondary:n(d,'.secondary-evidence'),layer_chart:lines(line),kl_chart:lines(kl),
      heatmap:heat?{scale:heat.getAttribute('data-scale'),cool:n(heat,'rect.cell.cool'),hot:n(heat,'rect.cell.hot'),unbounded:n(heat,'rect.cell.unbounded')}:null});
  });
  var out=document.createElement('script');
  out.type='application/json';out.id='self-check';
  out.textContent=JSON.stringify(check).replace(/</g,'\\u003c');
  document.body.appendChild(out);
  document.body.setAttribute('data-charts',String(charts.length));
  document.body.setAttribute('data-charts-drawn',String(drawn));
  document.body.setAttribute('data-summary-rows',String(rows.length));
  document.body.setAttribute('data-render',bad===0&&charts.length>0&&rows.length>0&&guidesDrawn===guides?'ok':'fail');
  var f=document.getElementById('only-bad');
  if(f)f.addEventListener('change',function(){
    rows.forEach(function(r){r.style.display=f.checked&&!r.classList.contains('unexpected')?'none':'';});
  });
})();
"#;

/// One case's section of the page: a `<details>` block with everything known about the case.
fn case_section(c: &CaseResult, trend: Option<&Vec<HistoryLine>>) -> String {
    let mut o = String::new();
    // Failures open, passing cases (drift included) closed: the page leads with what is wrong.
    let open = c.verdict != "pass" || !c.as_expected;
    let _ = write!(
        o,
        r#"<details class="case" id="{}" data-case="{}" data-verdict="{}"{}><summary>{} {}</summary>"#,
        anchor(&c.name),
        esc(&c.name),
        verdict_class(c),
        if open { " open" } else { "" },
        esc(&c.name),
        badge(c)
    );
    o.push_str(&case_meta(c));
    o.push_str(&case_notices(c));
    if let Some(t) = trend.filter(|t| !t.is_empty()) {
        o.push_str(&case_trend(t));
    }
    if !c.references.is_empty() {
        o.push_str(&case_references(c));
    }
    if !c.steps.is_empty() {
        o.push_str(&case_charts(c));
        o.push_str(&case_tokens(c));
        o.push_str(&case_texts(c));
    }
    if let Some(b) = &c.bisect {
        o.push_str(&case_bisect(b));
    }
    if !c.config.is_empty() {
        o.push_str(&case_config(c));
    }
    o.push_str("</details>");
    o
}

/// The case's definition line (model, weights, references, prompt, steps, ...) and its description.
fn case_meta(c: &CaseResult) -> String {
    let mut o = String::new();
    let d = &c.def;
    let prompt = match (&d.chat, &d.prompt) {
        (Some(ch), _) => format!("chat “{}”", esc(ch)),
        (None, Some(p)) => format!("prompt “{}”", esc(p)),
        _ => String::new(),
    };
    let _ = write!(
        o,
        r#"<p class="meta">model <code>{}</code>{} · weights {} · vs {} · {prompt} · {} steps · sampler {} · tolerance {}{}{}</p>"#,
        esc(&d.model),
        c.model_path.as_deref().map(|p| format!(" (<code>{}</code>)", esc(p))).unwrap_or_default(),
        esc(c.engine_weights.as_deref().unwrap_or(&d.weights)),
        esc(&d.references.join(", ")),
        d.steps,
        esc(d.sampler.as_deref().unwrap_or("greedy")),
        esc(&d.tolerance),
        d.inject.as_deref().map(|f| format!(" · <b>fault injected: {}</b>", esc(f))).unwrap_or_default(),
        d.lora.as_deref().map(|l| format!(" · LoRA <code>{}</code>", esc(l))).unwrap_or_default(),
    );
    if !d.about.is_empty() {
        let _ = write!(o, r#"<p class="meta">{}</p>"#, esc(&d.about));
    }
    o
}

/// The case's error, LoRA checks, full-report link, first divergence and stop before step 0.
fn case_notices(c: &CaseResult) -> String {
    let mut o = String::new();
    if let Some(e) = &c.error {
        let _ = write!(o, "<h3>Error</h3><pre>{}</pre>", esc(e));
    }
    if let Some(l) = &c.lora {
        let _ = write!(o, "<h3>LoRA adapter</h3><pre>{}</pre>", esc(l));
    }
    if let Some(j) = &c.run_json {
        let _ = write!(o, r#"<p class="meta">every site of every step: <a href="{}">{}</a></p>"#, esc(j), esc(j));
    }
    if let Some(d) = c.divergence() {
        let by = if d.by_bisect {
            "localized by bisect".to_string()
        } else {
            match &c.bisect {
                Some(b) if b.error.is_some() => "the run's first site over its fail bound; bisect failed".into(),
                Some(_) => "the run's first site over its fail bound; bisect found nothing over its bounds".into(),
                None => "the run's first site over its fail bound".into(),
            }
        };
        let _ = write!(
            o,
            r#"<p class="first-divergence"><b>First divergence</b>: step {}, {}site <code>{}</code> vs {}{} <span class="by">({by})</span></p>"#,
            d.step,
            d.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
            esc(d.site),
            esc(d.reference),
            if d.detail.is_empty() { String::new() } else { format!(": {}", esc(d.detail)) },
        );
        // The run's own first failing site is evidence next to bisect's localization, not
        // another "first": it is the first over the fail bound in the order the run compares
        // sites, where bisect follows the data flow (a cache whose length differs first).
        if let (true, Some(f)) = (d.by_bisect, &c.first_divergence) {
            let same = f.step == d.step && f.layer == d.layer && f.site == d.site;
            let _ = write!(
                o,
                r#"<p class="secondary-evidence meta"><b>Secondary evidence</b>, the run's comparison: {}</p>"#,
                if same {
                    "its first site over the fail bound is the same site".to_string()
                } else {
                    format!(
                        "its first site over the fail bound, in the order it compares sites, is step {}, {}<code>{}</code> vs {}: {}",
                        f.step,
                        f.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                        esc(&f.site),
                        esc(&f.reference),
                        esc(&f.detail)
                    )
                }
            );
        }
    }
    if let Some(s) = &c.stopped_before_step0 {
        let _ = write!(o, "<p><b>Stopped before step 0</b>: {}</p>", esc(s));
    }
    o
}

/// The case's trend: a sparkline and a table of its earlier reports, newest first.
fn case_trend(t: &[HistoryLine]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<details><summary>Trend over the last {} report(s), mean KL: {}</summary><div class="scroll"><table class="trend"><thead><tr><th>date</th><th>verdict</th><th>diverged at</th><th class="num">mean KL</th><th class="num">max KL</th><th class="num">top-1</th><th class="num">time</th></tr></thead><tbody>"#,
        t.len(),
        sparkline(t)
    );
    for l in t.iter().rev() {
        let _ = write!(
            o,
            r#"<tr><td>{}</td><td>{}{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.1} s</td></tr>"#,
            esc(&l.date),
            esc(&l.verdict),
            if l.as_expected { "" } else { " (not as expected)" },
            esc(l.first_divergence.as_deref().unwrap_or("–")),
            sci(l.mean_kl),
            sci(l.max_kl),
            pct(l.top1),
            l.seconds
        );
    }
    o.push_str("</tbody></table></div></details>");
    o
}

/// The per-reference table, with the noise floor between references as its last rows.
fn case_references(c: &CaseResult) -> String {
    let mut o = String::new();
    o.push_str(r#"<div class="scroll"><table><thead><tr><th>vs</th><th>version</th><th>mode</th><th class="num">mean KL</th><th class="num">max KL</th><th class="num">top-1</th><th>verdict</th><th>not compared</th></tr></thead><tbody>"#);
    for r in &c.references {
        let _ = write!(
            o,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td class="wrap">{}</td></tr>"#,
            esc(&r.reference),
            esc(&r.version),
            esc(&r.mode),
            sci(r.mean_kl),
            sci(r.max_kl),
            pct(r.top1),
            esc(&r.verdict),
            esc(&r.sites_not_compared.join(", "))
        );
    }
    for p in &c.pairs {
        let _ = write!(
            o,
            r#"<tr class="meta"><td>{} vs {} (noise floor)</td><td></td><td></td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td></td><td></td></tr>"#,
            esc(&p.a),
            esc(&p.b),
            sci(p.mean_kl),
            sci(p.max_kl),
            pct(p.top1)
        );
    }
    o.push_str("</tbody></table></div>");
    o
}

/// The guides of the error-per-layer chart: the pass and fail bounds and the noise floor.
fn layer_guides(le: &crate::report::records::LayerError) -> Vec<Guide> {
    let mut g = vec![];
    let label = |what: &str, v: &[Option<f64>]| {
        let vals: Vec<f64> = v.iter().flatten().copied().collect();
        match (vals.iter().cloned().fold(f64::INFINITY, f64::min), vals.iter().cloned().fold(0.0, f64::max)) {
            (a, b) if a == b => format!("{what} {a:.0e}"),
            (a, b) => format!("{what} {a:.0e}..{b:.0e} (per layer)"),
        }
    };
    if le.pass_bound.iter().any(|b| b.is_some()) {
        g.push(Guide { class: "bound-pass", label: label("pass bound", &le.pass_bound), values: le.pass_bound.clone() });
    }
    if le.fail_bound.iter().any(|b| b.is_some()) {
        g.push(Guide { class: "bound-fail", label: label("fail bound", &le.fail_bound), values: le.fail_bound.clone() });
    }
    if !le.floor.is_empty() {
        g.push(Guide { class: "floor", label: "noise floor (reference vs reference, worst step)".into(), values: le.floor.clone() });
    }
    g
}

/// The guides of the KL chart: each distinct (pass, fail) KL bound of the references, and
/// each pair of references' KL per step (the noise floor).
fn kl_guides(c: &CaseResult) -> Vec<Guide> {
    let n = c.steps.len();
    let mut g = vec![];
    let mut bounds: Vec<(f64, f64, Vec<&str>)> = vec![];
    for r in &c.references {
        if let (Some(p), Some(f)) = (r.pass_kl, r.fail_kl) {
            match bounds.iter_mut().find(|b| b.0 == p && b.1 == f) {
                Some(b) => b.2.push(&r.reference),
                None => bounds.push((p, f, vec![&r.reference])),
            }
        }
    }
    let many = bounds.len() > 1;
    for (p, f, who) in &bounds {
        let whom = if many { format!(" ({})", who.join(", ")) } else { String::new() };
        g.push(Guide { class: "bound-pass", label: format!("pass bound KL {p:.0e}{whom}"), values: vec![Some(*p); n] });
        g.push(Guide { class: "bound-fail", label: format!("fail bound KL {f:.0e}{whom}"), values: vec![Some(*f); n] });
    }
    for p in c.pairs.iter().filter(|p| !p.kl.is_empty()) {
        g.push(Guide { class: "floor", label: format!("noise floor: {} vs {}", p.a, p.b), values: p.kl.clone() });
    }
    g
}

/// The case's charts: error per layer and step, the step × layer heatmap, KL, margins.
fn case_charts(c: &CaseResult) -> String {
    let mut o = String::new();
    o.push_str(r#"<div class="charts">"#);
    if let Some(le) = c.layer_error.first() {
        let n = le.steps.len();
        let series: Vec<(String, String, Vec<Option<f64>>)> = le
            .steps
            .iter()
            .enumerate()
            .map(|(s, row)| (if s == 0 { "step 0 (prefill)".to_string() } else { format!("step {s}") }, ramp(s, n), row.clone()))
            .collect();
        o.push_str(&line_chart(
            &format!("error per layer for each step (worst rel-L2 of the layer's sites vs {}), with its bounds and the noise floor", le.reference),
            "layer",
            "rel-L2",
            c.num_layers,
            &series,
            &layer_guides(le),
        ));
    }
    if let Some(h) = &c.heatmap {
        o.push_str(&heatmap(
            &format!("step × layer rel-L2 ÷ pass bound of the worst site, {} (vs {})", h.site, h.reference),
            &h.cells,
            &h.pass_bound,
            &h.fail_bound,
        ));
    }
    let n_refs = c.steps[0].references.len();
    let kl: Vec<(String, String, Vec<Option<f64>>)> = (0..n_refs)
        .map(|ri| {
            (
                c.steps[0].references[ri].reference.clone(),
                PALETTE[ri % PALETTE.len()].to_string(),
                c.steps.iter().map(|s| s.references.get(ri).and_then(|r| r.kl)).collect(),
            )
        })
        .collect();
    o.push_str(&line_chart("KL(reference ‖ engine) of the next token, per step", "step", "KL (nats)", c.steps.len(), &kl, &kl_guides(c)));
    o.push_str(&margin_chart(c));
    o.push_str("</div>");
    o
}

/// The token table: per step the engine's token and each reference's top-1, margins and KL.
fn case_tokens(c: &CaseResult) -> String {
    let mut o = String::new();
    o.push_str(r#"<h3>Tokens</h3><div class="scroll"><table><thead><tr><th>step</th><th>fed</th><th>engine token</th>"#);
    for r in &c.steps[0].references {
        let _ = write!(o, "<th>{} top-1</th><th class=\"num\">margins e / r</th><th class=\"num\">KL</th>", esc(&r.reference));
    }
    o.push_str("<th>verdict</th></tr></thead><tbody>");
    for s in &c.steps {
        let _ = write!(o, "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td><code>{}</code> ({})</td>", s.step, s.fed, esc(&format!("{:?}", s.engine_token_text)), s.engine_token);
        for r in &s.references {
            let (cls, mark) = if r.top1_agree { ("agree", "✓ same".to_string()) } else { ("flip", format!("✗ {}", r.reference_top1)) };
            let _ = write!(
                o,
                r#"<td class="{cls}">{mark}</td><td class="num">{} / {}</td><td class="num">{}</td>"#,
                r.engine_margin.map(|m| format!("{m:.3}")).unwrap_or("–".into()),
                r.reference_margin.map(|m| format!("{m:.3}")).unwrap_or("–".into()),
                sci(r.kl)
            );
        }
        let _ = write!(o, "<td>{}</td></tr>", esc(&s.verdict));
    }
    o.push_str("</tbody></table></div>");
    o
}

/// The engine's text and whether each reference's own generate loop made the same tokens.
fn case_texts(c: &CaseResult) -> String {
    let mut o = String::new();
    let _ = write!(o, "<p class=\"meta\">engine text: <code>{}</code></p>", esc(&format!("{:?}", c.engine_text)));
    for g in &c.generate {
        let _ = write!(
            o,
            "<p class=\"meta\">{} generate (its own greedy loop): {}</p>",
            esc(&g.reference),
            if g.matches { "identical tokens".to_string() } else { format!("differs from token {}", g.first_mismatch.unwrap_or(0)) }
        );
    }
    o
}

/// The case's bisect: its error, or where it localized, isolation and diagnosis.
fn case_bisect(b: &BisectNumbers) -> String {
    let mut o = String::new();
    o.push_str("<h3>Bisect</h3>");
    if let Some(e) = &b.error {
        let _ = write!(o, "<pre>bisect failed: {}</pre>", esc(e));
    } else if !b.found {
        o.push_str("<p>bisect found nothing over its bounds</p>");
    } else {
        let _ = write!(
            o,
            "<p>localized to <code>{}</code>{} at step {} (vs {}), the divergence shown above</p>",
            esc(b.site.as_deref().unwrap_or("-")),
            b.layer.map(|l| format!(", layer {l}")).unwrap_or_default(),
            b.step.map(|s| s.to_string()).unwrap_or("-".into()),
            esc(b.reference.as_deref().unwrap_or("-")),
        );
        if let Some(i) = &b.isolation {
            let _ = write!(o, "<p>isolation: {}</p>", esc(i));
        }
        if let (Some(n), Some(t)) = (&b.diagnosis, &b.diagnosis_title) {
            let _ = write!(o, "<p><b>diagnosis</b>: {} <code>[{}]</code></p><ul>", esc(t), esc(n));
            for e in &b.evidence {
                let _ = write!(o, "<li>{}</li>", esc(e));
            }
            o.push_str("</ul>");
        }
    }
    o
}

/// The generation-config table, settings that differ from the engine's highlighted.
fn case_config(c: &CaseResult) -> String {
    let mut o = String::new();
    let diff = c.config.iter().filter(|r| r.differs && !r.info).count();
    let _ = write!(
        o,
        r#"<details><summary>generation config: {} difference(s) (highlighted)</summary><div class="scroll"><table><thead><tr><th>setting</th><th>engine</th>"#,
        diff
    );
    for r in &c.references {
        let _ = write!(o, "<th>{}</th>", esc(&r.reference));
    }
    o.push_str("</tr></thead><tbody>");
    for row in &c.config {
        let _ = write!(
            o,
            "<tr{}><td>{}{}</td><td class=\"wrap\">{}</td>",
            if row.differs && !row.info { r#" class="diff""# } else { "" },
            esc(&row.name),
            if row.info { " (info)" } else { "" },
            esc(&row.engine)
        );
        for v in &row.references {
            let _ = write!(o, "<td class=\"wrap\">{}</td>", esc(v));
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></div></details>");
    o
}

/// `index.html`.
pub fn page(rep: &Report) -> String {
    let mut o = String::new();
    let title = format!("lockstep report: {}", rep.suite.name);
    let _ = write!(
        o,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{}</title><style>{CSS}</style></head><body><main>"#,
        esc(&title)
    );
    let t = &rep.totals;
    let _ = write!(
        o,
        r#"<h1>{}</h1><p class="meta">{}{} · written {} · lockstep {}</p><p class="totals"><span><b>{}</b> cases</span><span class="badge pass">{} pass</span> <span class="badge diverged">{} diverged</span> <span class="badge error">{} error</span> <span>{} not as expected</span></p>"#,
        esc(&title),
        esc(&rep.suite.about),
        rep.shard.as_deref().map(|s| format!(" · shard {s}")).unwrap_or_default(),
        esc(&rep.generated_at),
        esc(&rep.lockstep_version),
        t.cases,
        t.pass,
        t.diverged,
        t.error,
        t.not_as_expected
    );
    if !rep.regressions.is_empty() {
        o.push_str(r#"<div class="reg"><b>Regressions since the last report</b><ul>"#);
        for r in &rep.regressions {
            let _ = write!(o, r##"<li><a href="#{}">{}</a>: {}</li>"##, anchor(&r.case), esc(&r.case), esc(&r.reason));
        }
        o.push_str("</ul></div>");
    } else if !rep.trend.is_empty() {
        o.push_str(r#"<div class="ok">No regression since the last report.</div>"#);
    }
    let with_trend = !rep.trend.is_empty();
    o.push_str(r#"<h2>Summary</h2><label class="meta"><input type="checkbox" id="only-bad"> only cases not as expected</label><div class="scroll"><table id="summary"><thead><tr><th>case</th><th>verdict</th><th>first divergence</th><th>diagnosis</th><th class="num" title="the largest rel-L2 ÷ its pass bound over the sites, or KL ÷ its pass bound (at most 1: within the bounds)">worst ÷<br>pass bound</th><th class="num">mean KL</th><th class="num">max KL</th><th class="num">top-1</th><th class="num">time</th>"#);
    if with_trend {
        o.push_str("<th class=\"hide-sm\">trend (mean KL)</th>");
    }
    o.push_str("</tr></thead><tbody>");
    let order = by_severity(&rep.cases);
    for c in &order {
        let fd = match c.divergence() {
            Some(_) => esc(&c.where_short()),
            None => "–".into(),
        };
        let _ = write!(
            o,
            r##"<tr class="{}" data-case="{}" data-verdict="{}" data-rank="{}" data-ratio="{}"><td><a href="#{}">{}</a></td><td>{}</td><td class="wrap">{fd}</td><td class="wrap diagnosis">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.1} s</td>"##,
            if c.as_expected { "expected" } else { "unexpected" },
            esc(&c.name),
            verdict_class(c),
            c.verdict_rank(),
            c.worst.as_ref().map(|w| format!("{:e}", w.ratio)).unwrap_or_default(),
            anchor(&c.name),
            esc(&c.name),
            badge(c),
            esc(&diagnosis(c)),
            worst_cell(c),
            sci(c.mean_kl),
            sci(c.max_kl),
            pct(c.top1),
            c.timing.total_s
        );
        if with_trend {
            let _ = write!(o, "<td class=\"hide-sm\">{}</td>", rep.trend.get(&c.name).map(|t| sparkline(t)).unwrap_or_default());
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></div>");
    let _ = write!(
        o,
        r#"<p class="meta">KL is KL(reference ‖ engine) of the next-token distribution in nats, worst over the case's references; top-1 is the share of steps where the engine and the reference pick the same token. Cases are sorted most wrong first: errors, then diverged, drifted and passing cases, each by its worst error ÷ pass bound. A regression is a case that was as expected last time and is not now, or whose mean KL grew more than ×{} and above {:e} nats.</p>"#,
        rep.thresholds.kl_growth_factor, rep.thresholds.kl_noise_nats
    );
    o.push_str("<h2>Cases</h2>");
    for c in &order {
        o.push_str(&case_section(c, rep.trend.get(&c.name)));
    }
    let _ = write!(o, "</main><script>{JS}</script></body></html>\n");
    o
}

/// `summary.md`: for a CI job summary or a chat message.
pub fn summary_md(rep: &Report) -> String {
    let mut o = String::new();
    let t = &rep.totals;
    let _ = writeln!(o, "## lockstep report: {}{}\n", rep.suite.name, rep.shard.as_deref().map(|s| format!(" (shard {s})")).unwrap_or_default());
    let _ = writeln!(
        o,
        "{} cases: {} pass, {} diverged, {} error; {} not as expected.\n",
        t.cases, t.pass, t.diverged, t.error, t.not_as_expected
    );
    if !rep.regressions.is_empty() {
        let _ = writeln!(o, "**Regressions since the last report:**\n");
        for r in &rep.regressions {
            let _ = writeln!(o, "- `{}`: {}", r.case, r.reason);
        }
        o.push('\n');
    }
    let _ = writeln!(o, "| case | verdict | first divergence | diagnosis | worst ÷ pass bound | mean KL | max KL | top-1 | time |");
    let _ = writeln!(o, "|---|---|---|---|---:|---:|---:|---:|---:|");
    for c in by_severity(&rep.cases) {
        let v = match (c.verdict.as_str(), c.as_expected) {
            ("pass", true) if c.drift => "pass (drift)".to_string(),
            (v, true) => v.to_string(),
            (v, false) => format!("**{v}** (expected {})", c.def.expect),
        };
        let cell = |s: String| s.replace('|', "\\|").replace('\n', " ");
        let worst = c.worst.as_ref().map(|w| format!("{}×", sci(Some(w.ratio)))).unwrap_or("–".into());
        let _ = writeln!(
            o,
            "| {} | {v} | {} | {} | {worst} | {} | {} | {} | {:.1} s |",
            c.name,
            cell(c.where_short()),
            cell(diagnosis(c)),
            sci(c.mean_kl),
            sci(c.max_kl),
            pct(c.top1),
            c.timing.total_s
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_colour_scale_is_the_error_over_its_pass_bound_the_same_for_every_case() {
        // The pass bound sits in the middle of the fixed scale; its ends are fixed decades.
        assert_eq!(scale_t(1.0), 0.5);
        assert_eq!(scale_t(10f64.powf(SCALE_LO)), 0.0);
        assert_eq!(scale_t(10f64.powf(SCALE_HI)), 1.0);
        assert_eq!(scale_t(0.0), 0.0);
        assert_eq!(scale_t(1e30), 1.0);
        // One rel-L2 of 1e-3: cool against a quantized pass bound (0.5), hot against f32's (1e-4).
        let cells = vec![vec![Some(1e-3)]];
        let quant = heatmap("q", &cells, &[Some(0.5)], &[Some(1.0)]);
        let f32 = heatmap("f", &cells, &[Some(1e-4)], &[Some(1e-2)]);
        assert!(quant.contains(r#"class="cell cool""#) && !quant.contains(r#"class="cell hot""#), "{quant}");
        assert!(f32.contains(r#"class="cell hot""#) && !f32.contains(r#"class="cell cool""#), "{f32}");
        // A clean case (1e-6 under 1e-4) gets the same colour in any case with the same ratio:
        // nothing is rescaled per case.
        let a = heatmap("a", &[vec![Some(1e-6), Some(1e-6)]], &[Some(1e-4), Some(1e-4)], &[None, None]);
        let b = heatmap("b", &[vec![Some(1e-6), Some(0.9)]], &[Some(1e-4), Some(1e-4)], &[None, None]);
        let fill = |h: &str| h.split(r#"class="cell "#).nth(1).and_then(|s| s.split("fill=\"").nth(1)).map(|s| s[..7].to_string());
        assert_eq!(fill(&a), fill(&b), "the first cell's colour does not depend on the other cells");
        assert!(scale_colour(0.49, false) != scale_colour(0.51, true));
    }

    #[test]
    fn bound_and_floor_lines_are_drawn_under_the_series() {
        let series = vec![("step 0".to_string(), "#000".to_string(), vec![Some(1e-6), Some(2e-6), Some(3e-6)])];
        let guides = vec![
            Guide { class: "bound-pass", label: "pass".into(), values: vec![Some(1e-4); 3] },
            Guide { class: "bound-fail", label: "fail".into(), values: vec![Some(1e-4), Some(0.5), Some(0.5)] },
            Guide { class: "floor", label: "floor".into(), values: vec![Some(0.0), Some(1e-7), None] },
        ];
        let svg = line_chart("t", "layer", "rel-L2", 3, &series, &guides);
        for class in ["guide bound-pass", "guide bound-fail", "guide floor"] {
            assert_eq!(svg.matches(&format!(r#"class="{class}""#)).count(), 1, "{class}: {svg}");
        }
        // The axis covers the bounds, not only the data: the fail bound's decade is on it.
        assert!(svg.contains(">1e0<") || svg.contains(">1e-1<"), "{svg}");
        // Drawn before the series (underneath).
        assert!(svg.find("guide bound-pass").unwrap() < svg.find(r#"class="series""#).unwrap());
    }
}
