//! A client of the servers' HTTP API, for the command line (`status`, `task`)
//! and for `up` waiting until the domain is ready: finds a server's address in
//! the run directory, and turns the API's `{"error": …}` answers into errors
//! that say which server answered what.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::domain::Pair;
use crate::rundir::RunDir;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server of that pair has published an address.
    #[error("server {pair} is not running in {run} (no {file}); `emulator up --run-dir {run}` starts the domain", run = run.display(), file = file.display())]
    NotRunning {
        /// The pair.
        pair: Pair,
        /// The run directory.
        run: std::path::PathBuf,
        /// The file it would have published.
        file: std::path::PathBuf,
    },
    /// The server answered with an error.
    #[error("server {pair} answered {status}: {message}")]
    Refused {
        /// The pair.
        pair: Pair,
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// No answer.
    #[error("server {pair} at {address}: {source}")]
    Unreachable {
        /// The pair.
        pair: Pair,
        /// Where.
        address: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
}

/// A client of server `pair` of the domain in a run directory.
#[derive(Debug)]
pub struct Client {
    pair: Pair,
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of server `pair`, at the address it published.
    pub fn new(run: &RunDir, pair: Pair) -> Result<Self, ClientError> {
        let published = run
            .read_server_address(pair)
            .ok_or_else(|| ClientError::NotRunning {
                pair,
                run: run.root().to_path_buf(),
                file: run.server_address(pair),
            })?;
        let token = std::fs::read_to_string(run.token())
            .ok()
            .map(|t| t.trim().to_string());
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            pair,
            base: published.http,
            token,
            agent,
        })
    }

    /// The server's pair.
    pub fn pair(&self) -> Pair {
        self.pair
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn answer<T: DeserializeOwned>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            pair: self.pair,
            address: self.base.clone(),
            source: Box::new(source),
        };
        let mut response = response.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused {
                pair: self.pair,
                status,
                message: body
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string(),
            });
        }
        serde_json::from_value(body).map_err(|err| ClientError::Refused {
            pair: self.pair,
            status,
            message: format!("unexpected answer: {err}"),
        })
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.answer(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// `POST path` with a JSON body and the domain's token.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ClientError> {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        self.answer(request.send_json(body))
    }
}
