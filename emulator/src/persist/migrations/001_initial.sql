-- A cluster's persistent data (seed 002): its configuration and state, and the
-- tasks its agents carried to its driver, with the agent that issued each and
-- the failure information of those that failed.

-- The configuration and state as one document (what agents report), with a
-- revision that moves whenever it changes.
CREATE TABLE cluster_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    revision    INTEGER NOT NULL,
    document    TEXT    NOT NULL,  -- JSON: persist::ClusterState
    updated_ms  INTEGER NOT NULL
);

-- Configuration: the storage devices of the cluster; state: each one's.
CREATE TABLE devices (
    idx    INTEGER PRIMARY KEY,   -- device index
    file   TEXT    NOT NULL,      -- image file in the system's disk directory
    role   TEXT    NOT NULL,      -- 'member' or 'spare'
    state  TEXT    NOT NULL       -- 'available', 'unavailable' or 'rebuilding'
);

CREATE TABLE tasks (
    id          TEXT    PRIMARY KEY,
    kind        TEXT    NOT NULL,
    args        TEXT    NOT NULL,  -- JSON object
    agent       TEXT,              -- the agent that issued it, e.g. 's0/c1/agent-b'
    state       TEXT    NOT NULL,  -- 'queued', 'running', 'complete' or 'failed'
    progress    TEXT,              -- JSON: persist::Progress
    failure     TEXT,              -- why it failed
    result      TEXT,              -- JSON: what it returned
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);

CREATE INDEX tasks_by_agent ON tasks (agent);
