//! The tasks a browser or script can submit to a server, which carry them to a
//! cluster's driver: their kinds, their arguments, and the validation both
//! ends apply (a server answers bad input with `400` and a message; a driver
//! records the same message as the task's failure information if anything
//! gets past).

use serde::Serialize;
use serde_json::Value;

use crate::cli::units::parse_size;
use crate::controller::TaskKind;

/// Every kind, as the API names it.
pub const KINDS: &[&str] = &[
    "report",
    "fail-disk",
    "replace-disk",
    "rebuild",
    "scrub",
    "pause",
    "resume",
    "cancel",
    "set-rate",
    "volume-create",
    "volume-delete",
];

/// Controller processes a rebuild or scrub is split across: one per cluster
/// of the server system.
pub const CONTROLLERS: u8 = 2;

/// A task, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Task {
    /// Collect the configuration and state again, store and report them.
    Report,
    /// Mark a member disk failed.
    FailDisk {
        /// Member index.
        disk: usize,
    },
    /// Put a spare (or a new disk) in place of a failed member.
    ReplaceDisk {
        /// Member index.
        disk: usize,
    },
    /// Rebuild the member being rebuilt.
    Rebuild {
        /// Rate limit.
        rate_mib_s: Option<f64>,
    },
    /// Check every block and the redundancy.
    Scrub {
        /// Rewrite what redundancy can fix.
        repair: bool,
        /// Rate limit.
        rate_mib_s: Option<f64>,
    },
    /// Pause a rebuild or scrub.
    Pause {
        /// Which (None: the only one).
        task: Option<TaskKind>,
    },
    /// Resume it.
    Resume {
        /// Which (None: the only one).
        task: Option<TaskKind>,
    },
    /// Cancel it.
    Cancel {
        /// Which (None: the only one).
        task: Option<TaskKind>,
    },
    /// Change its rate limit.
    SetRate {
        /// Which (None: the only one).
        task: Option<TaskKind>,
        /// MiB/s; None: no limit.
        rate_mib_s: Option<f64>,
    },
    /// Carve a volume.
    VolumeCreate {
        /// Its name.
        name: String,
        /// Bytes.
        size: u64,
    },
    /// Delete a volume.
    VolumeDelete {
        /// Its name.
        name: String,
    },
}

