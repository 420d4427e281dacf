//! Store URLs: which object store holds the snapshots.
//!
//! - `file:///abs/dir`: a local directory (created if missing), for one
//!   node and for tests.
//! - `s3://bucket[/prefix][?endpoint=http://127.0.0.1:9000][&region=us-east-1]`:
//!   an S3 bucket, path-style requests (what MinIO, Garage, s3s and moto
//!   serve without DNS tricks), plain HTTP allowed only when the endpoint
//!   says `http://`.
//!
//! Credentials never come from the URL: URLs end up in command lines, logs
//! and error messages. A URL carrying anything that looks like one is
//! refused, and error messages name the offending parameter, never its
//! value. S3 credentials come from [`OpenOptions::credentials`] or from
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (`AWS_SESSION_TOKEN`).
//! Nothing else of the AWS environment is read: object_store's
//! `from_env` would, without keys, fall back to the cloud instance
//! metadata endpoint, and a node configured by mistake should fail at once
//! with a clear message instead of probing the network.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, RetryConfig};

use super::{ObjectsError, SnapshotStore};

/// The access key variable read when no credentials are passed.
pub const ACCESS_KEY_ENV: &str = "AWS_ACCESS_KEY_ID";
/// The secret key variable read when no credentials are passed.
pub const SECRET_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";
/// The session token variable, optional.
pub const SESSION_TOKEN_ENV: &str = "AWS_SESSION_TOKEN";

/// A parsed store URL. Its `Display` form is safe to log: it never holds a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Local {
        dir: PathBuf,
    },
    S3 {
        bucket: String,
        /// Key prefix below the bucket, without leading or trailing `/`.
        prefix: Option<String>,
        /// `http(s)://host[:port]`; `None` for AWS itself.
        endpoint: Option<String>,
        region: String,
    },
}

/// Why a store URL is refused. No variant carries the URL or a parameter's
/// value, since either could hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "the store URL is not a URL ({0}); expected file:///abs/dir or s3://bucket?endpoint=..."
    )]
    Syntax(url::ParseError),
    #[error(
        "store URL scheme {0:?} is not supported; expected file:///abs/dir or s3://bucket?endpoint=..."
    )]
    Scheme(String),
    #[error("a file store URL must be file:/// followed by an absolute directory")]
    FilePath,
    #[error("a file store URL takes no host, query or fragment")]
    FileExtra,
    #[error("the s3 store URL names no bucket: s3://BUCKET[/PREFIX]?endpoint=...")]
    NoBucket,
    #[error("s3 bucket name {0:?} is not 3 to 63 of [a-z0-9.-]")]
    Bucket(String),
    #[error("the s3 store URL takes no port or fragment; put the server in ?endpoint=")]
    S3Extra,
    #[error("the s3 prefix has an empty, '.' or '..' component")]
    Prefix,
    #[error(
        "credentials are not accepted in a store URL (found {0}); set {ACCESS_KEY_ENV} and \
         {SECRET_KEY_ENV} instead"
    )]
    Credentials(&'static str),
    #[error("unknown store URL parameter {0:?}; known: endpoint, region")]
    UnknownParameter(String),
    #[error("store URL parameter {0:?} is given twice")]
    Duplicate(&'static str),
    #[error(
        "endpoint must be an http:// or https:// URL of a host, without path, query or credentials"
    )]
    Endpoint,
    #[error("region must be a non-empty run of [a-z0-9-]")]
    Region,
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        // Checked before parsing: url would read `file:dir` and `file://dir`
        // as some absolute path, and a store in the wrong place is worse
        // than an error.
        if text
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("file:"))
        {
            return parse_file(text);
        }
        let url = url::Url::parse(text).map_err(UrlError::Syntax)?;
        match url.scheme() {
            "s3" => {
                // url resolves `.` and `..` in paths; a prefix that says
                // `..` is a mistake to report, not to resolve.
                let raw = text.split(['?', '#']).next().unwrap_or_default();
                let raw_prefix = raw.splitn(4, '/').nth(3).unwrap_or_default();
                let raw_prefix = raw_prefix.strip_suffix('/').unwrap_or(raw_prefix);
                if !raw_prefix.is_empty()
                    && raw_prefix
                        .split('/')
                        .any(|c| c.is_empty() || c == "." || c == "..")
                {
                    return Err(UrlError::Prefix);
                }
                parse_s3(&url)
            }
            other => Err(UrlError::Scheme(other.to_owned())),
        }
    }
}

