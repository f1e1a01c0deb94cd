//! `http.listen` and `log.*`: how a process reports on itself.

use std::net::SocketAddr;

use super::{ConfigError, field, source::Values};

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Filter directives.
    pub level: String,
    /// JSON instead of text.
    pub json: bool,
}

impl LogConfig {
    /// Reads `log.*`.
    pub(super) fn read(v: &Values) -> Result<Self, ConfigError> {
        let json = match v.text("log.format")?.unwrap_or_default().as_str() {
            "text" => false,
            "json" => true,
            other => return Err(field("log.format", format!("{other:?} must be text or json"))),
        };
        Ok(Self { level: v.text("log.level")?.unwrap_or_default(), json })
    }
}

/// Reads `http.listen`: the read-only HTTP endpoint's address, `None` when off.
pub(super) fn listen(v: &Values) -> Result<Option<SocketAddr>, ConfigError> {
    match v.text("http.listen")?.unwrap_or_default().as_str() {
        "off" | "" => Ok(None),
        addr => Ok(Some(
            addr.parse().map_err(|_| field("http.listen", format!("{addr:?} is not HOST:PORT or off")))?,
        )),
    }
}