impl Task {
    /// Validates `kind` with `args` (a JSON object; missing is `{}`).
    pub fn parse(kind: &str, args: &Value) -> Result<Self, String> {
        let args = match args {
            Value::Null => &Value::Object(Default::default()),
            Value::Object(_) => args,
            _ => return Err("args must be a JSON object".into()),
        };
        let allowed: &[&str] = match kind {
            "report" => &[],
            "fail-disk" | "replace-disk" => &["disk"],
            "rebuild" => &["rate_mib_s"],
            "scrub" => &["repair", "rate_mib_s"],
            "pause" | "resume" | "cancel" => &["task"],
            "set-rate" => &["task", "rate_mib_s"],
            "volume-create" => &["name", "size"],
            "volume-delete" => &["name"],
            other => {
                return Err(format!(
                    "unknown task kind {other:?} (known: {})",
                    KINDS.join(", ")
                ))
            }
        };
        if let Some(Value::Object(map)) = Some(args) {
            if let Some(extra) = map.keys().find(|key| !allowed.contains(&key.as_str())) {
                return Err(format!("{kind} takes no argument {extra:?}"));
            }
        }
        let disk = || -> Result<usize, String> {
            args.get("disk")
                .and_then(Value::as_u64)
                .map(|d| d as usize)
                .ok_or_else(|| format!("{kind} needs \"disk\": a member index"))
        };
        let rate = || -> Result<Option<f64>, String> {
            match args.get("rate_mib_s") {
                None | Some(Value::Null) => Ok(None),
                Some(value) => match value.as_f64() {
                    Some(rate) if rate > 0.0 && rate.is_finite() => Ok(Some(rate)),
                    Some(0.0) => Ok(None),
                    _ => Err("rate_mib_s must be a positive number of MiB/s (0: no limit)".into()),
                },
            }
        };
        let which = || -> Result<Option<TaskKind>, String> {
            match args.get("task").map(|t| t.as_str()) {
                None => Ok(None),
                Some(Some("rebuild")) => Ok(Some(TaskKind::Rebuild)),
                Some(Some("scrub")) => Ok(Some(TaskKind::Scrub)),
                Some(_) => Err("task must be \"rebuild\" or \"scrub\"".into()),
            }
        };
        let name = || -> Result<String, String> {
            args.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("{kind} needs \"name\": the volume's name"))
        };
        Ok(match kind {
            "report" => Self::Report,
            "fail-disk" => Self::FailDisk { disk: disk()? },
            "replace-disk" => Self::ReplaceDisk { disk: disk()? },
            "rebuild" => Self::Rebuild {
                rate_mib_s: rate()?,
            },
            "scrub" => Self::Scrub {
                repair: match args.get("repair") {
                    None => false,
                    Some(value) => value.as_bool().ok_or("repair must be true or false")?,
                },
                rate_mib_s: rate()?,
            },
            "pause" => Self::Pause { task: which()? },
            "resume" => Self::Resume { task: which()? },
            "cancel" => Self::Cancel { task: which()? },
            "set-rate" => {
                if args.get("rate_mib_s").is_none() {
                    return Err("set-rate needs \"rate_mib_s\" (0: no limit)".into());
                }
                Self::SetRate {
                    task: which()?,
                    rate_mib_s: rate()?,
                }
            }
            "volume-create" => Self::VolumeCreate {
                name: name()?,
                size: match args.get("size") {
                    Some(Value::String(text)) => parse_size(text)?,
                    Some(value) => value
                        .as_u64()
                        .ok_or("size must be bytes or a size such as \"64MiB\"")?,
                    None => return Err("volume-create needs \"size\", e.g. \"64MiB\"".into()),
                },
            },
            "volume-delete" => Self::VolumeDelete { name: name()? },
            _ => unreachable!("kinds are checked above"),
        })
    }

    /// Whether the task runs long, reporting progress.
    pub fn is_long(&self) -> bool {
        matches!(self, Self::Rebuild { .. } | Self::Scrub { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tasks_parse_and_bad_ones_say_why() {
        assert_eq!(
            Task::parse("fail-disk", &json!({ "disk": 2 })),
            Ok(Task::FailDisk { disk: 2 })
        );
        assert_eq!(
            Task::parse("scrub", &json!({ "repair": true })),
            Ok(Task::Scrub {
                repair: true,
                rate_mib_s: None
            })
        );
        assert_eq!(
            Task::parse("volume-create", &json!({ "name": "v", "size": "64MiB" })),
            Ok(Task::VolumeCreate {
                name: "v".into(),
                size: 64 << 20
            })
        );
        assert_eq!(Task::parse("report", &Value::Null), Ok(Task::Report));
        for (kind, args, says) in [
            ("explode", json!({}), "unknown task kind"),
            ("fail-disk", json!({}), "needs \"disk\""),
            ("fail-disk", json!({ "disk": -1 }), "needs \"disk\""),
            (
                "fail-disk",
                json!({ "disk": 1, "force": true }),
                "no argument \"force\"",
            ),
            ("scrub", json!({ "rate_mib_s": -3 }), "positive"),
            ("pause", json!({ "task": "defrag" }), "rebuild"),
            ("set-rate", json!({}), "rate_mib_s"),
            (
                "volume-create",
                json!({ "name": "v", "size": "1GB" }),
                "binary",
            ),
            ("report", json!([1]), "object"),
        ] {
            let err = Task::parse(kind, &args).expect_err(kind);
            assert!(err.contains(says), "{kind} {args}: {err}");
        }
    }
}
