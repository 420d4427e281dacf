//! The E2B REST API as the official SDK speaks it (e2b 2.63.0): request and
//! response bodies of the sandbox endpoints. Field names follow the SDK's
//! generated client exactly (`templateID`, `sandboxID`, the snake_case
//! `allow_internet_access`); unknown request fields are ignored, as the SDK
//! sends newer optional keys (network, lifecycle, volume mounts, mcp) we do
//! not act on yet.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// `POST /v2/sandboxes` body (`NewSandboxV2`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the sandbox is killed; the server default when absent.
    /// Signed so that a negative value is refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(rename = "autoPause", default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// What a timeout's auto-pause keeps: `false` asks E2B for a
    /// filesystem-only snapshot. We always keep memory too (a superset);
    /// the flag is checked against `autoPause` and `autoResume` as E2B does.
    #[serde(
        rename = "autoPauseMemory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_pause_memory: Option<bool>,
    /// `lifecycle.auto_resume` in the SDK: traffic to the paused sandbox's
    /// ports (through the node's proxy) resumes it.
    #[serde(
        rename = "autoResume",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_resume: Option<AutoResumeConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars", default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Accepted and ignored: every sandbox is secured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
}

/// `autoResume` of a create (`SandboxAutoResumeConfig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AutoResumeConfig {
    pub enabled: bool,
}

/// `kill` or `pause`: what the timeout does (`SandboxOnTimeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    Kill,
    Pause,
}

/// `lifecycle` of `GET /sandboxes/{id}` (`SandboxLifecycle`): both keys
/// are required when the object is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLifecycle {
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
    #[serde(rename = "onTimeout")]
    pub on_timeout: OnTimeout,
}

/// `GET /templates/aliases/{alias}` (`TemplateAliasResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub public: bool,
}

/// Which runtime runs a sandbox, as reported in our extra `runtime` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Gvisor,
    Microvm,
}

/// The response of create and connect (`Sandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    /// `null`: the SDK then uses `E2B_DOMAIN` (or `E2B_SANDBOX_URL`).
    #[serde(default)]
    pub domain: Option<String>,
    /// Ours (the SDK ignores unknown fields): which runtime runs it.
    pub runtime: RuntimeName,
}

/// `running` or `paused`: the SDK fails to parse any other value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SandboxStateName {
    Running,
    Paused,
}

impl SandboxStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
        }
    }
}

/// `GET /sandboxes/{id}` (`SandboxDetail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339.
    #[serde(rename = "startedAt")]
    pub started_at: String,
    /// RFC 3339: when the timeout kills the sandbox.
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxStateName,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub domain: Option<String>,
    /// What the timeout does and whether traffic resumes it when paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<SandboxLifecycle>,
    /// Ours (the SDK ignores unknown fields): which runtime runs it.
    pub runtime: RuntimeName,
}

/// An item of `GET /v2/sandboxes` and `GET /sandboxes` (`ListedSandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxStateName,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Ours: which runtime runs it.
    pub runtime: RuntimeName,
}

impl From<SandboxDetail> for ListedSandbox {
    fn from(d: SandboxDetail) -> Self {
        Self {
            template_id: d.template_id,
            sandbox_id: d.sandbox_id,
            client_id: d.client_id,
            started_at: d.started_at,
            end_at: d.end_at,
            cpu_count: d.cpu_count,
            memory_mb: d.memory_mb,
            disk_size_mb: d.disk_size_mb,
            state: d.state,
            envd_version: d.envd_version,
            metadata: d.metadata,
            runtime: d.runtime,
        }
    }
}

/// `POST /sandboxes/{id}/timeout` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TimeoutRequest {
    pub timeout: i64,
}

/// `POST /v2/sandboxes/{id}/connect` body (`ConnectSandboxV2`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/resume` body (`ResumedSandbox`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(rename = "autoPause", default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
}

/// `POST /sandboxes/{id}/refreshes` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RefreshRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
}

/// `building`, `ready`, ... of a template build (`TemplateBuildStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TemplateBuildStatus {
    Building,
    Waiting,
    Ready,
    Error,
}

/// One build of a template (`TemplateBuild`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateBuild {
    /// A UUID (the SDK parses it as one).
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: TemplateBuildStatus,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    #[serde(
        rename = "finishedAt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(
        rename = "diskSizeMB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disk_size_mb: Option<u64>,
    #[serde(
        rename = "envdVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_version: Option<String>,
}

/// An item of `GET /templates` (`Template`); `GET /templates/{id}` adds
/// `builds` (`TemplateWithBuilds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateInfo {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The last successful build (a UUID).
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    /// Always `null`: a node has no user accounts (the key is required).
    #[serde(rename = "createdBy")]
    pub created_by: Option<serde_json::Value>,
    /// `null` until the first sandbox (the key is required).
    #[serde(rename = "lastSpawnedAt")]
    pub last_spawned_at: Option<String>,
    #[serde(rename = "spawnCount")]
    pub spawn_count: u64,
    #[serde(rename = "buildCount")]
    pub build_count: u64,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "buildStatus")]
    pub build_status: TemplateBuildStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds: Option<Vec<TemplateBuild>>,
}

