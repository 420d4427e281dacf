//! A node's cluster files, and the join tokens that carry them to a new node.
//!
//! The cluster directory of a node is `<data_dir>/cluster` and holds:
//! - `ca.pem`: the cluster CA certificate (always; its presence is what
//!   says "this node belongs to a cluster", so it is written last);
//! - `ca-key.pem` (0600): the CA key, only on the node where
//!   `sandmesh cluster init` ran, the one node that can admit others;
//! - `node.pem`, `node-key.pem` (0600): this node's certificate, signed by
//!   the CA, whose only name is the node id;
//! - `node-id`: the node id, one line.
//!
//! A join token (`smjt1.` + base64url of a small JSON object) carries a new
//! node's whole identity, private key included, from the init node to the
//! new one: one string to paste, no CSR round trip. It is therefore a
//! secret, as good as the node it admits.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mesh::tls::{
    self, CA_CERT_FILE, CA_KEY_FILE, ClusterCa, NODE_CERT_FILE, NODE_KEY_FILE, NodeIdentity,
    TlsError, TrustRoot,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file holding this node's id, one line.
pub const NODE_ID_FILE: &str = "node-id";

/// Prefix of a join token: names the format and its version, so a token of
/// a later format is refused by name rather than as garbage.
pub const TOKEN_PREFIX: &str = "smjt1.";

/// What goes wrong with the cluster files or a join token. Every message
/// says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "{path} already exists: this node already belongs to a cluster; to start a new \
         cluster remove the directory {dir} first (this node then leaves its cluster)"
    )]
    AlreadyInitialised { path: PathBuf, dir: PathBuf },
    #[error(
        "this node cannot sign: run join-token on the node where `sandmesh cluster init` \
         ran ({path} is missing here)"
    )]
    CannotSign { path: PathBuf },
    #[error(
        "{node_id:?} is this node's own id: a join token must be for a new node, with an id \
         no other node has"
    )]
    OwnId { node_id: String },
    #[error(
        "invalid join token: {reason}; ask for a new one with `sandmesh cluster join-token \
         <node-id>` on the node where `sandmesh cluster init` ran"
    )]
    BadToken { reason: String },
    #[error(
        "{dir} already holds the identity of another cluster (its ca.pem is not the token's \
         CA); to move this node, remove ca.pem, ca-key.pem, node.pem, node-key.pem and \
         node-id from {dir}, then join again"
    )]
    OtherCluster { dir: PathBuf },
    #[error(
        "{dir} already holds the identity of node {existing:?}, the token is for {token:?}; \
         to rename this node, remove node.pem, node-key.pem and node-id from {dir}, then \
         join again"
    )]
    OtherNode {
        dir: PathBuf,
        existing: String,
        token: String,
    },
    #[error(
        "{path} is missing while {dir}/ca.pem exists: the cluster files are incomplete; \
         restore the file, or remove the directory {dir} and join the cluster again"
    )]
    Missing { path: PathBuf, dir: PathBuf },
    #[error("{path}: {reason}; fix or remove the file, or remove {dir} and join again")]
    BadNodeIdFile {
        path: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    #[error(
        "{dir}: node.pem is not valid under ca.pem ({source}); remove node.pem, node-key.pem \
         and node-id and join again with a new token"
    )]
    NotUnderCa {
        dir: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The contents of a join token.
#[derive(Serialize, Deserialize)]
struct Token {
    ca: String,
    node_id: String,
    cert: String,
    key: String,
}

/// A node's loaded cluster files.
#[derive(Clone)]
pub struct ClusterFiles {
    pub node_id: String,
    pub identity: NodeIdentity,
    pub root: TrustRoot,
    /// `sandmesh-` + 16 hex digits of the CA certificate's SHA-256: the
    /// gossip cluster id, so members of different clusters never mix even
    /// if they can reach each other.
    pub cluster_id: String,
}

/// Names only: the identity holds a private key, which must not end up
/// in a log.
impl std::fmt::Debug for ClusterFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFiles")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

/// Where a node keeps its cluster files: `<data_dir>/cluster`.
pub fn cluster_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster")
}

