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
    Cron(Box<Cron>),
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
        Cron::parse(text).map(|c| Self::Cron(Box::new(c))).map_err(|e| {
            ScheduleError(format!("{text:?} is neither an interval like 720h nor a cron expression: {e}"))
        })
    }

    /// The next start after `after` (Unix seconds), if any.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match self {
            Self::Never => None,
            Self::Every(every) => Some(after + every.as_secs() as i64),
            Self::Cron(cron) => cron.next_after(after),
        }
    }
}

/// A 5-field cron expression (minute, hour, day of month, month, day of week), read in UTC with
/// the rules of Vixie cron that the `croner` crate kmsgate used before follows: `*`, `?` (day
/// fields), numbers, ranges `a-b`, steps `*/n`, `a-b/n` and `a/n` (from `a` to the end), lists,
/// month and weekday names (`JAN`, `MON`, any case), Sunday as 0 or 7, and `@yearly`,
/// `@annually`, `@monthly`, `@weekly`, `@daily`, `@hourly`. When both day fields are restricted
/// a day that matches either one is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    /// Bit n: minute n.
    minutes: u64,
    /// Bit n: hour n.
    hours: u32,
    /// Bit n: day of month n (1-31).
    days: u32,
    /// Bit n: month n (1-12).
    months: u16,
    /// Bit n: weekday n (0 = Sunday).
    weekdays: u8,
    /// The day-of-month field was `*` (or `?`), so only the weekday field picks days.
    any_day: bool,
    /// The day-of-week field was `*` (or `?`), so only the day-of-month field picks days.
    any_weekday: bool,
}

const MONTHS: [&str; 12] =
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
/// Every Gregorian calendar repeats within 400 years, so a pattern with no match in that span
/// never matches.
const SEARCH_DAYS: i64 = 146_097;

impl Cron {
    /// Parses an expression; the error names the field and what is wrong with it.
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let text = match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => text,
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week), not {}",
                fields.len()
            ));
        };
        let weekdays = field("day of week", weekday, 0, 7, &WEEKDAYS, true)?;
        Ok(Self {
            minutes: field("minute", minute, 0, 59, &[], false)?,
            hours: field("hour", hour, 0, 23, &[], false)? as u32,
            days: field("day of month", day, 1, 31, &[], true)? as u32,
            months: field("month", month, 1, 12, &MONTHS, false)? as u16,
            // NB: 7 is Sunday too.
            weekdays: (weekdays as u8 & 0x7f) | u8::from(weekdays & 0x80 != 0),
            any_day: matches!(day, "*" | "?"),
            any_weekday: matches!(weekday, "*" | "?"),
        })
    }

    /// The first whole minute strictly after `after` (Unix seconds) that matches, if any.
    fn next_after(&self, after: i64) -> Option<i64> {
        let start = after.div_euclid(60).checked_add(1)?.checked_mul(60)?;
        let first_day = start.div_euclid(86_400);
        let mut from = start.rem_euclid(86_400) / 60;
        for day in first_day..first_day.checked_add(SEARCH_DAYS)? {
            if self.day_matches(day)
                && let Some(minute) = self.first_minute_from(from)
            {
                return day.checked_mul(86_400)?.checked_add(minute * 60);
            }
            from = 0;
        }
        None
    }

    /// Whether `day` (days since 1970-01-01) is due, by month and the two day fields.
    fn day_matches(&self, day: i64) -> bool {
        let (month, day_of_month) = month_and_day(day);
        // NB: 1970-01-01 was a Thursday (4).
        let weekday = (day.rem_euclid(7) + 4) % 7;
        let by_day = self.days & (1 << day_of_month) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        self.months & (1 << month) != 0
            && match (self.any_day, self.any_weekday) {
                (_, true) => by_day,
                (true, false) => by_weekday,
                (false, false) => by_day || by_weekday,
            }
    }

    /// The first due minute of a due day at or after minute `from` of the day.
    fn first_minute_from(&self, from: i64) -> Option<i64> {
        (from..24 * 60).find(|m| self.hours & (1 << (m / 60)) != 0 && self.minutes & (1 << (m % 60)) != 0)
    }
}

/// The bits one field sets, `min..=max`; `names` are the values from `min` on (weekdays: 0 on).
fn field(what: &str, text: &str, min: u32, max: u32, names: &[&str], question: bool) -> Result<u64, String> {
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => match step.parse::<u32>() {
                Ok(step) if step > 0 => (range, Some(step)),
                _ => return Err(format!("{what}: the step in {item:?} is not a number above 0")),
            },
            None => (item, None),
        };
        let value = |text: &str, end: bool| -> Result<u32, String> {
            let named = names.iter().position(|n| n.eq_ignore_ascii_case(text)).map(|i| i as u32 + min);
            // NB: `FRI-SUN` runs to Sunday as 7, not back to 0.
            let named = named.map(|v| if end && v == 0 && names == WEEKDAYS { 7 } else { v });
            let value = named
                .or_else(|| text.parse().ok())
                .ok_or_else(|| format!("{what}: {text:?} is not a value"))?;
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(format!("{what}: {value} is not in {min}-{max}"))
            }
        };
        let (first, last) = match range {
            "*" => (min, max),
            "?" if question => (min, max),
            _ => match range.split_once('-') {
                Some((first, last)) => (value(first, false)?, value(last, true)?),
                None if step.is_some() => (value(range, false)?, max),
                None => (value(range, false)?, value(range, false)?),
            },
        };
        if first > last {
            return Err(format!("{what}: the range {range:?} runs backwards"));
        }
        for v in (first..=last).step_by(step.unwrap_or(1) as usize) {
            bits |= 1 << v;
        }
    }
    Ok(bits)
}

