//! Placeholder until the renderer lands.
use super::report::Report;
/// Renders the report.
pub fn render(report: &Report) -> String {
    format!("<pre>{}</pre>", report.scenario)
}
