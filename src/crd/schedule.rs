//! When a run is due: never, every so long, or on a cron expression (UTC). Shared by both
//! policies.

use std::time::Duration;

/// A schedule text is neither an interval of at least an hour nor a cron expression.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

/// When a run is due.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Only on request or a new key version.
    Never,
    /// Every so long after the last run.
    Every(Duration),
    /// A cron expression, UTC.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// Parses a schedule field; empty or absent means [`Schedule::Never`].
    pub fn parse(text: Option<&str>) -> Result<Self, ScheduleError> {
        let text = text.map(str::trim).unwrap_or("");
        if text.is_empty() {
            return Ok(Self::Never);
        }
        if let Ok(every) = humantime::parse_duration(text) {
            if every < Duration::from_secs(3600) {
                return Err(ScheduleError("an interval must be at least 1h".into()));
            }
            return Ok(Self::Every(every));
        }
        text.parse::<croner::Cron>().map(|c| Self::Cron(Box::new(c))).map_err(|e| {
            ScheduleError(format!("{text:?} is neither an interval like 720h nor a cron expression: {e}"))
        })
    }

    /// The next start after `after` (Unix seconds), if any.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match self {
            Self::Never => None,
            Self::Every(every) => Some(after + every.as_secs() as i64),
            Self::Cron(cron) => {
                let start = chrono::DateTime::from_timestamp(after, 0)?;
                cron.find_next_occurrence(&start, false).ok().map(|t| t.timestamp())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_compute_the_next_run() {
        assert!(matches!(Schedule::parse(None).unwrap(), Schedule::Never));
        assert_eq!(Schedule::parse(Some("720h")).unwrap().next_after(1000), Some(1000 + 720 * 3600));
        assert!(Schedule::parse(Some("5m")).is_err());
        // 2026-11-26T20:00:00Z is a Thursday; the next Sunday 03:00 UTC is 2026-11-29T03:00:00Z.
        let cron = Schedule::parse(Some("0 3 * * 0")).unwrap();
        assert_eq!(cron.next_after(1_795_723_200), Some(1_795_921_200));
    }
}