/// Start a new cluster here: a new CA (key kept in this directory, so this
/// node is the one that issues join tokens) and this node's identity.
/// Refuses if `ca.pem` exists: overwriting it would silently cut this node
/// off from the cluster it belongs to.
pub fn init(cluster_dir: &Path, node_id: &str) -> Result<(), CertError> {
    schema::mesh::validate_node_id(node_id).map_err(TlsError::from)?;
    refuse_if_initialised(cluster_dir)?;
    create_dir(cluster_dir)?;
    let ca = ClusterCa::generate()?;
    let identity = ca.issue(node_id)?;
    tls::write_file(
        &cluster_dir.join(CA_KEY_FILE),
        ca.key_pem().as_bytes(),
        0o600,
    )?;
    // ca.pem last: until it exists the directory counts as empty, so a
    // crash part way leaves a node that can simply run init again.
    write_identity(cluster_dir, &identity, ca.trust_root().cert_pem())
}

fn refuse_if_initialised(cluster_dir: &Path) -> Result<(), CertError> {
    let ca_path = cluster_dir.join(CA_CERT_FILE);
    if exists(&ca_path)? {
        return Err(CertError::AlreadyInitialised {
            path: ca_path,
            dir: cluster_dir.to_owned(),
        });
    }
    Ok(())
}

/// Issue a certificate for a new node `node_id` and pack it, with its
/// private key and the CA certificate, into a one-line token for
/// [`join`]. Only the init node (the one with `ca-key.pem`) can do this.
///
/// The token contains the new node's private key: whoever holds it can
/// act as that node in the cluster. Pass it over a trusted channel and do
/// not keep it once used.
pub fn join_token(cluster_dir: &Path, node_id: &str) -> Result<String, CertError> {
    let key_path = cluster_dir.join(CA_KEY_FILE);
    if !exists(&key_path)? {
        return Err(CertError::CannotSign { path: key_path });
    }
    schema::mesh::validate_node_id(node_id).map_err(TlsError::from)?;
    // Two nodes with one id would each be refused as the other.
    if read_node_id(cluster_dir).ok().as_deref() == Some(node_id) {
        return Err(CertError::OwnId {
            node_id: node_id.to_owned(),
        });
    }
    let ca = ClusterCa::load(cluster_dir)?;
    let identity = ca.issue(node_id)?;
    let token = Token {
        ca: ca.trust_root().cert_pem().to_owned(),
        node_id: node_id.to_owned(),
        cert: identity.cert_pem().to_owned(),
        key: identity.key_pem().to_owned(),
    };
    let json = serde_json::to_vec(&token).map_err(|e| CertError::BadToken {
        reason: e.to_string(),
    })?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json)))
}

/// Decode and check a join token: every check a peer's handshake would
/// make, made now, so a bad token fails here with a clear message instead
/// of as refused connections later.
fn decode_token(token: &str) -> Result<(TrustRoot, NodeIdentity), CertError> {
    let bad = |reason: String| CertError::BadToken { reason };
    let body = token
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| bad(format!("it does not start with {TOKEN_PREFIX:?}")))?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|e| bad(format!("not base64url ({e}); was it copied whole?")))?;
    let token: Token =
        serde_json::from_slice(&json).map_err(|e| bad(format!("not a token's JSON ({e})")))?;
    schema::mesh::validate_node_id(&token.node_id).map_err(|e| bad(e.to_string()))?;
    let root = TrustRoot::from_pem(&token.ca).map_err(|e| bad(e.to_string()))?;
    let identity = NodeIdentity::from_pem(&token.node_id, &token.cert, &token.key)
        .map_err(|e| bad(e.to_string()))?;
    root.verify(&identity).map_err(|e| bad(e.to_string()))?;
    Ok((root, identity))
}

