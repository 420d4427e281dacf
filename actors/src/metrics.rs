//! Names of the metrics the actors record. The node installs the
//! Prometheus recorder and serves them at `GET /metrics` with its own.

/// Time of a successful create, request to envd initialised.
pub const CREATE_SECONDS: &str = "sandmesh_sandbox_create_seconds";
/// Creates by `result` (`ok`, `error`).
pub const CREATES: &str = "sandmesh_sandbox_creates_total";
/// Sandboxes whose runtime process died under the node.
pub const LOST: &str = "sandmesh_sandboxes_lost_total";
/// Paused sandboxes this node took over from the object store (their
/// node died, or this node had lost its record of them).
pub const TAKEN_OVER: &str = "sandmesh_sandboxes_taken_over_total";
/// Template snapshots made ready at node start, by `source`: `prepared`
/// (booted here), `fetched` (from the object store) or `cached` (kept from
/// an earlier start).
pub const TEMPLATE_SNAPSHOTS: &str = "sandmesh_template_snapshots_total";
/// Sandboxes killed by their timeout.
pub const TIMED_OUT: &str = "sandmesh_sandboxes_timed_out_total";
/// Pauses by `result` (`ok`, `refused`: the sandbox kept running, `lost`,
/// `store_failed`: the object store refused the snapshot and the sandbox
/// was brought back).
pub const PAUSES: &str = "sandmesh_sandbox_pauses_total";
/// Time of a successful pause (checkpoint), request to snapshot written.
pub const PAUSE_SECONDS: &str = "sandmesh_sandbox_pause_seconds";
/// Time of a successful resume, request to envd initialised.
pub const RESUME_SECONDS: &str = "sandmesh_sandbox_resume_seconds";
/// Counts an actor restart, by `actor` (`template_cache`, `placement`,
/// `sandbox_supervisor`).
pub const RESTARTS: &str = "sandmesh_actor_restarts_total";
/// Compressed bytes of snapshot chunks uploaded to the object store.
pub const SNAPSHOT_BYTES_UPLOADED: &str = "sandmesh_snapshot_bytes_uploaded_total";
/// Compressed bytes of snapshot chunks fetched from the object store (the
/// local chunk cache's hits not counted).
pub const SNAPSHOT_BYTES_DOWNLOADED: &str = "sandmesh_snapshot_bytes_downloaded_total";
/// Snapshot chunks uploaded (the store had them not).
pub const SNAPSHOT_CHUNKS_UPLOADED: &str = "sandmesh_snapshot_chunks_uploaded_total";
/// Snapshot chunks not uploaded because the store had them already.
pub const SNAPSHOT_CHUNKS_DEDUPLICATED: &str = "sandmesh_snapshot_chunks_deduplicated_total";
/// Time of a successful snapshot upload, scan to manifest written.
pub const SNAPSHOT_UPLOAD_SECONDS: &str = "sandmesh_snapshot_upload_seconds";
/// Time of a successful snapshot download, manifest read to rename.
pub const SNAPSHOT_DOWNLOAD_SECONDS: &str = "sandmesh_snapshot_download_seconds";
/// Unreferenced snapshot chunks deleted by GC.
pub const SNAPSHOT_GC_CHUNKS_DELETED: &str = "sandmesh_snapshot_gc_chunks_deleted_total";
