//! The templates this node serves, owned by the [`TemplateCache`] actor.
//!
//! A template is a root tree plus the resources every sandbox made from it
//! gets ([`TemplateSpec`], from `sandmesh node --template`). At start the
//! node prepares each one with the runtime (a template snapshot, so that
//! creates are restores); the cache then answers which template a create
//! names, counts spawns, and lists them for `GET /templates`. Later issues
//! add template builds and downloads from object storage here: work that
//! must be serialized per template, which is why this is an actor and not
//! a map behind a lock.

use std::path::PathBuf;
use std::str::FromStr;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::e2b::{self, TemplateBuild, TemplateBuildStatus, TemplateInfo};

use crate::clock::{now_ms, rfc3339_ms};
use crate::runtime::{Limits, Template};
use crate::store::{StoreError, random_bytes};

/// Smallest and largest template resources a node accepts.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=16;
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 128..=32768;

/// One `--template NAME=DIR[,cpu=N][,memory-mb=N][,image=EXT4]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub name: String,
    /// The root tree (gvisor).
    pub rootfs_dir: PathBuf,
    /// The same tree as an ext4 image (microvm).
    pub rootfs_image: Option<PathBuf>,
    pub limits: Limits,
}

impl FromStr for TemplateSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use NAME=ROOT_DIR[,cpu=N][,memory-mb=N][,image=EXT4_IMAGE]";
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("template {s:?}: {usage}"))?;
        let mut parts = rest.split(',');
        let dir = parts.next().unwrap_or("");
        if name.is_empty() || dir.is_empty() {
            return Err(format!("template {s:?}: {usage}"));
        }
        crate::runtime::TemplateId::new(name).map_err(|e| e.to_string())?;
        let mut limits = Limits::default();
        let mut rootfs_image = None;
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("template {name}: {part:?} is not key=value; {usage}"))?;
            match k {
                "cpu" => {
                    limits.vcpus =
                        v.parse()
                            .ok()
                            .filter(|n| VCPUS.contains(n))
                            .ok_or_else(|| {
                                format!("template {name}: cpu={v} must be a number in 1..=16")
                            })?
                }
                "memory-mb" => {
                    limits.memory_mib = v
                        .parse()
                        .ok()
                        .filter(|n| MEMORY_MIB.contains(n))
                        .ok_or_else(|| {
                            format!(
                                "template {name}: memory-mb={v} must be a number in 128..=32768"
                            )
                        })?
                }
                "image" if !v.is_empty() => rootfs_image = Some(PathBuf::from(v)),
                _ => return Err(format!("template {name}: unknown key {k:?}; {usage}")),
            }
        }
        Ok(Self {
            name: name.to_owned(),
            rootfs_dir: PathBuf::from(dir),
            rootfs_image,
            limits,
        })
    }
}

/// A prepared template and what the API reports about it.
#[derive(Debug, Clone)]
pub struct TemplateEntry {
    pub template: Template,
    pub limits: Limits,
    /// A UUID naming this preparation (E2B's "build").
    pub build_id: String,
    pub prepared_at_ms: u64,
    /// How long the runtime took to prepare it (boot + template snapshot).
    pub prepare_ms: u64,
    pub spawn_count: u64,
    pub last_spawned_at_ms: Option<u64>,
    /// A root tree that is no template of its own: an image pulled for a
    /// template build (the user templates built on it are what is listed).
    pub hidden: bool,
}

impl TemplateEntry {
    pub fn name(&self) -> &str {
        self.template.id.as_str()
    }

    /// The E2B `Template` (with `builds` when `with_builds`).
    pub fn info(&self, with_builds: bool) -> TemplateInfo {
        let at = rfc3339_ms(self.prepared_at_ms);
        let finished = rfc3339_ms(self.prepared_at_ms + self.prepare_ms);
        TemplateInfo {
            template_id: self.name().to_owned(),
            build_id: self.build_id.clone(),
            cpu_count: self.limits.vcpus,
            memory_mb: self.limits.memory_mib,
            // No disk quota yet (see SandboxDetail.diskSizeMB).
            disk_size_mb: 0,
            public: false,
            aliases: vec![self.name().to_owned()],
            names: vec![self.name().to_owned()],
            created_at: at.clone(),
            updated_at: finished.clone(),
            created_by: None,
            last_spawned_at: self.last_spawned_at_ms.map(rfc3339_ms),
            spawn_count: self.spawn_count,
            build_count: 1,
            envd_version: schema::envd::ENVD_VERSION.into(),
            build_status: TemplateBuildStatus::Ready,
            builds: with_builds.then(|| {
                vec![TemplateBuild {
                    build_id: self.build_id.clone(),
                    status: TemplateBuildStatus::Ready,
                    created_at: at,
                    updated_at: finished.clone(),
                    finished_at: Some(finished),
                    cpu_count: self.limits.vcpus,
                    memory_mb: self.limits.memory_mib,
                    disk_size_mb: Some(0),
                    envd_version: Some(schema::envd::ENVD_VERSION.into()),
                }]
            }),
        }
    }
}

