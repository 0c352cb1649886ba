//! Link faults: a [`LinkFault`] as users write it, turned into a rule of the
//! run's link book (`crate::link::book`), which the processes at either end
//! of the link apply: an agent's fault layer (`crate::link::shape`) for its
//! links to its server and to its driver, the drivers' NBD hooks (`crate::nbd::hook`) for the
//! hosts' links to a controller address. Processes pick a change up within
//! `crate::link::book::POLL` (20 ms).

use serde::{Deserialize, Serialize};

use super::{FaultError, FaultRecord, FaultSpec};
use crate::domain::{ClusterName, Domain, Pair, ProcessName, Role};
use crate::link::book::{LinkBook, LinkEffect, LinkRule};
use crate::rundir::RunDir;

/// Which link, and the delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFault {
    /// `sN/cM/agent-a` (that agent's link to server A; `agent-b`: to server
    /// B), `sN/cM/agent-a/driver` (that agent's link to its cluster's
    /// driver), or `sN/cM/nbd` (the hosts' links to controller sN/cM's NBD
    /// address: every connection open on it, and new ones).
    pub link: String,
    /// Added latency, ms (link-delay): every message of an agent link, either
    /// way, or every NBD reply, arrives this much later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// A link, by what is at its ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkName {
    /// An agent's link to the server of its pair.
    Agent(ClusterName, Pair),
    /// An agent's link to its cluster's driver.
    Driver(ClusterName, Pair),
    /// The hosts' links to a controller's NBD address.
    Nbd(ClusterName),
}

impl LinkName {
    /// Parses `sN/cM/agent-a`, `sN/cM/agent-b`, `sN/cM/agent-a/driver`,
    /// `sN/cM/agent-b/driver`, `sN/cM/nbd`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "link {text:?}: links are sN/cM/agent-a, sN/cM/agent-b (that agent's link to its server), \
                 sN/cM/agent-a/driver, sN/cM/agent-b/driver (that agent's link to its cluster's driver) \
                 and sN/cM/nbd (the hosts' links to that controller's NBD address), e.g. s0/c1/agent-a"
            )
        };
        if let Some(cluster) = text.strip_suffix("/nbd") {
            return ClusterName::parse(cluster)
                .map(Self::Nbd)
                .map_err(|_| bad());
        }
        let (agent, to_driver) = match text.strip_suffix("/driver") {
            Some(agent) => (agent, true),
            None => (text, false),
        };
        match ProcessName::parse(agent) {
            Ok(ProcessName {
                cluster: Some(cluster),
                role: Role::Agent(pair),
            }) if to_driver => Ok(Self::Driver(cluster, pair)),
            Ok(ProcessName {
                cluster: Some(cluster),
                role: Role::Agent(pair),
            }) => Ok(Self::Agent(cluster, pair)),
            _ => Err(bad()),
        }
    }

    /// Refuses a link `domain` does not have.
    pub fn check(&self, domain: &Domain) -> Result<(), String> {
        let cluster = match self {
            Self::Agent(cluster, _) | Self::Driver(cluster, _) | Self::Nbd(cluster) => cluster,
        };
        if cluster.system >= domain.systems.len() {
            return Err(format!(
                "link {self}: the domain has no system s{} (it has s0..s{})",
                cluster.system,
                domain.systems.len() - 1
            ));
        }
        if let Self::Agent(_, Pair::B) | Self::Driver(_, Pair::B) = self {
            if domain.server(Pair::B).is_none() {
                return Err(format!(
                    "link {self}: the domain has no server B, so no agent B"
                ));
            }
        }
        Ok(())
    }

    /// What is at its ends, in words.
    pub fn describe(&self) -> String {
        match self {
            Self::Agent(cluster, pair) => {
                format!("link {self} (agent {pair} of {cluster} to server {pair})")
            }
            Self::Driver(cluster, pair) => {
                format!("link {self} (agent {pair} of {cluster} to its driver)")
            }
            Self::Nbd(cluster) => {
                format!("link {self} (hosts to controller {cluster}'s NBD address)")
            }
        }
    }
}