/// An item of `GET /sandboxes/{id}/metrics` (`SandboxMetric`): the guest's
/// own view, as envd samples it. Every key is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxMetric {
    /// RFC 3339.
    pub timestamp: String,
    #[serde(rename = "timestampUnix")]
    pub timestamp_unix: i64,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "cpuUsedPct")]
    pub cpu_used_pct: f64,
    #[serde(rename = "memUsed")]
    pub mem_used: u64,
    #[serde(rename = "memTotal")]
    pub mem_total: u64,
    #[serde(rename = "memCache")]
    pub mem_cache: u64,
    #[serde(rename = "diskUsed")]
    pub disk_used: u64,
    #[serde(rename = "diskTotal")]
    pub disk_total: u64,
}

/// `debug`, `info`, `warn` or `error` (`LogLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// A structured log entry of a sandbox (`SandboxLogEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLogEntry {
    /// RFC 3339.
    pub timestamp: String,
    pub message: String,
    pub level: LogLevel,
    pub fields: BTreeMap<String, String>,
}

/// A plain log line of a sandbox (`SandboxLog`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLog {
    pub timestamp: String,
    pub line: String,
}

/// `GET /sandboxes/{id}/logs` (`SandboxLogs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLogs {
    pub logs: Vec<SandboxLog>,
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<SandboxLogEntry>,
}

/// `GET /v2/sandboxes/{id}/logs` (`SandboxLogsV2Response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLogsV2 {
    pub logs: Vec<SandboxLogEntry>,
}

/// `POST /sandboxes/{id}/snapshots` body (`SandboxSnapshotRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `false`: the filesystem only (E2B's `mode="filesystem"`): sandboxes
    /// created from it boot afresh with its files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// A snapshot a sandbox can be created from (`SnapshotInfo`): its id is
/// what `Sandbox.create(template=...)` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

/// `POST /sandboxes/{id}/fork` body (`SandboxForkRequest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

/// One entry of the fork answer: the new sandbox, or why that fork failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// Every error body: the SDK parses `code` (int) and `message` for each
/// documented status and crashes on anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub code: u16,
    pub message: String,
}

/// `2024-01-01T00:00:00.123Z`: RFC 3339 in UTC with milliseconds, as the
/// SDK's `dateutil.isoparse` reads it.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Unix milliseconds of a [`format_rfc3339`] string (exactly that shape:
/// UTC, three fraction digits); `None` for anything else.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + ms).ok()
}

/// Microseconds since the Unix epoch of any RFC 3339 date-time: `T` (or
/// `t`, or a space) between date and time, any number of fraction digits
/// (beyond microseconds truncated, as E2B truncates), `Z` or an offset.
/// The SDK's `started_after` is `datetime.isoformat()` of a zone-aware time,
/// e.g. `2026-01-02T03:04:05.123456+01:00`; a `+` that arrived unescaped in
/// a query string reads as a space, and is taken as `+`. `None` for
/// anything else.
pub fn parse_rfc3339_us(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..6 {
            micros *= 10;
        }
    }
    let offset_secs = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-' | b' '), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (oh, om) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let days = days_from_civil(y, m as u32, d as u32);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    Some(secs * 1_000_000 + micros)
}

