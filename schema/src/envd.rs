//! envd's wire types and constants, shared by the guest agent and the host.
//!
//! The protobuf messages are generated from `proto/envd/*.proto` (prost, with
//! canonical proto3 JSON from pbjson, which is what the E2B SDK speaks).

/// TCP and vsock port envd listens on inside every sandbox, as in E2B.
pub const ENVD_PORT: u16 = 49983;

/// The envd protocol version we report to the E2B SDK.
///
/// The SDK gates features on this string (`e2b/envd/versions.py`); it must
/// only name a version whose features envd really implements.
pub const ENVD_VERSION: &str = "0.6.4";

/// A directory in every guest where a program that holds state gVisor's
/// checkpoint cannot save (a listening TCP socket in epoll: the sandbox
/// would be lost by the save) puts one file saying why, for as long as it
/// does. The gvisor runtime reads them before a save and refuses the pause
/// with those reasons, the sandbox still running. World-writable and
/// sticky, like `/tmp` (it is under it): a guest can only block its own
/// pause.
pub const UNSAVEABLE_DIR: &str = "/tmp/.sandmesh-unsaveable";

/// E2B's signature of a `/files` URL (`download_url()`/`upload_url()`):
/// `"v1_" + base64_std_nopad(sha256("<path>:<op>:<user>:<token>[:<expiration>]"))`,
/// where `op` is `read` or `write` and `user` is empty when none is given.
/// envd checks it; the node uses it to find which sandbox a URL is for.
pub fn file_signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let mut text = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        text.push(':');
        text.push_str(exp);
    }
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// `process.Process`: start, attach to, signal and feed processes.
#[allow(clippy::large_enum_variant)] // generated oneofs
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `filesystem.Filesystem`: stat, list, move, remove and watch paths.
#[allow(clippy::large_enum_variant)] // generated oneofs
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_signatures_match_e2b_test_vectors() {
        use super::file_signature;
        assert_eq!(
            file_signature("/home/user/a.txt", "read", "", "tok-abc", None),
            "v1_shr9/90N2wWSS66f1qgDcvlx1JHMJsE3NbhNt/Eyd6c"
        );
        assert_eq!(
            file_signature(
                "/home/user/a.txt",
                "write",
                "",
                "tok-abc",
                Some("1795420838")
            ),
            "v1_oANDgUnEKQTTHW3LjZXnOBgMhzBg8GO6vbMmJmnB+Xk"
        );
    }

    use super::process::{ProcessEvent, StartResponse, process_event};

    /// The JSON the E2B SDK reads: camelCase names, bytes as base64,
    /// sint32 as a number, unset optionals omitted.
    #[test]
    fn process_events_use_canonical_proto3_json() {
        let data = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::Data(process_event::DataEvent {
                    output: Some(process_event::data_event::Output::Stdout("hi\n".into())),
                })),
            }),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let end = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::End(process_event::EndEvent {
                    exit_code: -1,
                    exited: true,
                    status: "exit status 255".into(),
                    error: None,
                })),
            }),
        };
        assert_eq!(
            serde_json::to_string(&end).unwrap(),
            r#"{"event":{"end":{"exitCode":-1,"exited":true,"status":"exit status 255"}}}"#
        );
    }

    #[test]
    fn entry_info_sizes_are_strings_and_enums_are_names() {
        use super::filesystem::{EntryInfo, FileType};
        let entry = EntryInfo {
            name: "a".into(),
            r#type: FileType::File as i32,
            size: 12,
            ..Default::default()
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["size"], "12");
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        let back: EntryInfo =
            serde_json::from_str(r#"{"name":"a","type":1,"size":12,"is_symlink":true}"#).unwrap();
        assert_eq!(back.size, 12);
        assert!(back.is_symlink);
    }
}