/// A random (version 4) UUID.
pub fn new_uuid() -> Result<String, StoreError> {
    let mut b = random_bytes(16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// A create named a template this node does not serve.
#[derive(Debug, thiserror::Error)]
#[error("template {name:?} not found: this node serves {served}")]
pub struct UnknownTemplate {
    pub name: String,
    /// The names this node serves, comma-separated.
    pub served: String,
}

/// Messages of the [`TemplateCache`].
pub enum TemplateMsg {
    /// The template a create names; counts a spawn.
    Spawn {
        name: String,
        reply: RpcReplyPort<Result<TemplateEntry, UnknownTemplate>>,
    },
    Get {
        name: String,
        reply: RpcReplyPort<Option<TemplateEntry>>,
    },
    /// Every template, by name.
    List {
        reply: RpcReplyPort<Vec<TemplateEntry>>,
    },
    /// Serve one more (an image's root tree); one by its name stays.
    Add {
        entry: Box<TemplateEntry>,
        reply: RpcReplyPort<()>,
    },
}

// Local only: with ractor's `cluster` feature on (ractor_cluster is in the
// graph) every message type says whether it can cross nodes; this one cannot.
impl ractor::Message for TemplateMsg {}

/// Owns the node's prepared templates (see the module documentation).
pub struct TemplateCache;

impl Actor for TemplateCache {
    type Msg = TemplateMsg;
    type State = Vec<TemplateEntry>;
    type Arguments = Vec<TemplateEntry>;

    async fn pre_start(
        &self,
        _myself: ActorRef<TemplateMsg>,
        mut entries: Vec<TemplateEntry>,
    ) -> Result<Vec<TemplateEntry>, ActorProcessingErr> {
        entries.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(entries)
    }

    async fn handle(
        &self,
        _myself: ActorRef<TemplateMsg>,
        msg: TemplateMsg,
        entries: &mut Vec<TemplateEntry>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TemplateMsg::Spawn { name, reply } => {
                let found = match entries.iter_mut().find(|e| e.name() == name) {
                    Some(e) => {
                        e.spawn_count += 1;
                        e.last_spawned_at_ms = Some(now_ms());
                        Ok(e.clone())
                    }
                    None => {
                        let names: Vec<&str> = entries.iter().map(|e| e.name()).collect();
                        Err(UnknownTemplate {
                            name,
                            served: names.join(", "),
                        })
                    }
                };
                let _ = reply.send(found);
            }
            TemplateMsg::Get { name, reply } => {
                let _ = reply.send(entries.iter().find(|e| e.name() == name).cloned());
            }
            TemplateMsg::List { reply } => {
                let _ = reply.send(entries.clone());
            }
            TemplateMsg::Add { entry, reply } => {
                if !entries.iter().any(|e| e.name() == entry.name()) {
                    entries.push(*entry);
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

/// `e2b::TemplateInfo` list for `GET /templates`.
pub fn infos(entries: &[TemplateEntry]) -> Vec<e2b::TemplateInfo> {
    entries
        .iter()
        .filter(|e| !e.hidden)
        .map(|e| e.info(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_specs_parse_and_explain_mistakes() {
        let t: TemplateSpec = "small=/srv/root,cpu=1,memory-mb=256".parse().unwrap();
        assert_eq!(t.name, "small");
        assert_eq!(t.rootfs_dir, PathBuf::from("/srv/root"));
        assert_eq!(
            t.limits,
            Limits {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let t: TemplateSpec = "base=/r".parse().unwrap();
        assert_eq!(t.limits, Limits::default());
        assert_eq!(t.rootfs_image, None);
        let t: TemplateSpec = "base=/r,image=/r.ext4".parse().unwrap();
        assert_eq!(t.rootfs_image, Some(PathBuf::from("/r.ext4")));
        for bad in [
            "base",
            "=/r",
            "base=",
            "base=/r,cpu=0",
            "base=/r,cpu=x",
            "base=/r,memory-mb=64",
            "base=/r,gpu=1",
            "base=/r,cpu",
            "bad name=/r",
        ] {
            let e = bad.parse::<TemplateSpec>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn uuids_have_the_v4_shape() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(u, new_uuid().unwrap());
    }
}