/// Month (1-12) and day of month of `day` days since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn month_and_day(day: i64) -> (u32, u32) {
    let z = day + 719_468;
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day_of_month = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    (month as u32, day_of_month as u32)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

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

    /// Unix seconds of a UTC date and time.
    fn at(text: &str) -> i64 {
        k8s_openapi::jiff::Timestamp::from_str(text).unwrap().as_second()
    }

    fn next(pattern: &str, after: &str) -> Option<i64> {
        Schedule::parse(Some(pattern)).unwrap().next_after(at(after))
    }

    #[test]
    fn cron_fields_follow_vixie_cron() {
        let cases = [
            // The next minute, never the one it starts on.
            ("* * * * *", "2026-11-26T20:00:00Z", "2026-11-26T20:01:00Z"),
            ("* * * * *", "2026-11-26T20:00:59Z", "2026-11-26T20:01:00Z"),
            ("*/15 * * * *", "2026-11-26T20:15:00Z", "2026-11-26T20:30:00Z"),
            ("5-20/5 3 * * *", "2026-11-26T03:10:00Z", "2026-11-26T03:15:00Z"),
            ("50/5 3 * * *", "2026-11-26T03:56:00Z", "2026-11-27T03:50:00Z"),
            ("0 0,12 * * *", "2026-11-26T00:00:00Z", "2026-11-26T12:00:00Z"),
            // Names in any case; Sunday as 0 or 7; FRI-SUN runs through Sunday.
            ("0 3 * * sun", "2026-11-26T20:00:00Z", "2026-11-29T03:00:00Z"),
            ("0 3 * * 7", "2026-11-26T20:00:00Z", "2026-11-29T03:00:00Z"),
            ("0 3 * * FRI-SUN", "2026-11-28T04:00:00Z", "2026-11-29T03:00:00Z"),
            ("0 0 1 jan,Jul *", "2026-11-26T20:00:00Z", "2027-01-01T00:00:00Z"),
            // Both day fields restricted: either one is due. One `*` or `?`: only the other.
            ("0 0 1 * MON", "2026-11-26T20:00:00Z", "2026-11-30T00:00:00Z"),
            ("0 0 1 * ?", "2026-11-26T20:00:00Z", "2026-12-01T00:00:00Z"),
            ("0 0 ? * MON", "2026-11-26T20:00:00Z", "2026-11-30T00:00:00Z"),
            // Leap days, the end of a month and of a year.
            ("0 0 29 2 *", "2026-11-26T20:00:00Z", "2028-02-29T00:00:00Z"),
            ("0 0 31 * *", "2026-11-26T20:00:00Z", "2026-12-31T00:00:00Z"),
            ("59 23 31 12 *", "2026-12-31T23:59:00Z", "2027-12-31T23:59:00Z"),
            ("@yearly", "2026-11-26T20:00:00Z", "2027-01-01T00:00:00Z"),
            ("@Weekly", "2026-11-26T20:00:00Z", "2026-11-29T00:00:00Z"),
            ("@hourly", "2026-11-26T20:00:00Z", "2026-11-26T21:00:00Z"),
            ("@daily", "1969-12-31T12:00:00Z", "1970-01-01T00:00:00Z"),
        ];
        for (pattern, after, expected) in cases {
            assert_eq!(next(pattern, after), Some(at(expected)), "{pattern} after {after}");
        }
        // A date that never comes.
        assert_eq!(next("0 0 30 2 *", "2026-11-26T20:00:00Z"), None);
    }

    #[test]
    fn a_bad_cron_expression_says_what_is_wrong() {
        let cases = [
            ("0 3 * *", "has 5 fields (minute hour day-of-month month day-of-week), not 4"),
            ("0 0 3 * * 0", "not 6"),
            ("60 3 * * *", "minute: 60 is not in 0-59"),
            ("0 24 * * *", "hour: 24 is not in 0-23"),
            ("0 0 0 * *", "day of month: 0 is not in 1-31"),
            ("0 0 * 13 *", "month: 13 is not in 1-12"),
            ("0 0 * * 8", "day of week: 8 is not in 0-7"),
            ("*/0 * * * *", "minute: the step in \"*/0\" is not a number above 0"),
            ("0 5-2 * * *", "hour: the range \"5-2\" runs backwards"),
            ("0 0 L * *", "day of month: \"L\" is not a value"),
            ("0 ? * * *", "hour: \"?\" is not a value"),
            ("0,,5 * * * *", "minute: \"\" is not a value"),
        ];
        for (pattern, problem) in cases {
            let error = Schedule::parse(Some(pattern)).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!(
                    "{pattern:?} is neither an interval like 720h nor a cron expression: "
                )),
                "{error}"
            );
            assert!(error.contains(problem), "{pattern}: {error}");
        }
    }
}