/// Install the identity of a join token here; returns the node id.
/// Refuses if the directory already holds an identity of another cluster
/// or another node (that would silently move or rename this node); the
/// same token twice is fine, so a join that failed part way can be rerun.
pub fn join(cluster_dir: &Path, token: &str) -> Result<String, CertError> {
    let (root, identity) = decode_token(token)?;
    let node_id = identity.node_id().to_owned();
    let ca_path = cluster_dir.join(CA_CERT_FILE);
    if exists(&ca_path)? {
        let current = TrustRoot::load(&ca_path)?;
        if current.cert_der() != root.cert_der() {
            return Err(CertError::OtherCluster {
                dir: cluster_dir.to_owned(),
            });
        }
        if exists(&cluster_dir.join(NODE_ID_FILE))? {
            let existing = read_node_id(cluster_dir)?;
            if existing != node_id {
                return Err(CertError::OtherNode {
                    dir: cluster_dir.to_owned(),
                    existing,
                    token: node_id,
                });
            }
        }
    }
    create_dir(cluster_dir)?;
    write_identity(cluster_dir, &identity, root.cert_pem())?;
    Ok(node_id)
}

/// The node's cluster files, checked as the transport will use them:
/// `Ok(None)` if there is no `ca.pem` (the node is in no cluster yet), an
/// error naming the file if the set is incomplete or inconsistent.
pub fn load(cluster_dir: &Path) -> Result<Option<ClusterFiles>, CertError> {
    let ca_path = cluster_dir.join(CA_CERT_FILE);
    if !exists(&ca_path)? {
        return Ok(None);
    }
    for file in [NODE_ID_FILE, NODE_CERT_FILE, NODE_KEY_FILE] {
        let path = cluster_dir.join(file);
        if !exists(&path)? {
            return Err(CertError::Missing {
                path,
                dir: cluster_dir.to_owned(),
            });
        }
    }
    let node_id = read_node_id(cluster_dir)?;
    let root = TrustRoot::load(&ca_path)?;
    let identity = NodeIdentity::load(cluster_dir, &node_id)?;
    root.verify(&identity)
        .map_err(|source| CertError::NotUnderCa {
            dir: cluster_dir.to_owned(),
            source,
        })?;
    let cluster_id = cluster_id(&root);
    Ok(Some(ClusterFiles {
        node_id,
        identity,
        root,
        cluster_id,
    }))
}

/// `sandmesh-` + the first 16 hex digits of the SHA-256 of the CA
/// certificate (DER): equal exactly for nodes of the same cluster.
pub fn cluster_id(root: &TrustRoot) -> String {
    let digest = Sha256::digest(root.cert_der().as_ref());
    format!("sandmesh-{}", &hex::encode(digest)[..16])
}

/// Node files first and `ca.pem` last, each atomically: `ca.pem` is what
/// marks the directory as holding a cluster, so it must not appear before
/// the rest.
fn write_identity(dir: &Path, identity: &NodeIdentity, ca_pem: &str) -> Result<(), CertError> {
    tls::write_file(
        &dir.join(NODE_KEY_FILE),
        identity.key_pem().as_bytes(),
        0o600,
    )?;
    tls::write_file(
        &dir.join(NODE_CERT_FILE),
        identity.cert_pem().as_bytes(),
        0o644,
    )?;
    tls::write_file(
        &dir.join(NODE_ID_FILE),
        format!("{}\n", identity.node_id()).as_bytes(),
        0o644,
    )?;
    tls::write_file(&dir.join(CA_CERT_FILE), ca_pem.as_bytes(), 0o644)?;
    Ok(())
}

