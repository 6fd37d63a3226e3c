//! What the demo prints: one row per question (also its `--json` line), the
//! table of them and the route summary.

/// One answered (or failed) question.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Row {
    pub(super) question: String,
    pub(super) tag: String,
    pub(super) asked: String,
    pub(super) forced: bool,
    /// The safety classifier flagged the question.
    pub(super) safety: bool,
    pub(super) route: String,
    pub(super) answer: String,
    pub(super) confidence: Option<f64>,
    pub(super) voters: Option<usize>,
    pub(super) ms: u64,
    pub(super) degraded_reason: Option<String>,
    pub(super) gateway: Option<String>,
    /// The gateway's node name in this demo.
    pub(super) gateway_node: Option<String>,
    pub(super) model: String,
    pub(super) error: Option<String>,
}

/// `s` on one line, cut to `n` characters.
fn cell(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= n {
        flat
    } else {
        format!("{}…", flat.chars().take(n.saturating_sub(1)).collect::<String>())
    }
}

pub(super) fn print_table(rows: &[Row]) {
    let head = ["#", "question", "route", "answer", "conf", "voters", "ms"];
    let body: Vec<[String; 7]> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut route = r.route.clone();
            if r.forced {
                route.push_str(" (forced)");
            }
            if r.safety {
                route.push_str(" (safety)");
            }
            if r.degraded_reason.is_some() {
                route.push_str(" *");
            }
            let tag = if r.tag.is_empty() {
                String::new()
            } else {
                format!("[{}] ", r.tag)
            };
            [
                (i + 1).to_string(),
                cell(&format!("{tag}{}", r.question), 46),
                route,
                cell(r.error.as_deref().unwrap_or(&r.answer), 34),
                r.confidence
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "-".into()),
                r.voters.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                r.ms.to_string(),
            ]
        })
        .collect();
    let mut w = head.map(|h| h.chars().count());
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            // Numbers right-aligned, text left-aligned.
            if matches!(i, 0 | 4 | 5 | 6) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        println!("{}", s.trim_end());
    };
    line(&head.map(String::from));
    line(&w.map(|n| "-".repeat(n)));
    for r in &body {
        line(r);
    }
    println!(
        "route: local = the asked node alone, vote = its peers voted, cloud = via the gateway; \
         (forced) = the question asked for that route, (safety) = flagged by the safety classifier"
    );
    for (i, r) in rows.iter().enumerate() {
        if let Some(d) = &r.degraded_reason {
            println!("  * {}: degraded: {d}", i + 1);
        }
    }
}

pub(super) fn summary(rows: &[Row]) {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *counts.entry(r.route.as_str()).or_default() += 1;
    }
    let mix: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("\nroutes: {}", mix.join(", "));
    if let Some(r) = rows.iter().find(|r| r.gateway.is_some()) {
        println!(
            "cloud answers came through the gateway {} ({}); only it holds the cloud key",
            r.gateway_node.as_deref().unwrap_or("?"),
            r.gateway.as_deref().unwrap_or("")
        );
    }
}