/// (year, month, day) to days since 1970-01-01: the inverse of
/// [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_back() {
        for ms in [
            0u64,
            1,
            951_782_400_123,
            1_795_000_000_999,
            4_102_444_800_000,
        ] {
            let s = format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
            assert_eq!(parse_rfc3339_ms(&s), Some(ms), "{s}");
        }
        for bad in [
            "",
            "2024-01-01T00:00:00Z",
            "2024-13-01T00:00:00.000Z",
            "2024-01-01T00:00:00.00aZ",
            "2024-01-01 00:00:00.000Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
    use serde_json::json;

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        let base = 1_704_067_200_000_000i64; // 2024-01-01T00:00:00Z
        for (s, want) in [
            ("2024-01-01T00:00:00Z", base),
            ("2024-01-01T00:00:00.123Z", base + 123_000),
            ("2024-01-01T00:00:00.123456789Z", base + 123_456),
            ("2024-01-01T01:00:00.5+01:00", base + 500_000),
            ("2024-01-01T01:00:00.5 01:00", base + 500_000),
            ("2023-12-31T23:30:00-00:30", base),
            ("2024-01-01t00:00:00z", base),
            ("2024-01-01 00:00:00+00:00", base),
        ] {
            assert_eq!(parse_rfc3339_us(s), Some(want), "{s}");
        }
        for bad in [
            "",
            "2024-01-01",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0100",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00+01:00x",
        ] {
            assert_eq!(parse_rfc3339_us(bad), None, "{bad}");
        }
        // What we write reads back at the same instant.
        let ms = 1_795_000_000_999u64;
        let s = format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(parse_rfc3339_us(&s), Some(ms as i64 * 1000));
    }

    #[test]
    fn lifecycle_fields() {
        let n: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","autoPause":true,"autoPauseMemory":true,"autoResume":{"enabled":true}}"#,
        )
        .unwrap();
        assert_eq!(n.auto_resume, Some(AutoResumeConfig { enabled: true }));
        assert_eq!(n.auto_pause_memory, Some(true));
        let l = SandboxLifecycle {
            auto_resume: true,
            on_timeout: OnTimeout::Pause,
        };
        assert_eq!(
            serde_json::to_value(l).unwrap(),
            json!({"autoResume": true, "onTimeout": "pause"})
        );
        let a = TemplateAliasResponse {
            template_id: "base".into(),
            public: false,
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"templateID": "base", "public": false})
        );
    }

    #[test]
    fn new_sandbox_reads_the_sdk_body() {
        // Observed from the SDK (wire reference §2.2), newer keys included.
        let body = r#"{"templateID":"base","timeout":120,"autoPause":true,"autoResume":{"enabled":true},"allow_internet_access":true,"network":{"allowOut":["1.1.1.1"]},"metadata":{"k":"v"},"envVars":{"E":"1"}}"#;
        let n: NewSandbox = serde_json::from_str(body).unwrap();
        assert_eq!(n.template_id, "base");
        assert_eq!(n.timeout, Some(120));
        assert_eq!(n.auto_pause, Some(true));
        assert_eq!(n.allow_internet_access, Some(true));
        assert_eq!(n.metadata.unwrap()["k"], "v");
        assert_eq!(n.env_vars.unwrap()["E"], "1");

        let n: NewSandbox = serde_json::from_str(
            r#"{"templateID":"code-interpreter-v1","metadata":{},"envVars":{}}"#,
        )
        .unwrap();
        assert_eq!(n.timeout, None);
        assert_eq!(n.metadata, Some(BTreeMap::new()));

        let n: NewSandbox = serde_json::from_str(r#"{"templateID":"base","timeout":-5}"#).unwrap();
        assert_eq!(n.timeout, Some(-5));
        assert!(serde_json::from_str::<NewSandbox>(r#"{"timeout":5}"#).is_err());
    }

    #[test]
    fn sandbox_has_the_sdk_keys() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "node".into(),
            envd_version: "0.6.4".into(),
            envd_access_token: Some("tok".into()),
            domain: None,
            runtime: RuntimeName::Gvisor,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"templateID":"base","sandboxID":"abc","clientID":"node","envdVersion":"0.6.4","envdAccessToken":"tok","domain":null,"runtime":"gvisor"})
        );
    }

    #[test]
    fn detail_and_listed_have_the_sdk_keys() {
        let d = SandboxDetail {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "node".into(),
            started_at: "2024-01-01T00:00:00.000Z".into(),
            end_at: "2024-01-01T00:05:00.000Z".into(),
            envd_version: "0.6.4".into(),
            envd_access_token: Some("tok".into()),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 0,
            state: SandboxStateName::Running,
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            domain: None,
            lifecycle: Some(SandboxLifecycle {
                auto_resume: false,
                on_timeout: OnTimeout::Kill,
            }),
            runtime: RuntimeName::Gvisor,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"templateID":"base","sandboxID":"abc","clientID":"node",
                   "startedAt":"2024-01-01T00:00:00.000Z","endAt":"2024-01-01T00:05:00.000Z",
                   "envdVersion":"0.6.4","envdAccessToken":"tok","cpuCount":2,"memoryMB":512,
                   "diskSizeMB":0,"state":"running","metadata":{"k":"v"},"domain":null,
                   "lifecycle":{"autoResume":false,"onTimeout":"kill"},"runtime":"gvisor"})
        );
        let l = ListedSandbox::from(d);
        let v = serde_json::to_value(&l).unwrap();
        for key in [
            "templateID",
            "sandboxID",
            "clientID",
            "startedAt",
            "endAt",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "state",
            "envdVersion",
        ] {
            assert!(v.get(key).is_some(), "ListedSandbox lacks {key}: {v}");
        }
        assert_eq!(v["state"], "running");
    }

    #[test]
    fn small_bodies() {
        let t: TimeoutRequest = serde_json::from_str(r#"{"timeout":30}"#).unwrap();
        assert_eq!(t.timeout, 30);
        let c: ConnectRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(c.timeout, None);
        let c: ConnectRequest = serde_json::from_str(r#"{"timeout":30,"memory":false}"#).unwrap();
        assert_eq!(c.timeout, Some(30));
        let e = ApiError {
            code: 404,
            message: "sandbox x not found".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":404,"message":"sandbox x not found"}"#
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_704_067_200_123); // 2024-01-01
        assert_eq!(format_rfc3339(t), "2024-01-01T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399); // 2000-02-29 23:59:59
        assert_eq!(format_rfc3339(t), "2000-02-29T23:59:59.000Z");
    }
}
