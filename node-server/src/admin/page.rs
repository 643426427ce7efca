//! The HTML of `GET /status`: plain server-rendered tables that reload
//! themselves every [`REFRESH_SECS`] seconds.

use std::fmt::Write;

use super::report::{StatusReport, ago};

/// Seconds between reloads of the page.
pub(crate) const REFRESH_SECS: u32 = 2;

/// `s` with HTML's special characters escaped.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f3f3f3}.muted{color:#777}.live{color:#087f23;font-weight:bold}\
h2{margin-top:1.2em}";

/// The page.
pub(crate) fn render(report: &StatusReport) -> String {
    let now = report.generated_at;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>crsync server status</title><style>{STYLE}</style></head><body>\
         <h1>crsync server status</h1>\
         <p class=\"muted\">version {} · up {} · refreshes every {REFRESH_SECS} s</p>",
        esc(&report.version),
        ago(0, report.uptime_secs),
    );
    h.push_str("<h2>Databases</h2>");
    if report.databases.is_empty() {
        h.push_str("<p class=\"muted\">No databases yet.</p>");
    } else {
        h.push_str(
            "<table id=\"databases\"><tr><th>Database</th><th>Size</th><th>DB version</th>\
             <th>Rows per table</th><th>Clients</th></tr>",
        );
        for db in &report.databases {
            let tables = if db.open {
                db.tables
                    .iter()
                    .map(|t| format!("{}: {}", esc(&t.name), t.rows))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                "<span class=\"muted\">not open</span>".to_owned()
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{} bytes</td><td>{}</td><td>{tables}</td><td>{}</td></tr>",
                esc(&db.name),
                db.size_bytes,
                db.db_version
                    .map_or_else(|| "-".to_owned(), |v| v.to_string()),
                db.peers
                    .iter()
                    .filter(|p| p.connected_since.is_some())
                    .count(),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Connected peers</h2>");
    let peers: Vec<_> = report
        .databases
        .iter()
        .flat_map(|db| db.peers.iter().map(move |p| (db, p)))
        .collect();
    if peers.is_empty() {
        h.push_str("<p class=\"muted\">No peers connected.</p>");
    } else {
        h.push_str(
            "<table id=\"peers\"><tr><th>Database</th><th>Peer</th><th>Transport</th>\
             <th>Address</th><th>Phase</th><th>Lag</th><th>Since</th><th>Last error</th></tr>",
        );
        for (db, p) in peers {
            let class = if p.phase == "live" {
                " class=\"live\""
            } else {
                ""
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{class}>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&db.name),
                esc(p.peer.as_deref().unwrap_or("-")),
                esc(&p.transport),
                esc(p.address.as_deref().unwrap_or("-")),
                esc(&p.phase),
                p.lag,
                p.connected_since
                    .map_or_else(|| "-".to_owned(), |at| format!("{} ago", ago(at, now))),
                esc(p.last_error.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Recent errors</h2>");
    if report.errors.is_empty() {
        h.push_str("<p class=\"muted\">No errors.</p>");
    } else {
        h.push_str(
            "<table id=\"errors\"><tr><th>When</th><th>Database</th><th>Kind</th>\
             <th>Code</th><th>Message</th></tr>",
        );
        for e in &report.errors {
            let _ = write!(
                h,
                "<tr><td>{} ago</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                ago(e.at, now),
                esc(&e.database),
                esc(&e.kind),
                esc(e.code.as_deref().unwrap_or("")),
                esc(&e.message),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Recent conflicts</h2>");
    match &report.conflicts {
        None => h.push_str("<p class=\"muted\">This server's Store keeps no conflict history.</p>"),
        Some(c) if c.is_empty() => h.push_str("<p class=\"muted\">No conflicts.</p>"),
        Some(c) => {
            h.push_str("<ul id=\"conflicts\">");
            for conflict in c {
                let _ = write!(h, "<li><code>{}</code></li>", esc(&conflict.to_string()));
            }
            h.push_str("</ul>");
        }
    }
    h.push_str("</body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }
}