fn parse_file(text: &str) -> Result<StoreUrl, UrlError> {
    if !text.starts_with("file:///") {
        return Err(UrlError::FilePath);
    }
    let url = url::Url::parse(text).map_err(UrlError::Syntax)?;
    if url.host_str().is_some_and(|h| !h.is_empty())
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(UrlError::FileExtra);
    }
    let dir = url.to_file_path().map_err(|()| UrlError::FilePath)?;
    if !dir.is_absolute() {
        return Err(UrlError::FilePath);
    }
    Ok(StoreUrl::Local { dir })
}

fn parse_s3(url: &url::Url) -> Result<StoreUrl, UrlError> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials("user info before the bucket"));
    }
    if url.port().is_some() || url.fragment().is_some() {
        return Err(UrlError::S3Extra);
    }
    let bucket = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(UrlError::NoBucket)?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'));
    if !bucket_ok {
        return Err(UrlError::Bucket(bucket.to_owned()));
    }
    let prefix = url.path().trim_matches('/');
    let prefix = if prefix.is_empty() {
        None
    } else {
        if prefix
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(UrlError::Prefix);
        }
        Some(prefix.to_owned())
    };
    let mut endpoint = None;
    let mut region = None;
    for (key, value) in url.query_pairs() {
        let lower = key.to_ascii_lowercase();
        if [
            "key",
            "secret",
            "token",
            "password",
            "credential",
            "signature",
        ]
        .iter()
        .any(|word| lower.contains(word))
        {
            return Err(UrlError::Credentials("a credential parameter"));
        }
        match lower.as_str() {
            "endpoint" => {
                if endpoint.is_some() {
                    return Err(UrlError::Duplicate("endpoint"));
                }
                endpoint = Some(check_endpoint(&value)?);
            }
            "region" => {
                if region.is_some() {
                    return Err(UrlError::Duplicate("region"));
                }
                if value.is_empty()
                    || !value
                        .bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
                {
                    return Err(UrlError::Region);
                }
                region = Some(value.into_owned());
            }
            _ => return Err(UrlError::UnknownParameter(key.into_owned())),
        }
    }
    Ok(StoreUrl::S3 {
        bucket: bucket.to_owned(),
        prefix,
        endpoint,
        region: region.unwrap_or_else(|| "us-east-1".to_owned()),
    })
}

/// `http(s)://host[:port]`, returned without a trailing `/`.
fn check_endpoint(value: &str) -> Result<String, UrlError> {
    let url = url::Url::parse(value).map_err(|_| UrlError::Endpoint)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials("user info in the endpoint"));
    }
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && (url.path().is_empty() || url.path() == "/")
        && url.query().is_none()
        && url.fragment().is_none();
    if !ok {
        return Err(UrlError::Endpoint);
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

impl FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        Self::parse(text)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Local { dir } => {
                // The path as url writes it (percent-encoded where needed).
                match url::Url::from_file_path(dir) {
                    Ok(url) => write!(f, "{url}"),
                    Err(()) => write!(f, "file://{}", dir.display()),
                }
            }
            StoreUrl::S3 {
                bucket,
                prefix,
                endpoint,
                region,
            } => {
                write!(f, "s3://{bucket}")?;
                if let Some(prefix) = prefix {
                    write!(f, "/{prefix}")?;
                }
                write!(f, "?region={region}")?;
                if let Some(endpoint) = endpoint {
                    write!(f, "&endpoint={endpoint}")?;
                }
                Ok(())
            }
        }
    }
}

