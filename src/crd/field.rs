//! What both policies' spec parsers share: the error that names a field, and the field kinds
//! both have (the schedule, durations, and the `/status` endpoints of the members a loop proves
//! its steps on).

use std::time::Duration;

use super::Schedule;

/// A spec value is invalid.
#[derive(Debug, thiserror::Error)]
#[error("{kind} spec.{field}: {problem}")]
pub struct SpecError {
    /// The resource kind, e.g. `RotationPolicy`.
    pub kind: &'static str,
    /// The field, e.g. `converge.settle`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// Parses the `schedule` field of a `kind` spec.
pub fn schedule(kind: &'static str, text: Option<&str>) -> Result<Schedule, SpecError> {
    Schedule::parse(text).map_err(|e| SpecError { kind, field: "schedule", problem: e.to_string() })
}

/// Parses duration field `field` of a `kind` spec; `example` (the field's usual form, like `8m`)
/// goes into the error.
pub fn duration(
    kind: &'static str,
    field: &'static str,
    text: &str,
    example: &str,
) -> Result<Duration, SpecError> {
    humantime::parse_duration(text).map_err(|e| SpecError {
        kind,
        field,
        problem: format!("{text:?} is not a duration like {example}: {e}"),
    })
}

/// Whether every entry is an `http(s)://host:port` URL.
pub fn http_urls(urls: &[String]) -> bool {
    urls.iter().all(|url| reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")))
}
