//! The custom resources (RotationPolicy, TokenPolicy) and their parsing into typed plans. The
//! bottom layer of the controller half: nothing here imports the rooms that act on a plan.

pub mod rotation;
pub mod schedule;
pub mod tokens;

pub use schedule::{Cron, Schedule, ScheduleError};