/// S3 credentials. `Debug` shows the access key id only.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (both, non-empty),
    /// with `AWS_SESSION_TOKEN` if set.
    pub fn from_env() -> Option<Self> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Self {
            access_key_id: var(ACCESS_KEY_ENV)?,
            secret_access_key: var(SECRET_KEY_ENV)?,
            session_token: var(SESSION_TOKEN_ENV),
        })
    }
}

/// How to open a store beyond what its URL says.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// S3 credentials; `None` reads them from the environment.
    pub credentials: Option<Credentials>,
    /// S3 request retries; `None` keeps object_store's default (10 retries
    /// within 3 minutes), which rides out a restarting server but makes an
    /// unreachable one take minutes to report.
    pub retry: Option<RetryConfig>,
}

impl SnapshotStore {
    /// Open the store `url` names. A `file://` directory is created; an S3
    /// bucket must exist (object_store cannot create buckets), which the
    /// first request finds out.
    pub fn open(url: &StoreUrl, options: &OpenOptions) -> Result<Self, ObjectsError> {
        let store: Arc<dyn ObjectStore> = match url {
            StoreUrl::Local { dir } => {
                std::fs::create_dir_all(dir).map_err(|source| ObjectsError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|source| ObjectsError::store("open", dir.display(), source))?
                    // Removing a manifest removes its then empty directory.
                    .with_automatic_cleanup(true)
                    // The manifest is the commit point; its chunks must be on
                    // disk before it, and it before we report success.
                    .with_fsync(true);
                Arc::new(fs)
            }
            StoreUrl::S3 {
                bucket,
                prefix,
                endpoint,
                region,
            } => {
                let credentials = match &options.credentials {
                    Some(c) => c.clone(),
                    None => Credentials::from_env().ok_or(ObjectsError::NoCredentials)?,
                };
                install_crypto_provider();
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_virtual_hosted_style_request(false)
                    .with_access_key_id(credentials.access_key_id)
                    .with_secret_access_key(credentials.secret_access_key);
                if let Some(token) = credentials.session_token {
                    builder = builder.with_token(token);
                }
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(retry) = &options.retry {
                    builder = builder.with_retry(retry.clone());
                }
                let s3 = builder
                    .build()
                    .map_err(|source| ObjectsError::store("open", url, source))?;
                match prefix {
                    Some(prefix) => Arc::new(PrefixStore::new(s3, prefix.as_str())),
                    None => Arc::new(s3),
                }
            }
        };
        Ok(SnapshotStore::new(store, url.to_string()))
    }
}

