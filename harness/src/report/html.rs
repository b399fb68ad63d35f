//! The pages of a nightly report: `index.html` (self-contained: inline CSS, SVG charts drawn
//! here, a few lines of script; no network, no external assets) and `summary.md`.
//!
//! Owns the drawing only: every number comes from `crate::report::records::Report`.

use std::fmt::Write as _;

use crate::report::records::{BisectNumbers, CaseResult, HistoryLine, Report};

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

/// Viridis-like colour for t in [0, 1].
fn heat(t: f64) -> String {
    const STOPS: [(f64, f64, f64); 5] =
        [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let m = |x: f64, y: f64| (x + (y - x) * f) as u8;
    format!("#{:02x}{:02x}{:02x}", m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
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
pub fn line_chart(title: &str, x_label: &str, y_label: &str, n_x: usize, series: &[(String, String, Vec<Option<f64>>)]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<figure><figcaption>{}</figcaption><svg class="chart line" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"##,
        esc(title),
        esc(title)
    );
    let Some((lo, hi)) = decades(series.iter().flat_map(|s| s.2.iter())) else {
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

/// A step × layer heatmap of one site's rel-L2 (log colour scale).
pub fn heatmap(title: &str, cells: &[Vec<Option<f64>>]) -> String {
    let mut o = String::new();
    let rows = cells.len();
    let cols = cells.iter().map(|r| r.len()).max().unwrap_or(0);
    let _ = write!(
        o,
        r##"<figure><figcaption>{}</figcaption><svg class="chart heatmap" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"##,
        esc(title),
        esc(title)
    );
    let (x0, x1, y0, y1) = (ML, W - MR - 60.0, MT, H - MB);
    let _ = write!(o, r##"<path class="frame" d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" fill="none" stroke="#555"/>"##);
    let range = decades(cells.iter().flat_map(|r| r.iter()));
    if rows == 0 || cols == 0 || range.is_none() {
        let _ = write!(o, r##"<text x="{}" y="{}" text-anchor="middle" class="axis">no data</text></svg></figure>"##, W / 2.0, H / 2.0);
        return o;
    }
    let (lo, hi) = range.expect("checked");
    let (cw, ch) = ((x1 - x0) / cols as f64, (y1 - y0) / rows as f64);
    for (s, row) in cells.iter().enumerate() {
        for (l, v) in row.iter().enumerate() {
            let (fill, tip) = match v {
                Some(v) if *v > 0.0 => (heat((v.log10() - lo) / (hi - lo)), format!("step {s}, layer {l}: {v:.2e}")),
                Some(_) => (heat(0.0), format!("step {s}, layer {l}: 0")),
                None => ("#eee".to_string(), format!("step {s}, layer {l}: not compared")),
            };
            let _ = write!(
                o,
                r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{fill}"><title>{tip}</title></rect>"##,
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
    // Colour scale.
    let (sx, sw) = (x1 + 18.0, 14.0);
    let n = 20;
    for k in 0..n {
        let t = k as f64 / (n - 1) as f64;
        let y = y1 - (y1 - y0) * (k + 1) as f64 / n as f64;
        let _ = write!(o, r##"<rect x="{sx}" y="{y:.1}" width="{sw}" height="{:.2}" fill="{}"/>"##, (y1 - y0) / n as f64 + 0.3, heat(t));
    }
    let _ = write!(o, r##"<text x="{:.1}" y="{:.1}" class="tick">1e{}</text><text x="{:.1}" y="{:.1}" class="tick">1e{}</text>"##, sx + sw + 3.0, y0 + 8.0, hi as i64, sx + sw + 3.0, y1, lo as i64);
    o.push_str("</svg></figure>");
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
@media (max-width:640px){body{font-size:14px}main{padding:8px}th,td{padding:4px 5px}.hide-sm{display:none}}
"#;

/// After load, the page checks itself: every chart has drawn paths with a real size (what
/// the headless-browser test reads back from `data-render`).
const JS: &str = r#"
(function(){
  var charts=document.querySelectorAll('svg.chart'),bad=0,drawn=0;
  charts.forEach(function(s){
    var ps=s.querySelectorAll('path'),ok=false;
    ps.forEach(function(p){var d=p.getAttribute('d')||'';var b=p.getBBox();if(d.trim().length>0&&(b.width>0||b.height>0))ok=true;});
    if(ok)drawn++;else bad++;
  });
  var rows=document.querySelectorAll('#summary tbody tr').length;
  document.body.setAttribute('data-charts',String(charts.length));
  document.body.setAttribute('data-charts-drawn',String(drawn));
  document.body.setAttribute('data-summary-rows',String(rows));
  document.body.setAttribute('data-render',bad===0&&charts.length>0&&rows>0?'ok':'fail');
  var f=document.getElementById('only-bad');
  if(f)f.addEventListener('change',function(){
    document.querySelectorAll('#summary tbody tr').forEach(function(r){r.style.display=f.checked&&!r.classList.contains('unexpected')?'none':'';});
  });
})();
"#;

/// One case's section of the page: a `<details>` block with everything known about the case.
fn case_section(c: &CaseResult, trend: Option<&Vec<HistoryLine>>) -> String {
    let mut o = String::new();
    let _ = write!(o, r#"<details class="case" id="{}" open><summary>{} {}</summary>"#, anchor(&c.name), esc(&c.name), badge(c));
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
    if let Some(f) = &c.first_divergence {
        let _ = write!(
            o,
            "<p><b>First divergence</b>: step {}, {}site <code>{}</code> vs {}: {}</p>",
            f.step,
            f.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
            esc(&f.site),
            esc(&f.reference),
            esc(&f.detail)
        );
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
        r#"<details><summary>Trend over the last {} report(s), mean KL: {}</summary><div class="scroll"><table class="trend"><thead><tr><th>date</th><th>verdict</th><th>first divergence</th><th class="num">mean KL</th><th class="num">max KL</th><th class="num">top-1</th><th class="num">time</th></tr></thead><tbody>"#,
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
            &format!("error per layer for each step (worst rel-L2 of the layer's sites vs {})", le.reference),
            "layer",
            "rel-L2",
            c.num_layers,
            &series,
        ));
    }
    if let Some(h) = &c.heatmap {
        o.push_str(&heatmap(&format!("step × layer rel-L2 of the worst site, {} (vs {})", h.site, h.reference), &h.cells));
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
    o.push_str(&line_chart("KL(reference ‖ engine) of the next token, per step", "step", "KL (nats)", c.steps.len(), &kl));
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

/// The case's bisect: its error, or the first failing site, isolation and diagnosis.
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
            "<p>first failing site <code>{}</code>{} at step {} (vs {}){}</p>",
            esc(b.site.as_deref().unwrap_or("-")),
            b.layer.map(|l| format!(", layer {l}")).unwrap_or_default(),
            b.step.map(|s| s.to_string()).unwrap_or("-".into()),
            esc(b.reference.as_deref().unwrap_or("-")),
            b.detail.as_deref().map(|d| format!(": {}", esc(d))).unwrap_or_default()
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
    o.push_str(r#"<h2>Summary</h2><label class="meta"><input type="checkbox" id="only-bad"> only cases not as expected</label><div class="scroll"><table id="summary"><thead><tr><th>case</th><th>verdict</th><th>first divergence</th><th class="num">mean KL</th><th class="num">max KL</th><th class="num">top-1</th><th class="num">time</th>"#);
    if with_trend {
        o.push_str("<th class=\"hide-sm\">trend (mean KL)</th>");
    }
    o.push_str("</tr></thead><tbody>");
    for c in &rep.cases {
        let fd = match (&c.first_divergence, &c.error) {
            (_, Some(e)) => esc(&e.lines().next().unwrap_or("").chars().take(90).collect::<String>()),
            (Some(_), None) => esc(&c.where_short()),
            (None, None) => "–".into(),
        };
        let _ = write!(
            o,
            r##"<tr class="{}"><td><a href="#{}">{}</a></td><td>{}</td><td class="wrap">{fd}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.1} s</td>"##,
            if c.as_expected { "expected" } else { "unexpected" },
            anchor(&c.name),
            esc(&c.name),
            badge(c),
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
        r#"<p class="meta">KL is KL(reference ‖ engine) of the next-token distribution in nats, worst over the case's references; top-1 is the share of steps where the engine and the reference pick the same token. A regression is a case that was as expected last time and is not now, or whose mean KL grew more than ×{} and above {:e} nats.</p>"#,
        rep.thresholds.kl_growth_factor, rep.thresholds.kl_noise_nats
    );
    o.push_str("<h2>Cases</h2>");
    for c in &rep.cases {
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
    let _ = writeln!(o, "| case | verdict | first divergence | mean KL | max KL | top-1 | time |");
    let _ = writeln!(o, "|---|---|---|---:|---:|---:|---:|");
    for c in &rep.cases {
        let v = match (c.verdict.as_str(), c.as_expected) {
            ("pass", true) if c.drift => "pass (drift)".to_string(),
            (v, true) => v.to_string(),
            (v, false) => format!("**{v}** (expected {})", c.def.expect),
        };
        let fd = match &c.error {
            Some(e) => e.lines().next().unwrap_or("").chars().take(80).collect::<String>().replace('|', "\\|"),
            None => c.where_short(),
        };
        let _ = writeln!(o, "| {} | {v} | {fd} | {} | {} | {} | {:.1} s |", c.name, sci(c.mean_kl), sci(c.max_kl), pct(c.top1), c.timing.total_s);
    }
    let diagnosed: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.bisect.as_ref().is_some_and(|b| b.diagnosis.is_some())).collect();
    if !diagnosed.is_empty() {
        o.push('\n');
        for c in diagnosed {
            let b = c.bisect.as_ref().expect("filtered");
            let _ = writeln!(o, "- `{}`: bisect: {} [{}]", c.name, b.diagnosis_title.as_deref().unwrap_or(""), b.diagnosis.as_deref().unwrap_or(""));
        }
    }
    o
}
