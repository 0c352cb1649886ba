//! A server's HTTP API and web console (axum). Reading needs nothing;
//! anything that changes something needs the domain's token, as
//! `Authorization: Bearer TOKEN` or the HttpOnly cookie that `/login?token=…`
//! (the link `emulator up` prints) sets for a browser. Bad input is a `4xx`
//! with `{"error": "…"}` naming what was wrong, and changes nothing.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/` | the console |
//! | GET | `/login?token=T` | sets the console's cookie, then `/` |
//! | GET | `/api/v1/domain` | systems → clusters → processes, disks, array, volumes; agents |
//! | POST | `/api/v1/tasks` | `{"system", "cluster", "kind", "args"}` → `202` and the task |
//! | GET | `/api/v1/tasks` | every task, newest first |
//! | GET | `/api/v1/tasks/{id}` | one task |
//! | GET | `/api/v1/events` | server-sent events: agents, clusters, tasks |
//! | GET | `/api/v1/faults` | standing faults and the fault log |
//! | POST | `/api/v1/faults` | a fault (`{"fault": "disk-error", "disk": 2, …}`, optional `"seed"`) → `201` and its record |
//! | DELETE | `/api/v1/faults/{id}` | clears a standing fault (`/api/v1/faults`: all) |
//! | GET | `/api/v1/openapi.json` | this API, described |

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::registry::SubmitError;
use super::Server;
use crate::domain::{ClusterName, Placement, ProcessName, Role};
use crate::persist::ClusterState;
use crate::rundir::liveness;
use crate::task::Task;

/// The console: one page, no build step.
const CONSOLE: &str = include_str!("console.html");
/// This API, described.
const OPENAPI: &str = include_str!("openapi.json");
/// The console's cookie.
const COOKIE: &str = "emulator_token";
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

pub(super) fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/login", get(login))
        .route("/api/v1/domain", get(domain))
        .route("/api/v1/tasks", get(tasks).post(submit))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/events", get(events))
        .route(
            "/api/v1/faults",
            get(faults).post(inject_fault).delete(clear_faults),
        )
        .route("/api/v1/faults/{id}", axum::routing::delete(clear_fault))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(server)
}

/// An error answer: a status and `{"error": message}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such page or API".into())
}

async fn console() -> Html<&'static str> {
    Html(CONSOLE)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    token: String,
}

async fn login(State(server): State<Arc<Server>>, Query(query): Query<LoginQuery>) -> Response {
    if !same(&query.token, &server.token) {
        return ApiError(StatusCode::UNAUTHORIZED, "wrong token".into()).into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        server.token
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn authorized(server: &Server, headers: &HeaderMap) -> Result<(), ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| {
            pair.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        })
        .next();
    let given = bearer.map(str::to_string).or(cookie);
    match given {
        Some(token) if same(&token, &server.token) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::UNAUTHORIZED, "wrong token".into())),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "this needs the domain's token: `Authorization: Bearer $(cat {})`",
                server.run.token().display()
            ),
        )),
    }
}

#[derive(Serialize)]
struct ProcessView {
    name: String,
    role: &'static str,
    pair: Option<String>,
    pid: Option<u32>,
    state: String,
}

fn process_views(server: &Server, cluster: Option<ClusterName>) -> Vec<ProcessView> {
    let table = server.run.read_processes();
    let mut names: Vec<ProcessName> = Vec::new();
    if let Some(cluster) = cluster {
        names.push(ProcessName {
            cluster: Some(cluster),
            role: Role::Driver,
        });
        names.extend(server.domain.pairs().into_iter().map(|pair| ProcessName {
            cluster: Some(cluster),
            role: Role::Agent(pair),
        }));
    }
    names.extend(server.domain.pairs().into_iter().filter_map(|pair| {
        let placed = match server.domain.server(pair)? {
            Placement::Cluster(on) => Some(on),
            Placement::Host => None,
        };
        (placed == cluster).then_some(ProcessName {
            cluster,
            role: Role::Server(pair),
        })
    }));
    names
        .into_iter()
        .map(|name| {
            let text = name.to_string();
            let record = table.iter().find(|record| record.name == text);
            let (role, pair) = match name.role {
                Role::Driver => ("driver", None),
                Role::Agent(pair) => ("agent", Some(pair.to_string())),
                Role::Server(pair) => ("server", Some(pair.to_string())),
            };
            ProcessView {
                name: text,
                role,
                pair,
                pid: record.map(|r| r.pid),
                state: match record {
                    None => "not started".into(),
                    Some(record) => match liveness(record.pid) {
                        "gone" => record.ended.clone().unwrap_or_else(|| "gone".into()),
                        state => state.into(),
                    },
                },
            }
        })
        .collect()
}

