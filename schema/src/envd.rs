//! Constants of the envd agent that both the host and the guest rely on.

/// TCP and vsock port envd listens on inside every sandbox, as in E2B.
pub const ENVD_PORT: u16 = 49983;

/// The envd protocol version we report to the E2B SDK.
///
/// The SDK gates features on this string (`e2b/envd/versions.py`); it must
/// only name a version whose features envd really implements.
pub const ENVD_VERSION: &str = "0.1.0";
