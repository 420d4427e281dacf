//! Placeholder until the certificate module lands.
pub struct ClusterFiles {
    pub node_id: String,
    pub identity: mesh::tls::NodeIdentity,
    pub root: mesh::tls::TrustRoot,
    pub cluster_id: String,
}
impl Clone for ClusterFiles {
    fn clone(&self) -> Self {
        Self { node_id: self.node_id.clone(), identity: self.identity.clone(), root: self.root.clone(), cluster_id: self.cluster_id.clone() }
    }
}

pub fn cluster_dir(d: &std::path::Path) -> std::path::PathBuf { d.join("cluster") }
pub fn init(_: &std::path::Path, _: &str) -> anyhow::Result<()> { anyhow::bail!("todo") }
pub fn join_token(_: &std::path::Path, _: &str) -> anyhow::Result<String> { anyhow::bail!("todo") }
pub fn join(_: &std::path::Path, _: &str) -> anyhow::Result<String> { anyhow::bail!("todo") }
pub fn load(_: &std::path::Path) -> anyhow::Result<Option<ClusterFiles>> { anyhow::bail!("todo") }