impl std::fmt::Display for LinkName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent(cluster, pair) => write!(f, "{cluster}/agent-{}", pair.lower()),
            Self::Driver(cluster, pair) => write!(f, "{cluster}/agent-{}/driver", pair.lower()),
            Self::Nbd(cluster) => write!(f, "{cluster}/nbd"),
        }
    }
}

/// Adds the rule of a link fault to the book; what it does (it stands).
pub(super) fn inject(
    run: &RunDir,
    id: &str,
    spec: &FaultSpec,
) -> Result<(String, bool), FaultError> {
    let (fault, kind) = link_of(spec);
    let name = LinkName::parse(&fault.link).map_err(FaultError::Invalid)?;
    let domain = Domain::load(&run.config()).map_err(|err| {
        FaultError::Invalid(format!(
            "no domain configuration in {}: {err}",
            run.root().display()
        ))
    })?;
    name.check(&domain).map_err(FaultError::Invalid)?;
    let what = name.describe();
    let (effect, said) = match (kind, fault.ms) {
        ("link-cut", Some(_)) => {
            return Err(FaultError::Invalid(
                "link-cut takes no `ms` (it takes: link)".into(),
            ))
        }
        ("link-cut", None) => (
            LinkEffect::Cut,
            match name {
                LinkName::Agent(..) => format!(
                    "{what} cut: its connection closed; it cannot register again until cleared"
                ),
                LinkName::Driver(..) => format!(
                    "{what} cut: its connection closed; the agent cannot reach its driver until \
                     cleared (a task handed to it waits, queued)"
                ),
                LinkName::Nbd(_) => format!(
                    "{what} cut: its open NBD connections closed, new ones refused until cleared"
                ),
            },
        ),
        (_, None) => {
            return Err(FaultError::Invalid(
                "link-delay needs `ms`, the delay to add to every message".into(),
            ))
        }
        (_, Some(0)) => {
            return Err(FaultError::Invalid(
                "ms = 0: link-delay needs a delay of 1 ms or more".into(),
            ))
        }
        (_, Some(ms)) => (
            LinkEffect::Delay { ms },
            match name {
                LinkName::Agent(..) | LinkName::Driver(..) => {
                    format!("{what}: every message, either way, arrives {ms} ms late")
                }
                LinkName::Nbd(_) => format!("{what}: every NBD reply arrives {ms} ms late"),
            },
        ),
    };
    let rule = LinkRule {
        id: id.to_string(),
        link: name.to_string(),
        effect,
    };
    LinkBook::open(run.root())?.change(|rules| rules.push(rule))?;
    Ok((said, true))
}

/// Removes a standing link fault's rule from the book.
pub(super) fn clear(run: &RunDir, fault: &FaultRecord) -> Result<(), FaultError> {
    LinkBook::open(run.root())?.change(|rules| rules.retain(|rule| rule.id != fault.id))?;
    Ok(())
}

fn link_of(spec: &FaultSpec) -> (&LinkFault, &'static str) {
    match spec {
        FaultSpec::LinkCut(f) | FaultSpec::LinkDelay(f) => (f, spec.kind()),
        _ => unreachable!("only link faults come here"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_parse_and_print_back_and_bad_ones_say_what_links_are() {
        for text in [
            "s0/c1/agent-a",
            "s2/c0/agent-b",
            "s0/c0/nbd",
            "s0/c1/agent-a/driver",
        ] {
            assert_eq!(LinkName::parse(text).expect(text).to_string(), text);
        }
        for text in [
            "s0/c0/driver",
            "s0/c2/nbd",
            "host/server-a",
            "nbd",
            "s0/c0/agent-c",
            "s0/c0/driver/driver",
            "s0/c0/server-a/driver",
        ] {
            let err = LinkName::parse(text).expect_err(text);
            assert!(err.contains("links are sN/cM/agent-a"), "{err}");
        }
    }

    #[test]
    fn a_link_the_domain_does_not_have_is_refused() {
        let domain = Domain::default_domain();
        LinkName::parse("s0/c1/agent-b")
            .expect("parse")
            .check(&domain)
            .expect("the default domain has server B");
        let err = LinkName::parse("s3/c0/nbd")
            .expect("parse")
            .check(&domain)
            .expect_err("no s3");
        assert!(err.contains("no system s3"), "{err}");
    }
}
