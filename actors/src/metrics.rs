//! Names of the metrics the actors record. The node installs the
//! Prometheus recorder and serves them at `GET /metrics` with its own.

/// Time of a successful create, request to envd initialised.
pub const CREATE_SECONDS: &str = "sandmesh_sandbox_create_seconds";
/// Creates by `result` (`ok`, `error`).
pub const CREATES: &str = "sandmesh_sandbox_creates_total";
/// Sandboxes whose runtime process died under the node.
pub const LOST: &str = "sandmesh_sandboxes_lost_total";
/// Sandboxes killed by their timeout.
pub const TIMED_OUT: &str = "sandmesh_sandboxes_timed_out_total";
/// Pauses by `result` (`ok`, `refused`: the sandbox kept running, `lost`).
pub const PAUSES: &str = "sandmesh_sandbox_pauses_total";
/// Time of a successful pause (checkpoint), request to snapshot written.
pub const PAUSE_SECONDS: &str = "sandmesh_sandbox_pause_seconds";
/// Time of a successful resume, request to envd initialised.
pub const RESUME_SECONDS: &str = "sandmesh_sandbox_resume_seconds";
/// Counts an actor restart, by `actor` (`template_cache`, `placement`,
/// `sandbox_supervisor`).
pub const RESTARTS: &str = "sandmesh_actor_restarts_total";
