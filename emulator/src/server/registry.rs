//! What a server knows: the agents registered with it (and those it lost),
//! each cluster's configuration and state as its agent last reported them,
//! and the tasks submitted to it. Every change is also an [`Event`] for the
//! console's live view.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::domain::{ClusterName, Pair, ProcessName};
use crate::link::ToAgent;
use crate::persist::{now_ms, ClusterState, Progress, TaskRecord, TaskState};

/// Tasks a server remembers; the oldest ended ones are forgotten first.
pub const MAX_TASKS: usize = 1000;
/// Events kept for slow listeners before they miss some.
const EVENT_BACKLOG: usize = 256;

/// Whether an agent is registered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Registered, its link alive.
    Registered,
    /// Its link went (the process died, hangs, or its link was cut).
    Lost,
}

/// An agent as this server knows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// Its name, `s0/c1/agent-a`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Registered or lost.
    pub state: AgentState,
    /// When it (last) registered, Unix ms.
    pub registered_ms: u64,
    /// When it was last heard from, Unix ms.
    pub last_seen_ms: u64,
    /// Why it was lost.
    pub lost_reason: Option<String>,
    /// The revision of its last report.
    pub revision: Option<u64>,
}

/// A task submitted to this server.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    /// Its id.
    pub id: String,
    /// The system, `sN`.
    pub system: String,
    /// The cluster, `sN/cM`.
    pub cluster: String,
    /// What to do.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// The pair that carried it (this server's).
    pub pair: Pair,
    /// The agent it went to.
    pub agent: String,
    /// Where it is.
    pub state: TaskState,
    /// How far it is.
    pub progress: Option<Progress>,
    /// Why it failed.
    pub failure: Option<String>,
    /// What it returned.
    pub result: Option<serde_json::Value>,
    /// When it was submitted, Unix ms.
    pub submitted_ms: u64,
    /// When it last changed, Unix ms.
    pub updated_ms: u64,
}

/// A change the console shows live.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// An agent registered.
    AgentRegistered {
        /// Which.
        agent: String,
    },
    /// An agent was lost.
    AgentLost {
        /// Which.
        agent: String,
        /// Why.
        reason: String,
    },
    /// A cluster's configuration or state changed.
    ClusterChanged {
        /// Which.
        cluster: String,
        /// Its revision.
        revision: u64,
    },
    /// A task moved on.
    TaskChanged {
        /// The task.
        task: Box<TaskView>,
    },
}

struct AgentEntry {
    view: AgentView,
    report: Option<ClusterState>,
    sender: Option<mpsc::Sender<ToAgent>>,
    /// Which link registered it last: a link that ends only loses the agent
    /// if it is still the current one.
    connection: u64,
}

#[derive(Default)]
struct State {
    agents: BTreeMap<ProcessName, AgentEntry>,
    tasks: BTreeMap<String, TaskView>,
    order: VecDeque<String>,
    connections: u64,
    submitted: u64,
}

/// The registry of one server.
pub struct Registry {
    pair: Pair,
    started_ms: u64,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
}

/// Why a task was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// Bad input: the message says what.
    Invalid(String),
    /// The agent that would carry it is not registered.
    NoAgent(String),
}

