//! The cluster's certificate authority and the mutual-TLS configurations of
//! the QUIC transport.
//!
//! `sandmesh cluster init` makes one self-signed CA ([`ClusterCa`]); every
//! node gets a certificate signed by it whose only name is the node id
//! ([`NodeIdentity`]). Both ends of every QUIC connection present their
//! certificate and check the other's against the CA ([`TrustRoot`]): a
//! client also checks that the server's certificate names the node it meant
//! to dial. A peer without a certificate of this CA cannot complete a
//! handshake, so it can neither join the transport nor send a frame.
//!
//! The crypto provider is rustls' ring provider, passed explicitly: the
//! process-default provider is ambiguous once another crate in the binary
//! enables aws-lc-rs (see crates-notes), and a library must not install one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;

/// ALPN of the mesh. The protocol version is not in it but in every frame
/// header, so that a peer of another version gets a clear "version
/// mismatch" rather than a failed handshake.
pub const ALPN: &[u8] = b"sandmesh-mesh";

/// Subject of every cluster CA. It is fixed so a CA can be reloaded from
/// its key alone (rcgen cannot parse a certificate without x509-parser);
/// CAs of different clusters differ by key, and chains are checked by
/// signature, so the shared name does not let one cluster's certificates
/// pass in another.
const CA_COMMON_NAME: &str = "sandmesh cluster CA";

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    NodeId(#[from] schema::mesh::InvalidNodeId),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not PEM of the expected kind: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: private key readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: certificate is not valid for node id {node_id:?}")]
    WrongNode { path: PathBuf, node_id: String },
    /// PEM given as text (a join token, not a file) that does not parse.
    #[error("{what}: not PEM of the expected kind: {reason}")]
    PemText { what: &'static str, reason: String },
    #[error("{what}: certificate is not valid for node id {node_id:?}")]
    WrongNodeText { what: &'static str, node_id: String },
    /// The private key is not the one the certificate was issued for.
    #[error("{what}: private key does not match the certificate: {reason}")]
    KeyMismatch { what: String, reason: String },
    /// The node certificate was not signed by this CA (or is expired, or
    /// not valid for client authentication).
    #[error("certificate of node {node_id:?} is not valid under this cluster CA: {reason}")]
    NotUnderCa { node_id: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "sandmesh");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The cluster CA: signs node certificates. Its key belongs on the
/// operator's machine (or wherever `cluster init` ran), not on every node;
/// nodes need only its certificate ([`TrustRoot`]).
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn trust_root(&self) -> TrustRoot {
        TrustRoot {
            cert: self.cert.clone(),
            cert_pem: self.cert_pem.clone(),
        }
    }

    /// The CA's private key, PEM. Secret: whoever holds it can admit any
    /// node to the cluster.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `node_id`, valid as both TLS server and client
    /// (every node is both), naming the node id as its DNS name.
    pub fn issue(&self, node_id: &str) -> Result<NodeIdentity, TlsError> {
        schema::mesh::validate_node_id(node_id)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_id.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_id.to_owned());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeIdentity {
            node_id: node_id.to_owned(),
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Write `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    /// Read a CA written by [`ClusterCa::save`].
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = read_cert(&cert_path)?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = read_key_file(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            cert,
            cert_pem,
            key,
        })
    }
}

/// The CA certificate every node trusts.
#[derive(Clone)]
pub struct TrustRoot {
    cert: CertificateDer<'static>,
    /// Kept as read, so it can be handed on (in a join token) unchanged.
    cert_pem: String,
}

impl TrustRoot {
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let cert = read_cert(path)?;
        let cert_pem = fs::read_to_string(path).map_err(io_err(path))?;
        Ok(Self { cert, cert_pem })
    }

    /// A root from PEM text (as carried in a join token rather than a
    /// file). The first certificate in it is the CA.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let cert =
            CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::PemText {
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        Ok(Self {
            cert,
            cert_pem: pem.to_owned(),
        })
    }

    /// The CA certificate, DER: what identifies the cluster (two roots are
    /// the same cluster exactly when these bytes are equal).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate, PEM, as it was read or generated.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Check that `identity`'s certificate chains to this CA and is valid
    /// now for client authentication, exactly as a peer's TLS handshake
    /// will check it; so a bad certificate is refused when it is installed
    /// rather than at the first connection.
    pub fn verify(&self, identity: &NodeIdentity) -> Result<(), TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.store()?, provider()).build()?;
        let Some((leaf, intermediates)) = identity.chain.split_first() else {
            return Err(TlsError::NotUnderCa {
                node_id: identity.node_id.clone(),
                reason: "no certificate".into(),
            });
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| TlsError::NotUnderCa {
                node_id: identity.node_id.clone(),
                reason: e.to_string(),
            })
    }

    fn store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone())?;
        Ok(Arc::new(roots))
    }
}

/// A node's certificate (signed by the cluster CA) and private key.
pub struct NodeIdentity {
    node_id: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            node_id: self.node_id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl NodeIdentity {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The certificate chain, PEM, leaf first.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// An identity from PEM text (as carried in a join token rather than
    /// files). Checks what [`NodeIdentity::load`] checks (the certificate
    /// names `node_id`) and that the key is the certificate's; whether the
    /// certificate chains to a CA is [`TrustRoot::verify`]'s business.
    pub fn from_pem(node_id: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        schema::mesh::validate_node_id(node_id)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::PemText {
                what: "node certificate",
                reason: e.to_string(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::PemText {
                what: "node certificate",
                reason: "no certificate".into(),
            });
        };
        if !cert_names(leaf, node_id) {
            return Err(TlsError::WrongNodeText {
                what: "node certificate",
                node_id: node_id.to_owned(),
            });
        }
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            TlsError::PemText {
                what: "node private key",
                reason: e.to_string(),
            }
        })?;
        let identity = Self {
            node_id: node_id.to_owned(),
            chain,
            key,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        };
        identity.check_key("node private key")?;
        Ok(identity)
    }

    /// Whether the private key belongs to the leaf certificate: a
    /// mismatched pair would fail every handshake with an obscure error.
    fn check_key(&self, what: &str) -> Result<(), TlsError> {
        let mismatch = |reason: String| TlsError::KeyMismatch {
            what: what.to_owned(),
            reason,
        };
        let signer = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(self.key.clone_key()))
            .map_err(|e| mismatch(e.to_string()))?;
        CertifiedKey::new(self.chain.clone(), signer)
            .keys_match()
            .map_err(|e| mismatch(e.to_string()))
    }

    /// Write `node.pem` and `node-key.pem` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(NODE_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(NODE_KEY_FILE), self.key_pem.as_bytes(), 0o600)
    }

    /// Read an identity written by [`NodeIdentity::save`], checking that
    /// the certificate names `node_id` (a mismatch would make every peer
    /// refuse this node with a less helpful error).
    pub fn load(dir: &Path, node_id: &str) -> Result<Self, TlsError> {
        schema::mesh::validate_node_id(node_id)?;
        let cert_path = dir.join(NODE_CERT_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Pem {
                path: cert_path,
                reason: "no certificate".into(),
            });
        };
        if !cert_names(leaf, node_id) {
            return Err(TlsError::WrongNode {
                path: cert_path,
                node_id: node_id.to_owned(),
            });
        }
        let key_path = dir.join(NODE_KEY_FILE);
        let key_pem = read_key_file(&key_path)?;
        let key =
            PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        let identity = Self {
            node_id: node_id.to_owned(),
            chain,
            key,
            cert_pem,
            key_pem,
        };
        identity.check_key(&key_path.display().to_string())?;
        Ok(identity)
    }
}

/// Whether a certificate is valid for DNS name `node_id` (its chain is
/// checked elsewhere, by the TLS handshake).
pub fn cert_names(cert: &CertificateDer<'_>, node_id: &str) -> bool {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_id) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// TLS 1.3 only, ring only, ALPN set: what both ends of the mesh speak.
pub(crate) fn server_config(
    identity: &NodeIdentity,
    root: &TrustRoot,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root.store()?, provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            identity.chain.clone(),
            PrivateKeyDer::Pkcs8(identity.key.clone_key()),
        )?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The client side: verifies the server against the CA and the node id it
/// dialled; presents `identity` (None only in tests of refusal).
pub(crate) fn client_config(
    identity: Option<&NodeIdentity>,
    root: &TrustRoot,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root.store()?);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), PrivateKeyDer::Pkcs8(id.key.clone_key()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A key file is refused if others may read it, as ssh does: a readable
/// cluster key is a leaked cluster.
fn read_key_file(path: &Path) -> Result<String, TlsError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

/// Write through a temporary and rename, so a crash leaves the old file or
/// the new one; the mode is set at creation so a key is never readable by
/// others, not even briefly. Public so the node's cluster files (node id,
/// certificates from a join token) are written the same way.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_identity_survive_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = ClusterCa::load(dir.path()).unwrap();
        let node = ca.issue("node-a").unwrap();
        node.save(dir.path()).unwrap();
        let node = NodeIdentity::load(dir.path(), "node-a").unwrap();
        assert!(cert_names(&node.chain[0], "node-a"));
        assert!(!cert_names(&node.chain[0], "node-b"));
        assert!(matches!(
            NodeIdentity::load(dir.path(), "node-b"),
            Err(TlsError::WrongNode { .. })
        ));
        // A reloaded CA still signs certificates the original root accepts.
        let root = TrustRoot::load(&dir.path().join(CA_CERT_FILE)).unwrap();
        server_config(&node, &root).unwrap();
        client_config(Some(&node), &root).unwrap();
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::generate().unwrap().save(dir.path()).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ClusterCa::load(dir.path()),
            Err(TlsError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn pem_text_round_trips_and_chains_are_checked() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let node = ca.issue("node-a").unwrap();
        let root = TrustRoot::from_pem(ca.trust_root().cert_pem()).unwrap();
        assert_eq!(root.cert_der(), ca.trust_root().cert_der());
        let again = NodeIdentity::from_pem("node-a", node.cert_pem(), node.key_pem()).unwrap();
        root.verify(&again).unwrap();
        assert!(matches!(
            other.trust_root().verify(&again),
            Err(TlsError::NotUnderCa { .. })
        ));
        assert!(matches!(
            NodeIdentity::from_pem("node-b", node.cert_pem(), node.key_pem()),
            Err(TlsError::WrongNodeText { .. })
        ));
        // Another node's key with this node's certificate.
        let stranger = ca.issue("node-a").unwrap();
        assert!(matches!(
            NodeIdentity::from_pem("node-a", node.cert_pem(), stranger.key_pem()),
            Err(TlsError::KeyMismatch { .. })
        ));
        assert!(matches!(
            TrustRoot::from_pem("not pem"),
            Err(TlsError::PemText { .. })
        ));
    }

    #[test]
    fn bad_node_ids_get_no_certificate() {
        let ca = ClusterCa::generate().unwrap();
        assert!(matches!(ca.issue("Not A Label"), Err(TlsError::NodeId(_))));
    }
}
