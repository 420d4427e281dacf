//! The node's Prometheus metrics, served at `GET /metrics` (no API key:
//! aggregate counts only, for scrapers that cannot send one): the
//! process-wide recorder, and the names of what the front records (the
//! actors' are in `actors::metrics`).

use std::sync::OnceLock;

use actors::metrics::{
    CREATE_SECONDS, CREATES, LOST, PAUSE_SECONDS, PAUSES, RESUME_SECONDS,
    SNAPSHOT_BYTES_DOWNLOADED, SNAPSHOT_BYTES_UPLOADED, SNAPSHOT_CHUNKS_DEDUPLICATED,
    SNAPSHOT_CHUNKS_UPLOADED, SNAPSHOT_DOWNLOAD_SECONDS, SNAPSHOT_GC_CHUNKS_DELETED,
    SNAPSHOT_UPLOAD_SECONDS, TAKEN_OVER, TEMPLATE_SNAPSHOTS, TIMED_OUT,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Sandboxes by state (`running`, `creating`), set when scraped.
pub const SANDBOXES: &str = "sandmesh_sandboxes";
/// Body bytes through the sandbox-traffic proxy, by `direction`
/// (`to_sandbox`, `from_sandbox`).
pub const PROXY_BYTES: &str = "sandmesh_proxy_bytes_total";
/// Proxied requests by `outcome` (`forwarded`, `not_found`, `paused`,
/// `resume_failed`: an autoResume sandbox that would not resume, `unreachable`).
pub const PROXY_REQUESTS: &str = "sandmesh_proxy_requests_total";

/// Calls and streams this node sent to another node, by `kind`
/// (`sandbox`: a call on a sandbox, carried to the owner's directory as
/// a remote actor call; `reserve`: a placement reservation; `create`,
/// `list`, `traffic`, `signed`: a signed URL lookup) and `outcome` (`ok`,
/// `unreachable`: the node did not answer, `dead`: gossip says it is
/// dead, or `refused` for a reservation).
pub const MESH_FORWARDS: &str = "sandmesh_mesh_forwards_total";
/// Members of the cluster as this node sees them, by `state` (`ready`,
/// `draining`, `unhealthy`, `dead`), set when scraped.
pub const MESH_MEMBERS: &str = "sandmesh_mesh_members";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide recorder, installed on first use. `None` if another
/// recorder was installed first (the metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            metrics::describe_gauge!(SANDBOXES, "sandboxes on this node by state");
            metrics::describe_histogram!(
                CREATE_SECONDS,
                metrics::Unit::Seconds,
                "successful creates, request to envd initialised"
            );
            metrics::describe_counter!(CREATES, "creates by result");
            metrics::describe_counter!(LOST, "sandboxes whose runtime process died");
            metrics::describe_counter!(
                TAKEN_OVER,
                "paused sandboxes taken over from the object store (their node died)"
            );
            metrics::describe_counter!(
                TEMPLATE_SNAPSHOTS,
                "template snapshots made ready at start, by source (prepared, fetched, cached)"
            );
            metrics::describe_counter!(TIMED_OUT, "sandboxes killed by their timeout");
            metrics::describe_counter!(
                PROXY_BYTES,
                metrics::Unit::Bytes,
                "body bytes through the sandbox proxy"
            );
            metrics::describe_counter!(PROXY_REQUESTS, "proxied requests by outcome");
            metrics::describe_counter!(
                MESH_FORWARDS,
                "calls and streams sent to other nodes, by kind and outcome"
            );
            metrics::describe_gauge!(MESH_MEMBERS, "cluster members seen by state");
            metrics::describe_counter!(PAUSES, "pauses by result");
            metrics::describe_histogram!(
                PAUSE_SECONDS,
                metrics::Unit::Seconds,
                "successful pauses, request to snapshot saved and published"
            );
            metrics::describe_histogram!(
                RESUME_SECONDS,
                metrics::Unit::Seconds,
                "successful resumes, request to envd initialised (a fetch included)"
            );
            metrics::describe_counter!(
                SNAPSHOT_BYTES_UPLOADED,
                metrics::Unit::Bytes,
                "compressed snapshot bytes sent to the object store"
            );
            metrics::describe_counter!(
                SNAPSHOT_BYTES_DOWNLOADED,
                metrics::Unit::Bytes,
                "compressed snapshot bytes fetched from the object store"
            );
            metrics::describe_counter!(
                SNAPSHOT_CHUNKS_UPLOADED,
                "snapshot chunks uploaded (the store lacked them)"
            );
            metrics::describe_counter!(
                SNAPSHOT_CHUNKS_DEDUPLICATED,
                "snapshot chunks not uploaded: the store had them (dedup ratio: this over \
                 this plus uploaded)"
            );
            metrics::describe_histogram!(
                SNAPSHOT_UPLOAD_SECONDS,
                metrics::Unit::Seconds,
                "snapshot uploads, scan to manifest written"
            );
            metrics::describe_histogram!(
                SNAPSHOT_DOWNLOAD_SECONDS,
                metrics::Unit::Seconds,
                "snapshot downloads, manifest read to files in place"
            );
            metrics::describe_counter!(
                SNAPSHOT_GC_CHUNKS_DELETED,
                "unreferenced snapshot chunks deleted by GC"
            );
            Some(handle)
        })
        .as_ref()
}