impl Registry {
    /// An empty registry for server `pair`.
    pub fn new(pair: Pair) -> Self {
        Self {
            pair,
            started_ms: now_ms(),
            state: Mutex::new(State::default()),
            events: broadcast::channel(EVENT_BACKLOG).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Listens to the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Registers `agent` (again); returns its link's number.
    pub fn register(&self, agent: ProcessName, pid: u32, sender: mpsc::Sender<ToAgent>) -> u64 {
        let now = now_ms();
        let connection = {
            let mut state = self.lock();
            state.connections += 1;
            let connection = state.connections;
            let entry = state.agents.entry(agent).or_insert_with(|| AgentEntry {
                view: AgentView {
                    name: agent.to_string(),
                    pid,
                    state: AgentState::Registered,
                    registered_ms: now,
                    last_seen_ms: now,
                    lost_reason: None,
                    revision: None,
                },
                report: None,
                sender: None,
                connection,
            });
            entry.view.pid = pid;
            entry.view.state = AgentState::Registered;
            entry.view.registered_ms = now;
            entry.view.last_seen_ms = now;
            entry.view.lost_reason = None;
            entry.sender = Some(sender);
            entry.connection = connection;
            connection
        };
        self.emit(Event::AgentRegistered {
            agent: agent.to_string(),
        });
        connection
    }

    /// The agent was heard from.
    pub fn seen(&self, agent: &ProcessName) {
        if let Some(entry) = self.lock().agents.get_mut(agent) {
            entry.view.last_seen_ms = now_ms();
        }
    }

    /// The agent's report of its cluster's configuration and state.
    pub fn report(&self, agent: &ProcessName, revision: u64, report: ClusterState) {
        let cluster = report.cluster.clone();
        let changed = {
            let mut state = self.lock();
            let Some(entry) = state.agents.get_mut(agent) else {
                return;
            };
            entry.view.last_seen_ms = now_ms();
            let changed = entry.view.revision != Some(revision);
            entry.view.revision = Some(revision);
            entry.report = Some(report);
            changed
        };
        if changed {
            self.emit(Event::ClusterChanged { cluster, revision });
        }
    }

    /// The agent's link ended: unless a newer link registered it since, it is
    /// lost, and the tasks in flight through it end with that as their
    /// failure information.
    pub fn lose(&self, agent: &ProcessName, connection: u64, reason: &str) {
        let failed: Vec<TaskView> = {
            let mut state = self.lock();
            let Some(entry) = state.agents.get_mut(agent) else {
                return;
            };
            if entry.connection != connection {
                return;
            }
            entry.view.state = AgentState::Lost;
            entry.view.lost_reason = Some(reason.to_string());
            entry.sender = None;
            let other = match self.pair {
                Pair::A => Pair::B,
                Pair::B => Pair::A,
            };
            let name = agent.to_string();
            let mut failed = Vec::new();
            for task in state.tasks.values_mut() {
                if task.agent == name && !task.state.is_final() {
                    task.state = TaskState::Failed;
                    task.failure = Some(format!(
                        "{name} was lost before the task ended ({reason}): server {} cannot tell how it ended. \
                         The cluster's state shows what it did; submit it again through server {other} if it is still needed",
                        self.pair
                    ));
                    task.updated_ms = now_ms();
                    failed.push(task.clone());
                }
            }
            failed
        };
        self.emit(Event::AgentLost {
            agent: agent.to_string(),
            reason: reason.to_string(),
        });
        for task in failed {
            self.emit(Event::TaskChanged {
                task: Box::new(task),
            });
        }
    }

    /// A task update from the agent that carried it.
    pub fn task_update(&self, agent: &ProcessName, record: TaskRecord) {
        let updated = {
            let mut state = self.lock();
            if let Some(entry) = state.agents.get_mut(agent) {
                entry.view.last_seen_ms = now_ms();
            }
            let Some(task) = state.tasks.get_mut(&record.id) else {
                return;
            };
            if task.state.is_final() {
                return;
            }
            task.state = record.state;
            task.progress = record.progress.or(task.progress.take());
            task.failure = record.failure;
            task.result = record.result;
            task.updated_ms = now_ms();
            task.clone()
        };
        self.emit(Event::TaskChanged {
            task: Box::new(updated),
        });
    }

    /// Accepts a task for `cluster` and sends it to the agent of this pair
    /// there (FIG. 4, block 402).
    pub fn submit(
        &self,
        cluster: ClusterName,
        kind: String,
        args: serde_json::Value,
        check: impl FnOnce(Option<&ClusterState>) -> Result<(), String>,
    ) -> Result<TaskView, SubmitError> {
        let agent = ProcessName {
            cluster: Some(cluster),
            role: crate::domain::Role::Agent(self.pair),
        };
        let task = {
            let mut state = self.lock();
            let entry = state.agents.get(&agent);
            check(entry.and_then(|e| e.report.as_ref())).map_err(SubmitError::Invalid)?;
            let sender = match entry {
                Some(AgentEntry {
                    sender: Some(sender),
                    view,
                    ..
                }) if view.state == AgentState::Registered => sender.clone(),
                _ => {
                    let other = match self.pair {
                        Pair::A => Pair::B,
                        Pair::B => Pair::A,
                    };
                    return Err(SubmitError::NoAgent(format!(
                        "{agent} is not registered with server {}: submit the task through server {other}",
                        self.pair
                    )));
                }
            };
            state.submitted += 1;
            let id = format!(
                "{}-{:x}-{}",
                self.pair.lower(),
                self.started_ms,
                state.submitted
            );
            let now = now_ms();
            let task = TaskView {
                id: id.clone(),
                system: cluster.system_name(),
                cluster: cluster.to_string(),
                kind: kind.clone(),
                args: args.clone(),
                pair: self.pair,
                agent: agent.to_string(),
                state: TaskState::Queued,
                progress: None,
                failure: None,
                result: None,
                submitted_ms: now,
                updated_ms: now,
            };
            if sender
                .try_send(ToAgent::RunTask {
                    id: id.clone(),
                    kind,
                    args,
                })
                .is_err()
            {
                return Err(SubmitError::NoAgent(format!(
                    "{agent} is not taking tasks right now (its link is full or closing); try again"
                )));
            }
            state.tasks.insert(id.clone(), task.clone());
            state.order.push_back(id);
            while state.order.len() > MAX_TASKS {
                let Some(oldest) = state.order.pop_front() else {
                    break;
                };
                state.tasks.remove(&oldest);
            }
            task
        };
        self.emit(Event::TaskChanged {
            task: Box::new(task.clone()),
        });
        Ok(task)
    }

    /// Every agent this server knows, by name.
    pub fn agents(&self) -> Vec<AgentView> {
        self.lock()
            .agents
            .values()
            .map(|entry| entry.view.clone())
            .collect()
    }

    /// The last report of `cluster`'s agent, if any.
    pub fn cluster_state(&self, cluster: ClusterName) -> Option<(AgentView, Option<ClusterState>)> {
        let agent = ProcessName {
            cluster: Some(cluster),
            role: crate::domain::Role::Agent(self.pair),
        };
        self.lock()
            .agents
            .get(&agent)
            .map(|entry| (entry.view.clone(), entry.report.clone()))
    }

    /// Every task, newest first.
    pub fn tasks(&self) -> Vec<TaskView> {
        let state = self.lock();
        state
            .order
            .iter()
            .rev()
            .filter_map(|id| state.tasks.get(id).cloned())
            .collect()
    }

    /// One task.
    pub fn task(&self, id: &str) -> Option<TaskView> {
        self.lock().tasks.get(id).cloned()
    }
}
