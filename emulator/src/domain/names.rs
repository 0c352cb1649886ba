//! The names processes go by, in the console, the API, logs and `emulator
//! restart`: `s0/c1/driver`, `s0/c1/agent-a`, `s0/c0/server-a`, `host/server-b`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A cluster: cluster `cluster` (0 or 1) of server system `system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterName {
    /// The system's index (`s0` is 0).
    pub system: usize,
    /// 0 or 1: the left or right controller.
    pub cluster: usize,
}

impl ClusterName {
    /// Parses `sN/cM`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a cluster (expected sN/c0 or sN/c1, e.g. s0/c1)");
        let (system, cluster) = text.split_once('/').ok_or_else(bad)?;
        let system: usize = system
            .strip_prefix('s')
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let cluster: usize = cluster
            .strip_prefix('c')
            .and_then(|n| n.parse().ok())
            .filter(|c| *c < 2)
            .ok_or_else(bad)?;
        Ok(Self { system, cluster })
    }

    /// The system's name, `sN`.
    pub fn system_name(&self) -> String {
        format!("s{}", self.system)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}/c{}", self.system, self.cluster)
    }
}

/// One agent/server pair: server A and the agents A registered with it, or B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pair {
    /// Server A and every agent A.
    A,
    /// Server B and every agent B.
    B,
}

impl Pair {
    /// 0 for A, 1 for B.
    pub fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }

    /// `a` or `b`.
    pub fn lower(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    /// Parses `A`, `B`, `a` or `b`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "A" | "a" => Ok(Self::A),
            "B" | "b" => Ok(Self::B),
            other => Err(format!("{other:?} is not a pair (A or B)")),
        }
    }
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::A => "A",
            Self::B => "B",
        })
    }
}

/// What a process of the domain does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "role", content = "pair")]
pub enum Role {
    /// A cluster's driver (its controller).
    Driver,
    /// An agent of a cluster, registered with the server of its pair.
    Agent(Pair),
    /// A domain server.
    Server(Pair),
}

/// A process of the domain: its role, and the cluster it runs on (None: the
/// host, for a server placed there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProcessName {
    /// Where it runs.
    pub cluster: Option<ClusterName>,
    /// What it does.
    pub role: Role,
}

impl ProcessName {
    /// Parses `sN/cM/driver`, `sN/cM/agent-a`, `sN/cM/server-b`, `host/server-a`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{text:?} is not a process (expected e.g. s0/c1/driver, s0/c0/agent-a, s0/c1/server-b or host/server-a)"
            )
        };
        let (place, role) = text.rsplit_once('/').ok_or_else(bad)?;
        let cluster = match place {
            "host" => None,
            cluster => Some(ClusterName::parse(cluster).map_err(|_| bad())?),
        };
        let role = match role {
            "driver" => Role::Driver,
            "agent-a" => Role::Agent(Pair::A),
            "agent-b" => Role::Agent(Pair::B),
            "server-a" => Role::Server(Pair::A),
            "server-b" => Role::Server(Pair::B),
            _ => return Err(bad()),
        };
        if cluster.is_none() && !matches!(role, Role::Server(_)) {
            return Err(format!("{text:?}: only a server runs on the host"));
        }
        Ok(Self { cluster, role })
    }
}

impl fmt::Display for ProcessName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cluster {
            Some(cluster) => write!(f, "{cluster}/")?,
            None => f.write_str("host/")?,
        }
        match self.role {
            Role::Driver => f.write_str("driver"),
            Role::Agent(pair) => write!(f, "agent-{}", pair.lower()),
            Role::Server(pair) => write!(f, "server-{}", pair.lower()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for text in [
            "s0/c1/driver",
            "s3/c0/agent-a",
            "s0/c1/agent-b",
            "s0/c0/server-a",
            "host/server-b",
        ] {
            let name = ProcessName::parse(text).expect(text);
            assert_eq!(name.to_string(), text);
        }
        for bad in [
            "s0/c2/driver",
            "host/driver",
            "s0/driver",
            "x/c0/driver",
            "s0/c0/agent-c",
        ] {
            assert!(ProcessName::parse(bad).is_err(), "{bad}");
        }
    }
}
