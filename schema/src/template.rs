//! E2B's template build API (SDK `e2b/template*`, e2b 2.63): what
//! `Template.build` sends and reads, and the steps a build runs.
//!
//! A build goes: `POST /v3/templates` ([`BuildRequest`] ->
//! [`BuildRequestAnswer`]), for each COPY step `GET
//! /templates/{id}/files/{hash}` ([`FileUpload`]) and a `PUT` of the tar
//! to the link it gives, `POST /v2/templates/{id}/builds/{buildID}`
//! ([`BuildStart`]), then `GET .../status?logsOffset=N` ([`BuildStatus`])
//! until `ready` or `error`.

use serde::{Deserialize, Serialize};

use crate::e2b::{LogLevel, TemplateBuildStatus};

/// `POST /v3/templates` (`TemplateBuildRequestV3`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    /// `name` or `name:tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Deprecated spelling of `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "teamID", default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(
        rename = "minFreeDiskMB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub min_free_disk_mb: Option<u64>,
}

/// The answer to `POST /v3/templates` (`TemplateRequestResponseV3`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildRequestAnswer {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// A UUID.
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// `GET /templates/{id}/files/{hash}` (`TemplateBuildFileUpload`): whether
/// the build context of a COPY step is stored already, and where to `PUT`
/// it (a gzipped or plain tar) when not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileUpload {
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Headers the upload must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
}

/// One step (`TemplateStep`). `type` is one of [`StepKind`]'s names; the
/// API refuses others with a 400 naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Step {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Lowercase hex SHA-256 of a COPY step's files, as the client
    /// computed it; names the uploaded tar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
    /// Run regardless of the layer cache (and so every later step).
    #[serde(default)]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_upload: Option<bool>,
}

/// The step kinds a build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `[command, user?]`: `sh -c command` as `user` (the current user
    /// when absent).
    Run,
    /// `[src, dest, user?, mode?]`: files of the uploaded tar.
    Copy,
    /// `[key, value, key, value, ...]`.
    Env,
    /// `[dir]`.
    Workdir,
    /// `[user]`.
    User,
}

impl StepKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RUN" => Self::Run,
            "COPY" => Self::Copy,
            "ENV" => Self::Env,
            "WORKDIR" => Self::Workdir,
            "USER" => Self::User,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Run => "RUN",
            Self::Copy => "COPY",
            Self::Env => "ENV",
            Self::Workdir => "WORKDIR",
            Self::User => "USER",
        }
    }
}

/// `POST /v2/templates/{id}/builds/{buildID}` (`TemplateBuildStartV2`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BuildStart {
    /// An image reference (`debian:bookworm`, `127.0.0.1:5000/x:y`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
    /// A template name (`base`, a user template, `name:tag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_template: Option<String>,
    /// Registry credentials (`{"type": "registry", "username", "password"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub from_image_registry: Option<serde_json::Value>,
    /// Ignore the layer cache for the whole build.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
}

/// A build log line (`BuildLogEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildLogEntry {
    /// RFC 3339.
    pub timestamp: String,
    pub message: String,
    pub level: LogLevel,
    /// The step it belongs to: `base`, `1`..`n`, `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed (`BuildStatusReason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_entries: Vec<BuildLogEntry>,
}

/// `GET /templates/{id}/builds/{buildID}/status` (`TemplateBuildInfo`):
/// the status and the log entries from `logsOffset` on (at most
/// [`MAX_LOG_ENTRIES`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    /// Always empty (E2B dropped the v1 plain-text logs).
    pub logs: Vec<String>,
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: TemplateBuildStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// Most log entries one status or logs answer carries (E2B's).
pub const MAX_LOG_ENTRIES: usize = 100;

/// `GET /templates/{id}/builds/{buildID}/logs` (`TemplateBuildLogsResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildLogs {
    pub logs: Vec<BuildLogEntry>,
}

/// A template's tag (`TemplateTag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
}

/// `POST /templates/tags` (`AssignTemplateTagsRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignTags {
    /// `name:tag` of the build to tag.
    pub target: String,
    pub tags: Vec<String>,
}

/// The answer to `POST /templates/tags` (`AssignedTemplateTags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignedTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// `DELETE /templates/tags` (`DeleteTemplateTagsRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeleteTags {
    pub name: String,
    pub tags: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_reads_as_the_sdk_sends_it() {
        let body = r#"{"steps":[{"type":"RUN","args":["apt-get update","root"],"force":false},
            {"type":"COPY","args":["local/dir","/app","",""],"force":false,"filesHash":"ab"}],
            "force":false,"fromTemplate":"base","startCmd":"sleep 1","readyCmd":"true"}"#;
        let start: BuildStart = serde_json::from_str(body).unwrap();
        assert_eq!(start.from_template.as_deref(), Some("base"));
        assert_eq!(start.steps.len(), 2);
        assert_eq!(StepKind::parse(&start.steps[0].kind), Some(StepKind::Run));
        assert_eq!(start.steps[1].files_hash.as_deref(), Some("ab"));
        assert_eq!(start.ready_cmd.as_deref(), Some("true"));
        assert_eq!(StepKind::parse("ADD"), None);
    }
}