async fn domain(State(server): State<Arc<Server>>) -> Json<Value> {
    let systems: Vec<Value> = server
        .domain
        .systems
        .iter()
        .enumerate()
        .map(|(index, system)| {
            let clusters: Vec<Value> = [0, 1]
                .into_iter()
                .map(|c| {
                    let cluster = ClusterName {
                        system: index,
                        cluster: c,
                    };
                    let (agent, state) = match server.registry.cluster_state(cluster) {
                        Some((agent, state)) => (Some(agent), state),
                        None => (None, None),
                    };
                    let domain_server: Vec<String> = server
                        .domain
                        .pairs()
                        .into_iter()
                        .filter(|pair| {
                            server.domain.server(*pair) == Some(Placement::Cluster(cluster))
                        })
                        .map(|pair| pair.to_string())
                        .collect();
                    json!({
                        "name": cluster.to_string(),
                        "domain_server": domain_server.first(),
                        "processes": process_views(&server, Some(cluster)),
                        "agent": agent,
                        "state": state,
                    })
                })
                .collect();
            // The system's disks, array and volumes: as the freshest report
            // of either cluster tells (both share them), from a cluster whose
            // driver still runs if there is one (a dead driver's last report
            // knows nothing of the failover that followed).
            let freshest: Option<ClusterState> = [0, 1]
                .into_iter()
                .filter_map(|c| {
                    server
                        .registry
                        .cluster_state(ClusterName {
                            system: index,
                            cluster: c,
                        })
                        .and_then(|(agent, state)| state.map(|s| (agent.last_seen_ms, s)))
                })
                .max_by_key(|(seen, state)| (liveness(state.driver_pid) == "running", *seen))
                .map(|(_, state)| state);
            let health = freshest
                .as_ref()
                .map(|state| serde_json::to_value(state.array.state).unwrap_or(Value::Null))
                .unwrap_or(json!("unknown"));
            json!({
                "name": system.name,
                "health": health,
                "disks": freshest.as_ref().map(|s| &s.devices),
                "array": freshest.as_ref().map(|s| &s.array),
                "volumes": freshest.as_ref().map(|s| s.volumes.iter().map(|v| json!({
                    "name": v.name, "size": v.size, "uri": v.uri,
                    "home": v.home, "owner": v.owner, "path": v.path,
                })).collect::<Vec<_>>()),
                "operations": freshest.as_ref().map(|s| &s.operations),
                "clusters": clusters,
            })
        })
        .collect();
    let servers: Vec<Value> = server
        .domain
        .pairs()
        .into_iter()
        .map(|pair| {
            let published = server.run.read_server_address(pair);
            json!({
                "pair": pair.to_string(),
                "placement": match server.domain.server(pair) {
                    Some(Placement::Cluster(cluster)) => cluster.to_string(),
                    _ => "host".into(),
                },
                "http": published.map(|p| p.http),
            })
        })
        .collect();
    Json(json!({
        "server": {
            "name": server.me.to_string(),
            "pair": server.pair.to_string(),
            "pid": std::process::id(),
        },
        "systems": systems,
        "host_processes": process_views(&server, None),
        "agents": server.registry.agents(),
        "servers": servers,
    }))
}

async fn tasks(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({ "tasks": server.registry.tasks() }))
}

async fn task(State(server): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    match server.registry.task(&id) {
        Some(task) => Json(task).into_response(),
        None => ApiError(
            StatusCode::NOT_FOUND,
            format!("no task {id:?} on this server"),
        )
        .into_response(),
    }
}

/// What `POST /api/v1/tasks` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Submission {
    system: String,
    cluster: Value,
    kind: String,
    #[serde(default)]
    args: Value,
}

fn target(server: &Server, system: &str, cluster: &Value) -> Result<ClusterName, ApiError> {
    let unknown = |what: String| ApiError(StatusCode::NOT_FOUND, what);
    let system_index = system
        .strip_prefix('s')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < server.domain.systems.len())
        .ok_or_else(|| {
            unknown(format!(
                "no system {system:?} in this domain (systems: s0 … s{})",
                server.domain.systems.len() - 1
            ))
        })?;
    let cluster_index = match cluster {
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        Value::String(text) => {
            let text = text.rsplit('/').next().unwrap_or(text);
            text.strip_prefix('c').and_then(|n| n.parse().ok())
        }
        _ => None,
    }
    .filter(|c| *c < 2)
    .ok_or_else(|| {
        unknown(format!(
            "no cluster {cluster} in system {system} (c0 or c1)"
        ))
    })?;
    Ok(ClusterName {
        system: system_index,
        cluster: cluster_index,
    })
}

