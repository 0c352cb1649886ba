//! What a domain is made of, as `emulator up` reads it from a TOML file (or
//! takes the embedded default): server systems, each of two clusters sharing a
//! set of disks grouped into one RAID array with volumes, and where the two
//! domain servers (A and B) run: on a cluster configured as a domain server, or
//! on a host. This module owns the file format, its validation (every error
//! names the field and, for a syntax error, the line), and the names the
//! processes go by (`s0/c1/agent-a`).
//!
//! ```toml
//! [servers]
//! a = "s0/c0"      # server A runs on cluster c0 of system s0 ...
//! b = "host"       # ... server B on the host, outside any system
//!
//! [[systems]]
//! name = "s0"
//! disks = 5            # disks the two clusters share
//! disk_size = "256MiB"
//! raid = "raid5"       # raid1 | raid5 | raid6
//! spares = 1           # of the disks, hot spares
//! chunk = "64KiB"
//! volumes = 1          # equal volumes vol0, vol1, … over the array
//! auto_rebuild = true  # a hot spare replaces a failed disk and is rebuilt
//! ```

mod names;

use std::collections::BTreeSet;
use std::path::Path;

use controllers::raid::Level;
use serde::{Deserialize, Serialize};

pub use names::{ClusterName, Pair, ProcessName, Role};

use crate::cli::units::parse_size;

/// The domain `emulator up` starts when given no `--config`: one server
/// system of two clusters, cluster 0 as domain server A and cluster 1 as
/// domain server B, five 256 MiB disks (RAID-5 on four plus a hot spare) and
/// one volume.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// Most server systems one domain may have.
pub const MAX_SYSTEMS: usize = 64;
/// Most disks of one server system.
pub const MAX_DISKS: usize = 32;
/// Most volumes of one server system.
pub const MAX_VOLUMES: usize = 64;

/// A validated domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Domain {
    /// Where server A runs.
    pub server_a: Placement,
    /// Where server B runs (None: no server B, and no agents B).
    pub server_b: Option<Placement>,
    /// The server systems.
    pub systems: Vec<System>,
    /// First TCP port of the drivers' NBD listeners (system `s`, cluster `c`
    /// listens on `nbd_base_port + 2s + c`); 0: each picks a free port.
    pub nbd_base_port: u16,
    /// TCP port of server A's console and API (server B's is the next one);
    /// 0: each picks a free port.
    pub http_base_port: u16,
}

/// Where a domain server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Placement {
    /// On a cluster configured as a domain server.
    Cluster(ClusterName),
    /// On the host, outside every server system.
    Host,
}

/// One server system: two clusters sharing its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct System {
    /// Its name, `s0`, `s1`, … by position.
    pub name: String,
    /// Disks in all (array members plus hot spares).
    pub disks: usize,
    /// Bytes per disk.
    pub disk_bytes: u64,
    /// RAID level of the array.
    pub level: Level,
    /// Hot spares among the disks.
    pub spares: usize,
    /// Chunk bytes.
    pub chunk_bytes: u64,
    /// Equal volumes over the array.
    pub volumes: usize,
    /// Whether the drivers put a hot spare in place of a failed disk and
    /// rebuild it on their own.
    pub auto_rebuild: bool,
}

