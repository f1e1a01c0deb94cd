//! The custom resources (RotationPolicy, SigningKeyPolicy, TokenPolicy) and their parsing into typed plans. The
//! bottom layer of the controller half: nothing here imports the rooms that act on a plan.

pub mod field;
pub mod policy;
pub mod rotation;
pub mod schedule;
pub mod signing;
pub mod status;
pub mod tokens;

pub use schedule::{Cron, Schedule, ScheduleError};