async fn submit(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(err) = authorized(&server, &headers) {
        return err.into_response();
    }
    let submission: Submission = match serde_json::from_slice(&body) {
        Ok(submission) => submission,
        Err(err) => {
            return ApiError(StatusCode::BAD_REQUEST, format!("malformed task: {err}"))
                .into_response()
        }
    };
    let cluster = match target(&server, &submission.system, &submission.cluster) {
        Ok(cluster) => cluster,
        Err(err) => return err.into_response(),
    };
    let task = match Task::parse(&submission.kind, &submission.args) {
        Ok(task) => task,
        Err(problem) => return ApiError(StatusCode::BAD_REQUEST, problem).into_response(),
    };
    let check = |state: Option<&ClusterState>| -> Result<(), String> {
        let (Task::FailDisk { disk } | Task::ReplaceDisk { disk }) = task else {
            return Ok(());
        };
        match state {
            Some(state) if disk >= state.array.members => Err(format!(
                "disk {disk} is out of range: {} has {} member disks (0 to {})",
                cluster.system_name(),
                state.array.members,
                state.array.members.saturating_sub(1)
            )),
            _ => Ok(()),
        }
    };
    let args = match submission.args {
        Value::Null => json!({}),
        args => args,
    };
    match server
        .registry
        .submit(cluster, submission.kind, args, check)
    {
        Ok(task) => (StatusCode::ACCEPTED, Json(task)).into_response(),
        Err(SubmitError::Invalid(problem)) => {
            ApiError(StatusCode::BAD_REQUEST, problem).into_response()
        }
        Err(SubmitError::NoAgent(problem)) => {
            ApiError(StatusCode::CONFLICT, problem).into_response()
        }
    }
}

/// The standing faults and the whole fault log (oldest first).
async fn faults(State(server): State<Arc<Server>>) -> Response {
    let run = server.run.clone();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::fault::FaultError>((
            crate::fault::active(&run)?,
            crate::fault::read_log(&run)?,
        ))
    })
    .await;
    match read {
        Ok(Ok((standing, log))) => {
            Json(json!({ "standing": standing, "log": log })).into_response()
        }
        Ok(Err(err)) => {
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
        }
        Err(err) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// What `POST /api/v1/faults` takes: a fault, and the seed for its random
/// choices when it names none.
#[derive(Deserialize)]
struct Injection {
    #[serde(flatten)]
    spec: crate::fault::FaultSpec,
    #[serde(default)]
    seed: Option<u64>,
}

async fn inject_fault(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(err) = authorized(&server, &headers) {
        return err.into_response();
    }
    let injection: Injection = match serde_json::from_slice(&body) {
        Ok(injection) => injection,
        Err(err) => {
            return ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "malformed fault: {err} (kinds: {})",
                    crate::fault::FaultSpec::KINDS.join(", ")
                ),
            )
            .into_response()
        }
    };
    let run = server.run.clone();
    let seed = injection.seed.unwrap_or_else(crate::persist::now_ms);
    let injected =
        tokio::task::spawn_blocking(move || crate::fault::inject(&run, &injection.spec, seed))
            .await;
    match injected {
        Ok(Ok(record)) => (StatusCode::CREATED, Json(record)).into_response(),
        Ok(Err(err)) => fault_error(err).into_response(),
        Err(err) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

fn fault_error(err: crate::fault::FaultError) -> ApiError {
    use crate::fault::FaultError;
    let status = match err {
        FaultError::Invalid(_) => StatusCode::BAD_REQUEST,
        FaultError::Process(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, err.to_string())
}

async fn clear_fault(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    clear(server, headers, Some(id)).await
}

async fn clear_faults(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    clear(server, headers, None).await
}

async fn clear(server: Arc<Server>, headers: HeaderMap, id: Option<String>) -> Response {
    if let Err(err) = authorized(&server, &headers) {
        return err.into_response();
    }
    let run = server.run.clone();
    let cleared =
        tokio::task::spawn_blocking(move || crate::fault::clear(&run, id.as_deref())).await;
    match cleared {
        Ok(Ok(ids)) => Json(json!({ "cleared": ids })).into_response(),
        Ok(Err(crate::fault::FaultError::Invalid(problem))) => {
            ApiError(StatusCode::NOT_FOUND, problem).into_response()
        }
        Ok(Err(err)) => fault_error(err).into_response(),
        Err(err) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn events(
    State(server): State<Arc<Server>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    use tokio::sync::broadcast::error::RecvError;
    let receiver = server.registry.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    let name = match &event {
                        super::Event::AgentRegistered { .. } => "agent-registered",
                        super::Event::AgentLost { .. } => "agent-lost",
                        super::Event::ClusterChanged { .. } => "cluster-changed",
                        super::Event::TaskChanged { .. } => "task-changed",
                    };
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    return Some((Ok(SseEvent::default().event(name).data(data)), receiver));
                }
                // A slow listener missed some: it refetches on the next one.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