/// A configuration file that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not this format.
    #[error("{source}")]
    Syntax {
        /// What the parser said (with the line).
        source: Box<toml::de::Error>,
    },
    /// A field with a value that cannot work.
    #[error("{field}: {problem}")]
    Invalid {
        /// Where (`systems[1].disks`).
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}", path = path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    servers: ServersSection,
    #[serde(default)]
    systems: Vec<SystemSection>,
    #[serde(default)]
    ports: PortsSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServersSection {
    a: String,
    #[serde(default)]
    b: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortsSection {
    #[serde(default = "default_nbd_port")]
    nbd: u16,
    #[serde(default = "default_http_port")]
    http: u16,
}

impl Default for PortsSection {
    fn default() -> Self {
        Self {
            nbd: default_nbd_port(),
            http: default_http_port(),
        }
    }
}

fn default_nbd_port() -> u16 {
    10809
}

fn default_http_port() -> u16 {
    8080
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemSection {
    #[serde(default)]
    name: Option<String>,
    disks: usize,
    disk_size: String,
    #[serde(default = "default_raid")]
    raid: String,
    #[serde(default)]
    spares: usize,
    #[serde(default = "default_chunk")]
    chunk: String,
    #[serde(default = "default_volumes")]
    volumes: usize,
    #[serde(default = "default_auto_rebuild")]
    auto_rebuild: bool,
}

fn default_auto_rebuild() -> bool {
    true
}

fn default_raid() -> String {
    "raid5".into()
}

fn default_chunk() -> String {
    "64KiB".into()
}

fn default_volumes() -> usize {
    1
}

impl Domain {
    /// The embedded default domain.
    pub fn default_domain() -> Self {
        Self::parse(DEFAULT_CONFIG).expect("the embedded default configuration is valid")
    }

    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Validates a configuration given as TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            source: Box::new(source),
        })?;
        if file.systems.is_empty() {
            return Err(invalid(
                "systems",
                "a domain needs at least one server system",
            ));
        }
        if file.systems.len() > MAX_SYSTEMS {
            return Err(invalid(
                "systems",
                format!("at most {MAX_SYSTEMS} server systems"),
            ));
        }
        let mut systems = Vec::with_capacity(file.systems.len());
        let mut names = BTreeSet::new();
        for (index, section) in file.systems.iter().enumerate() {
            let system = System::from_section(index, section)?;
            if !names.insert(system.name.clone()) {
                return Err(invalid(
                    format!("systems[{index}].name"),
                    format!("{:?} names two systems", system.name),
                ));
            }
            systems.push(system);
        }
        let placement = |field: &str, text: &str| -> Result<Placement, ConfigError> {
            if text == "host" {
                return Ok(Placement::Host);
            }
            let cluster = ClusterName::parse(text).map_err(|problem| invalid(field, problem))?;
            if cluster.system >= systems.len() {
                return Err(invalid(
                    field,
                    format!(
                        "{text:?} names system s{}, which the file does not have",
                        cluster.system
                    ),
                ));
            }
            Ok(Placement::Cluster(cluster))
        };
        let server_a = placement("servers.a", &file.servers.a)?;
        let server_b = file
            .servers
            .b
            .as_deref()
            .map(|b| placement("servers.b", b))
            .transpose()?;
        if let (Placement::Cluster(a), Some(Placement::Cluster(b))) = (server_a, server_b) {
            if a == b {
                return Err(invalid(
                    "servers.b",
                    "servers A and B must run on different clusters (that is what lets one survive the other)",
                ));
            }
        }
        Ok(Self {
            server_a,
            server_b,
            systems,
            nbd_base_port: file.ports.nbd,
            http_base_port: file.ports.http,
        })
    }

    /// Every cluster of the domain.
    pub fn clusters(&self) -> impl Iterator<Item = ClusterName> + '_ {
        (0..self.systems.len()).flat_map(|system| {
            [0, 1]
                .into_iter()
                .map(move |cluster| ClusterName { system, cluster })
        })
    }

    /// Where server `pair` runs, if it is configured.
    pub fn server(&self, pair: Pair) -> Option<Placement> {
        match pair {
            Pair::A => Some(self.server_a),
            Pair::B => self.server_b,
        }
    }

    /// The pairs whose server is configured (an agent of each runs in every
    /// cluster).
    pub fn pairs(&self) -> Vec<Pair> {
        [Pair::A, Pair::B]
            .into_iter()
            .filter(|pair| self.server(*pair).is_some())
            .collect()
    }

    /// The NBD port of `cluster`'s driver (0: it picks one).
    pub fn nbd_port(&self, cluster: ClusterName) -> u16 {
        match self.nbd_base_port {
            0 => 0,
            base => base.saturating_add((2 * cluster.system + cluster.cluster) as u16),
        }
    }

    /// The HTTP port of server `pair` (0: it picks one).
    pub fn http_port(&self, pair: Pair) -> u16 {
        match self.http_base_port {
            0 => 0,
            base => base.saturating_add(pair.index() as u16),
        }
    }
}

impl System {
    fn from_section(index: usize, section: &SystemSection) -> Result<Self, ConfigError> {
        let field = |name: &str| format!("systems[{index}].{name}");
        let name = section.name.clone().unwrap_or_else(|| format!("s{index}"));
        if name != format!("s{index}") {
            return Err(invalid(
                field("name"),
                format!("system {index} is called s{index} (names follow positions), not {name:?}"),
            ));
        }
        let level = match section.raid.as_str() {
            "raid1" => Level::Raid1,
            "raid5" => Level::Raid5,
            "raid6" => Level::Raid6,
            other => {
                return Err(invalid(
                    field("raid"),
                    format!("{other:?} is not a RAID level (raid1, raid5 or raid6)"),
                ))
            }
        };
        let disk_bytes = parse_size(&section.disk_size)
            .map_err(|problem| invalid(field("disk_size"), problem))?;
        let chunk_bytes =
            parse_size(&section.chunk).map_err(|problem| invalid(field("chunk"), problem))?;
        if section.disks > MAX_DISKS {
            return Err(invalid(
                field("disks"),
                format!("at most {MAX_DISKS} disks"),
            ));
        }
        let members = section.disks.checked_sub(section.spares).ok_or_else(|| {
            invalid(
                field("spares"),
                format!("{} spares out of {} disks", section.spares, section.disks),
            )
        })?;
        let minimum = match level {
            Level::Raid1 => 2,
            Level::Raid5 => 3,
            Level::Raid6 => 4,
        };
        if members < minimum {
            return Err(invalid(
                field("disks"),
                format!(
                    "{} needs at least {minimum} disks besides the spares, got {members}",
                    section.raid
                ),
            ));
        }
        if section.volumes > MAX_VOLUMES {
            return Err(invalid(
                field("volumes"),
                format!("at most {MAX_VOLUMES} volumes"),
            ));
        }
        // The array's own checks (chunk a power of two, disk size a multiple of
        // it, …) with its own words.
        controllers::array::geometry(level, members, chunk_bytes, disk_bytes)
            .validate()
            .map_err(|problem| invalid(field("disk_size"), problem.to_string()))?;
        Ok(Self {
            name,
            disks: section.disks,
            disk_bytes,
            level,
            spares: section.spares,
            chunk_bytes,
            volumes: section.volumes,
            auto_rebuild: section.auto_rebuild,
        })
    }