/// object_store's S3 client is reqwest with rustls built without a crypto
/// provider (the workspace uses ring only, see Cargo.toml), and reqwest
/// panics at client build when the process has none. Install ring's unless
/// the process already chose one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_name_absolute_directories() {
        assert_eq!(
            StoreUrl::parse("file:///var/lib/sandmesh/snap").unwrap(),
            StoreUrl::Local {
                dir: "/var/lib/sandmesh/snap".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///tmp/a%20b").unwrap(),
            StoreUrl::Local {
                dir: "/tmp/a b".into()
            }
        );
        for bad in ["file:relative", "file://relative/dir", "file:/one-slash"] {
            assert_eq!(StoreUrl::parse(bad), Err(UrlError::FilePath), "{bad}");
        }
        assert_eq!(
            StoreUrl::parse("file:///tmp/x?mode=1"),
            Err(UrlError::FileExtra)
        );
        let url = StoreUrl::parse("file:///tmp/a%20b").unwrap();
        assert_eq!(url.to_string(), "file:///tmp/a%20b");
        assert_eq!(StoreUrl::parse(&url.to_string()).unwrap(), url);
    }

    #[test]
    fn s3_urls_give_bucket_prefix_endpoint_and_region() {
        assert_eq!(
            StoreUrl::parse("s3://snapshots?endpoint=http://127.0.0.1:9000&region=eu-west-1")
                .unwrap(),
            StoreUrl::S3 {
                bucket: "snapshots".into(),
                prefix: None,
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: "eu-west-1".into(),
            }
        );
        let url = StoreUrl::parse("s3://my.bucket/cluster/a/").unwrap();
        assert_eq!(
            url,
            StoreUrl::S3 {
                bucket: "my.bucket".into(),
                prefix: Some("cluster/a".into()),
                endpoint: None,
                region: "us-east-1".into(),
            }
        );
        let url = StoreUrl::parse("s3://b0b/p?endpoint=https://s3.example.test/&region=us-east-1")
            .unwrap();
        assert_eq!(
            url.to_string(),
            "s3://b0b/p?region=us-east-1&endpoint=https://s3.example.test"
        );
        assert_eq!(StoreUrl::parse(&url.to_string()).unwrap(), url);
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason_and_without_echoing_secrets() {
        let cases: &[(&str, UrlError)] = &[
            (
                "",
                UrlError::Syntax(url::ParseError::RelativeUrlWithoutBase),
            ),
            ("gs://bucket", UrlError::Scheme("gs".into())),
            ("s3://", UrlError::NoBucket),
            ("s3://Upper", UrlError::Bucket("Upper".into())),
            ("s3://ab", UrlError::Bucket("ab".into())),
            ("s3://bucket:9000", UrlError::S3Extra),
            ("s3://bucket/a//b", UrlError::Prefix),
            ("s3://bucket/../b", UrlError::Prefix),
            ("s3://bucket/a/./b", UrlError::Prefix),
            ("s3://bucket?endpoint=ftp://x", UrlError::Endpoint),
            ("s3://bucket?endpoint=http://x/path", UrlError::Endpoint),
            (
                "s3://bucket?endpoint=http://a&endpoint=http://b",
                UrlError::Duplicate("endpoint"),
            ),
            ("s3://bucket?region=", UrlError::Region),
            (
                "s3://bucket?colour=red",
                UrlError::UnknownParameter("colour".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(StoreUrl::parse(text).as_ref(), Err(want), "{text}");
        }
        for text in [
            "s3://AKIAXXXX:hunter2secret@bucket",
            "s3://bucket?secret_access_key=hunter2secret",
            "s3://bucket?access_key_id=AKIAXXXX",
            "s3://bucket?X-Amz-Signature=hunter2secret",
            "s3://bucket?endpoint=http://AKIAXXXX:hunter2secret@127.0.0.1:9000",
        ] {
            let err = StoreUrl::parse(text).unwrap_err();
            assert!(matches!(err, UrlError::Credentials(_)), "{text}: {err:?}");
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains("hunter2secret") && !shown.contains("AKIAXXXX"),
                "{shown}"
            );
            assert!(shown.contains(ACCESS_KEY_ENV), "{shown}");
        }
    }

    #[test]
    fn credentials_debug_hides_the_secret() {
        let c = Credentials {
            access_key_id: "AKIA1".into(),
            secret_access_key: "hunter2secret".into(),
            session_token: Some("tok3n".into()),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKIA1"));
        assert!(
            !shown.contains("hunter2secret") && !shown.contains("tok3n"),
            "{shown}"
        );
    }

    #[test]
    fn opening_a_file_store_creates_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/store");
        let url = StoreUrl::Local { dir: dir.clone() };
        SnapshotStore::open(&url, &OpenOptions::default()).unwrap();
        assert!(dir.is_dir());
    }

    #[test]
    fn an_s3_store_without_credentials_is_refused_before_any_request() {
        let url = StoreUrl::parse("s3://bucket?endpoint=http://127.0.0.1:9").unwrap();
        let options = OpenOptions::default();
        // Only meaningful where the environment holds no keys (CI, here).
        if Credentials::from_env().is_none() {
            let err = SnapshotStore::open(&url, &options).unwrap_err();
            assert!(matches!(err, ObjectsError::NoCredentials), "{err}");
            assert!(err.to_string().contains(ACCESS_KEY_ENV));
        }
        let with_keys = OpenOptions {
            credentials: Some(Credentials {
                access_key_id: "a".into(),
                secret_access_key: "b".into(),
                session_token: None,
            }),
            retry: None,
        };
        SnapshotStore::open(&url, &with_keys).unwrap();
    }
}