fn read_node_id(dir: &Path) -> Result<String, CertError> {
    let path = dir.join(NODE_ID_FILE);
    let text = fs::read_to_string(&path).map_err(|source| CertError::Io {
        path: path.clone(),
        source,
    })?;
    let id = text.trim();
    schema::mesh::validate_node_id(id).map_err(|e| CertError::BadNodeIdFile {
        path: path.clone(),
        dir: dir.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(id.to_owned())
}

/// The directory is private to the node's user: it holds keys.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Whether `path` exists; an error (permissions, say) is reported rather
/// than read as "absent", which could make init overwrite a cluster.
fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh::{Handler, IncomingStream, Peer, Request, Response, Transport, TransportConfig};
    use schema::mesh::ErrorKind;

    use super::*;

    fn encode(token: &Token) -> String {
        format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(token).unwrap())
        )
    }

    fn decode(token: &str) -> Token {
        let body = token.strip_prefix(TOKEN_PREFIX).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
    }

    #[test]
    fn init_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cdir = cluster_dir(dir.path());
        init(&cdir, "node-a").unwrap();
        let files = load(&cdir).unwrap().unwrap();
        assert_eq!(files.node_id, "node-a");
        assert_eq!(files.identity.node_id(), "node-a");
        assert!(files.cluster_id.starts_with("sandmesh-"));
        assert_eq!(files.cluster_id.len(), "sandmesh-".len() + 16);
        for key in [CA_KEY_FILE, NODE_KEY_FILE] {
            let mode = fs::metadata(cdir.join(key)).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600
            );
        }
        let err = init(&cdir, "node-a").unwrap_err();
        assert!(matches!(err, CertError::AlreadyInitialised { .. }), "{err}");
    }

    #[test]
    fn join_token_admits_a_second_node() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), "node-a").unwrap();
        let token = join_token(a.path(), "node-b").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(!token.contains('\n'));
        assert_eq!(join(b.path(), &token).unwrap(), "node-b");
        // Idempotent.
        assert_eq!(join(b.path(), &token).unwrap(), "node-b");
        let fa = load(a.path()).unwrap().unwrap();
        let fb = load(b.path()).unwrap().unwrap();
        assert_eq!(fa.cluster_id, fb.cluster_id);
        assert_eq!(fb.node_id, "node-b");
        assert_eq!(fb.identity.node_id(), "node-b");
        assert!(!b.path().join(CA_KEY_FILE).exists());
        // The joined node cannot sign in turn.
        let err = join_token(b.path(), "node-c").unwrap_err();
        assert!(matches!(err, CertError::CannotSign { .. }), "{err}");
        assert!(err.to_string().contains("this node cannot sign"));
        // A token for the init node's own id is refused.
        let err = join_token(a.path(), "node-a").unwrap_err();
        assert!(matches!(err, CertError::OwnId { .. }), "{err}");
        // Another node id into b's directory is refused.
        let other = join_token(a.path(), "node-c").unwrap();
        let err = join(b.path(), &other).unwrap_err();
        assert!(matches!(err, CertError::OtherNode { .. }), "{err}");
    }

    #[test]
    fn a_token_of_another_cluster_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let x = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), "node-a").unwrap();
        init(x.path(), "node-x").unwrap();
        join(b.path(), &join_token(a.path(), "node-b").unwrap()).unwrap();
        let foreign = join_token(x.path(), "node-b").unwrap();
        let err = join(b.path(), &foreign).unwrap_err();
        assert!(matches!(err, CertError::OtherCluster { .. }), "{err}");
        assert!(err.to_string().contains("node-key.pem"));
        // b is untouched.
        let fb = load(b.path()).unwrap().unwrap();
        assert_eq!(fb.cluster_id, load(a.path()).unwrap().unwrap().cluster_id);
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let a = tempfile::tempdir().unwrap();
        let x = tempfile::tempdir().unwrap();
        init(a.path(), "node-a").unwrap();
        init(x.path(), "node-x").unwrap();
        let good = join_token(a.path(), "node-b").unwrap();
        let body = good.strip_prefix(TOKEN_PREFIX).unwrap();

        let mut bad = vec![
            format!("smjt2.{body}"),
            body.to_owned(),
            format!("{TOKEN_PREFIX}not*base64!"),
            format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b"{\"ca\":1}")),
        ];
        // Node X's certificate presented as node Y.
        let mut t = decode(&good);
        t.node_id = "node-y".into();
        bad.push(encode(&t));
        // An invalid node id.
        let mut t = decode(&good);
        t.node_id = "Not A Label".into();
        bad.push(encode(&t));
        // A certificate of another CA with this token's CA.
        let mut t = decode(&good);
        let foreign = decode(&join_token(x.path(), "node-b").unwrap());
        t.cert = foreign.cert.clone();
        t.key = foreign.key.clone();
        bad.push(encode(&t));
        // The other CA's certificate with this CA's node certificate.
        let mut t = decode(&good);
        t.ca = foreign.ca.clone();
        bad.push(encode(&t));
        // A key that is not the certificate's.
        let mut t = decode(&good);
        t.key = foreign.key;
        bad.push(encode(&t));

        for token in bad {
            let dir = tempfile::tempdir().unwrap();
            let err = join(dir.path(), &token).unwrap_err();
            assert!(matches!(err, CertError::BadToken { .. }), "{token}: {err}");
            assert!(err.to_string().contains("join-token"), "{err}");
            assert!(load(dir.path()).unwrap().is_none());
        }
        // The untampered one still works.
        let dir = tempfile::tempdir().unwrap();
        join(dir.path(), &good).unwrap();
    }

    #[test]
    fn empty_and_partial_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        assert!(load(&dir.path().join("absent")).unwrap().is_none());
        init(dir.path(), "node-a").unwrap();
        fs::remove_file(dir.path().join(NODE_CERT_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err();
        let CertError::Missing { path, .. } = &err else {
            panic!("{err}");
        };
        assert!(path.ends_with(NODE_CERT_FILE));
        assert!(err.to_string().contains("node.pem"), "{err}");
        // A node-id that the certificate does not name.
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "node-a").unwrap();
        fs::write(dir.path().join(NODE_ID_FILE), "node-b\n").unwrap();
        assert!(load(dir.path()).is_err());
        fs::write(dir.path().join(NODE_ID_FILE), "Not A Label\n").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::BadNodeIdFile { .. }), "{err}");
    }

    struct Refuse;

    impl Handler for Refuse {
        async fn request(&self, _peer: Peer, _request: Request) -> Response {
            Response::Error {
                kind: ErrorKind::BadRequest,
                message: "test".into(),
            }
        }
        async fn stream(&self, _peer: Peer, stream: IncomingStream) {
            stream.reject(ErrorKind::NotFound, "test").await
        }
    }

    fn bind(files: &ClusterFiles) -> Transport {
        Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &files.identity,
            &files.root,
            TransportConfig::default(),
            Arc::new(Refuse),
        )
        .unwrap()
    }

    /// Identities from init and from a join token complete a mutual-TLS
    /// handshake with each other, and not with a node of another cluster.
    #[tokio::test]
    async fn joined_nodes_handshake() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let x = tempfile::tempdir().unwrap();
        init(a.path(), "node-a").unwrap();
        join(b.path(), &join_token(a.path(), "node-b").unwrap()).unwrap();
        init(x.path(), "node-x").unwrap();
        let ta = bind(&load(a.path()).unwrap().unwrap());
        let tb = bind(&load(b.path()).unwrap().unwrap());
        let tx = bind(&load(x.path()).unwrap().unwrap());
        let ping = Request::Ping { sent_unix_ms: 1 };
        let b_addr = tb.local_addr().unwrap();
        let reply = ta.call(b_addr, "node-b", &ping).await.unwrap();
        assert!(matches!(reply, Response::Error { .. }), "{reply:?}");
        let reply = tb
            .call(ta.local_addr().unwrap(), "node-a", &ping)
            .await
            .unwrap();
        assert!(matches!(reply, Response::Error { .. }), "{reply:?}");
        assert!(tx.call(b_addr, "node-b", &ping).await.is_err());
        ta.close().await;
        tb.close().await;
        tx.close().await;
    }
}