    /// Array members (disks that are not spares).
    pub fn members(&self) -> usize {
        self.disks - self.spares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_domain_is_one_system_with_both_servers_on_its_clusters() {
        let domain = Domain::default_domain();
        assert_eq!(domain.systems.len(), 1);
        let system = &domain.systems[0];
        assert_eq!((system.disks, system.spares, system.members()), (5, 1, 4));
        assert_eq!(system.disk_bytes, 256 << 20);
        assert_eq!(system.level, Level::Raid5);
        assert_eq!(
            domain.server_a,
            Placement::Cluster(ClusterName {
                system: 0,
                cluster: 0
            })
        );
        assert_eq!(
            domain.server_b,
            Some(Placement::Cluster(ClusterName {
                system: 0,
                cluster: 1
            }))
        );
        assert_eq!(domain.clusters().count(), 2);
        assert_eq!(domain.pairs(), vec![Pair::A, Pair::B]);
    }

    fn error_of(text: &str) -> String {
        Domain::parse(text).expect_err("invalid").to_string()
    }

    const SYSTEM: &str = "[[systems]]\ndisks = 4\ndisk_size = \"16MiB\"\n";

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        assert!(error_of("[servers]\na = \"s0/c0\"\n").contains("systems"));
        let text = format!("[servers]\na = \"s1/c0\"\n{SYSTEM}");
        assert!(
            error_of(&text).starts_with("servers.a:"),
            "{}",
            error_of(&text)
        );
        let text = format!("[servers]\na = \"s0/c2\"\n{SYSTEM}");
        assert!(error_of(&text).starts_with("servers.a:"));
        let text = format!("[servers]\na = \"s0/c0\"\nb = \"s0/c0\"\n{SYSTEM}");
        assert!(error_of(&text).starts_with("servers.b:"));
        let text = "[servers]\na = \"host\"\n[[systems]]\ndisks = 2\ndisk_size = \"16MiB\"\n";
        assert!(
            error_of(text).starts_with("systems[0].disks:"),
            "{}",
            error_of(text)
        );
        let text = "[servers]\na = \"host\"\n[[systems]]\ndisks = 4\ndisk_size = \"16MB\"\n";
        assert!(error_of(text).starts_with("systems[0].disk_size:"));
        let text = "[servers]\na = \"host\"\n[[systems]]\ndisks = 4\ndisk_size = \"16MiB\"\nraid = \"raid7\"\n";
        assert!(error_of(text).starts_with("systems[0].raid:"));
        let text =
            "[servers]\na = \"host\"\n[[systems]]\ndisks = 4\ndisk_size = \"16MiB\"\nspares = 5\n";
        assert!(error_of(text).starts_with("systems[0].spares:"));
        let text =
            "[servers]\na = \"host\"\n[[systems]]\ndisks = 4\ndisk_size = \"16MiB\"\ncolour = 1\n";
        assert!(error_of(text).contains("colour"), "{}", error_of(text));
        // A syntax error names its line.
        let text = "[servers]\na = \"host\"\n[[systems]]\ndisks = = 4\n";
        assert!(error_of(text).contains("line 4"), "{}", error_of(text));
    }

    #[test]
    fn ports_follow_systems_and_clusters() {
        let text = format!("[servers]\na = \"host\"\nb = \"s1/c1\"\n{SYSTEM}{SYSTEM}");
        let domain = Domain::parse(&text).expect("valid");
        assert_eq!(domain.server_a, Placement::Host);
        assert_eq!(domain.systems[1].name, "s1");
        let last = ClusterName {
            system: 1,
            cluster: 1,
        };
        assert_eq!(domain.nbd_port(last), 10809 + 3);
        assert_eq!(domain.http_port(Pair::B), 8081);
        let text = format!("[servers]\na = \"s0/c0\"\n[ports]\nnbd = 0\nhttp = 0\n{SYSTEM}");
        let domain = Domain::parse(&text).expect("valid");
        assert_eq!(domain.nbd_port(last), 0);
        assert_eq!(domain.pairs(), vec![Pair::A]);
    }
}
