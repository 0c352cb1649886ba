//! `emulator up|down|status|restart|task …`: whole domains, and the command
//! line client of a domain server's API; and the hidden commands that run
//! each process of a domain (`supervise`, `driver`, `agent`, `server`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::domain::{ClusterName, Domain, Pair, ProcessName, DEFAULT_CONFIG};
use crate::rundir::RunDir;
use crate::supervisor;

/// Where a domain keeps its files.
#[derive(Debug, Args)]
pub(super) struct RunDirArg {
    /// Run directory of the domain (disks, sockets, persistent data, logs, token).
    #[arg(long, default_value = "run")]
    run_dir: PathBuf,
}

impl RunDirArg {
    pub(super) fn get(&self) -> RunDir {
        RunDir::new(&self.run_dir)
    }
}

#[derive(Debug, Args)]
pub(super) struct UpArgs {
    /// Domain configuration (TOML); without it, one server system of two
    /// clusters (see `emulator up --print-default-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    run: RunDirArg,
    /// Return once every driver serves its volumes and every agent has
    /// registered and reported, leaving the domain running (stop it with
    /// `emulator down`).
    #[arg(long)]
    detach: bool,
    /// Print the default configuration and exit.
    #[arg(long, exclusive = true)]
    print_default_config: bool,
}

/// Which server a client command talks to.
#[derive(Debug, Args)]
pub(super) struct ServerArg {
    #[command(flatten)]
    run: RunDirArg,
    /// Server A or B (default: A, or B when A is not reachable).
    #[arg(long, value_parser = Pair::parse)]
    server: Option<Pair>,
}

impl ServerArg {
    fn client(&self) -> anyhow::Result<Client> {
        let run = self.run.get();
        if let Some(pair) = self.server {
            return Ok(Client::new(&run, pair)?);
        }
        match Client::new(&run, Pair::A) {
            Ok(client) if client.get::<Value>("/api/v1/domain").is_ok() => Ok(client),
            first => Client::new(&run, Pair::B).or_else(|_| first.map_err(anyhow::Error::from)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum TaskCommand {
    /// Submit a task to a cluster through a server (kinds: report, fail-disk,
    /// replace-disk, rebuild, scrub, pause, resume, cancel, set-rate,
    /// volume-create, volume-delete).
    Submit {
        #[command(flatten)]
        server: ServerArg,
        /// Server system, e.g. s0.
        #[arg(long)]
        system: String,
        /// Cluster of the system: c0 or c1.
        #[arg(long)]
        cluster: String,
        /// What to do.
        kind: String,
        /// Member disk (fail-disk, replace-disk).
        #[arg(long)]
        disk: Option<u64>,
        /// Rate limit in MiB/s (rebuild, scrub, set-rate; 0: none).
        #[arg(long)]
        rate: Option<f64>,
        /// Repair what redundancy can fix (scrub).
        #[arg(long)]
        repair: bool,
        /// Which task (pause, resume, cancel, set-rate): rebuild or scrub.
        #[arg(long)]
        task: Option<String>,
        /// Volume name (volume-create, volume-delete).
        #[arg(long)]
        name: Option<String>,
        /// Volume size, e.g. 64MiB (volume-create).
        #[arg(long)]
        size: Option<String>,
        /// Wait until the task ends (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Show {
        #[command(flatten)]
        server: ServerArg,
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tasks a server has.
    List {
        #[command(flatten)]
        server: ServerArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(ExitCode::SUCCESS);
    }
    let run = args.run.get();
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?,
        None => DEFAULT_CONFIG.to_string(),
    };
    let domain = supervisor::prepare(&run, &text).map_err(|err| match &args.config {
        Some(path) => anyhow::anyhow!("{}: {err}", path.display()),
        None => err.into(),
    })?;
    let started = Instant::now();
    let mut daemon = supervisor::start_daemon(&run)?;
    let views = match supervisor::wait_ready(&run, &domain, &mut daemon) {
        Ok(views) => views,
        Err(err) => {
            let _ = supervisor::down(&run);
            return Err(err.into());
        }
    };
    print_up(&run, &domain, &views, daemon.id(), started.elapsed());
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Ctrl-C (or `emulator down --run-dir {}`) stops it.",
        run.root().display()
    );
    // Until the user stops it, here or with `emulator down`.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stopped_elsewhere = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = interrupt.recv() => return anyhow::Ok(false),
                _ = terminate.recv() => return anyhow::Ok(false),
                _ = poll.tick() => if daemon.try_wait()?.is_some() { return anyhow::Ok(true) },
            }
        }
    })?;
    if stopped_elsewhere {
        println!("the domain was stopped");
        return Ok(ExitCode::SUCCESS);
    }
    println!("stopping the domain…");
    supervisor::down(&run)?;
    let _ = daemon.wait();
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn print_up(
    run: &RunDir,
    domain: &Domain,
    views: &[(Pair, Value)],
    supervisor_pid: u32,
    took: Duration,
) {
    let token = std::fs::read_to_string(run.token()).unwrap_or_default();
    let token = token.trim();
    println!(
        "Domain up in {} (supervisor pid {supervisor_pid}, {:.1} s): {} server system(s), {} cluster(s), servers {}.",
        run.root().display(),
        took.as_secs_f64(),
        domain.systems.len(),
        domain.systems.len() * 2,
        domain
            .pairs()
            .iter()
            .map(|pair| format!(
                "{pair} on {}",
                match domain.server(*pair) {
                    Some(crate::domain::Placement::Cluster(cluster)) => cluster.to_string(),
                    _ => "the host".into(),
                }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("Web console (open the login link once per browser):");
    for pair in domain.pairs() {
        if let Some(published) = run.read_server_address(pair) {
            println!(
                "  server {pair}: {}/   log in: {}/login?token={token}",
                published.http, published.http
            );
        }
    }
    println!(
        "API token: {} (scripts: Authorization: Bearer $(cat {}))",
        run.token().display(),
        run.token().display()
    );
    println!();
    println!("Volumes (attach from a Linux host at the owning controller's address; if that");
    println!("controller fails, its partner takes the address over):");
    if let Some((_, view)) = views.first() {
        for system in view["systems"].as_array().into_iter().flatten() {
            for volume in system["volumes"].as_array().into_iter().flatten() {
                let name = volume["name"].as_str().unwrap_or_default();
                let uri = volume["uri"].as_str().unwrap_or_default();
                let address = uri
                    .trim_start_matches("nbd://")
                    .rsplit_once('/')
                    .map_or("", |(address, _)| address);
                let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
                println!(
                    "  {} {name} ({} MiB), owned by {}:",
                    system["name"].as_str().unwrap_or_default(),
                    volume["size"].as_u64().unwrap_or_default() >> 20,
                    volume["home"].as_str().unwrap_or("?")
                );
                println!("      sudo modprobe nbd && sudo nbd-client {host} {port} /dev/nbd0 -N {name} -persist");
                println!("      nbdinfo {uri}");
            }
        }
    }
    println!();
    println!(
        "Status: emulator status --run-dir {0}    Tasks: emulator task submit --run-dir {0} --system s0 --cluster c0 scrub --wait",
        run.root().display()
    );
}

pub(super) fn down(run: RunDirArg) -> anyhow::Result<ExitCode> {
    let run = run.get();
    if supervisor::down(&run)? {
        println!("domain in {} stopped", run.root().display());
    } else {
        println!("no domain is running in {}", run.root().display());
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn restart(run: RunDirArg, name: String) -> anyhow::Result<ExitCode> {
    let name = ProcessName::parse(&name).map_err(anyhow::Error::msg)?;
    println!("{}", supervisor::restart(&run.get(), &name)?);
    Ok(ExitCode::SUCCESS)
}

pub(super) fn status(server: ServerArg, json: bool) -> anyhow::Result<ExitCode> {
    let client = server.client()?;
    let view: Value = client.get("/api/v1/domain")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "as seen by {} ({})",
        view["server"]["name"].as_str().unwrap_or_default(),
        client.base()
    );
    for system in view["systems"].as_array().into_iter().flatten() {
        println!(
            "system {}: {}",
            system["name"].as_str().unwrap_or_default(),
            system["health"].as_str().unwrap_or("unknown")
        );
        for cluster in system["clusters"].as_array().into_iter().flatten() {
            let processes: Vec<String> = cluster["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{} {} ({})",
                        p["name"]
                            .as_str()
                            .unwrap_or_default()
                            .rsplit('/')
                            .next()
                            .unwrap_or_default(),
                        p["pid"]
                            .as_u64()
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "-".into()),
                        p["state"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            println!(
                "  cluster {}{}: {}",
                cluster["name"].as_str().unwrap_or_default(),
                cluster["domain_server"]
                    .as_str()
                    .map(|s| format!(" (domain server {s})"))
                    .unwrap_or_default(),
                processes.join(", ")
            );
        }
        for disk in system["disks"].as_array().into_iter().flatten() {
            println!(
                "  disk {}: {} {} ({})",
                disk["index"],
                disk["role"].as_str().unwrap_or_default(),
                disk["state"].as_str().unwrap_or_default(),
                disk["file"].as_str().unwrap_or_default()
            );
        }
        for operation in system["operations"].as_array().into_iter().flatten() {
            println!(
                "  {} {}: {:.1}% at {:.1} MiB/s{}",
                operation["kind"].as_str().unwrap_or_default(),
                operation["control"].as_str().unwrap_or_default(),
                operation["percent"].as_f64().unwrap_or_default(),
                operation["mib_per_s"].as_f64().unwrap_or_default(),
                operation["eta_s"]
                    .as_f64()
                    .map(|s| format!(", ETA {s:.0} s"))
                    .unwrap_or_default()
            );
        }
        for volume in system["volumes"].as_array().into_iter().flatten() {
            println!(
                "  volume {} ({} MiB): {}  owner {} (home {}), path {}",
                volume["name"].as_str().unwrap_or_default(),
                volume["size"].as_u64().unwrap_or_default() >> 20,
                volume["uri"].as_str().unwrap_or_default(),
                volume["owner"].as_str().unwrap_or("none"),
                volume["home"].as_str().unwrap_or("?"),
                volume["path"].as_str().unwrap_or("?"),
            );
        }
    }
    for process in view["host_processes"].as_array().into_iter().flatten() {
        println!(
            "on the host: {} {} ({})",
            process["name"].as_str().unwrap_or_default(),
            process["pid"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            process["state"].as_str().unwrap_or_default()
        );
    }
    println!("agents registered with this server:");
    for agent in view["agents"].as_array().into_iter().flatten() {
        println!(
            "  {} pid {} {}{}",
            agent["name"].as_str().unwrap_or_default(),
            agent["pid"],
            agent["state"].as_str().unwrap_or_default(),
            agent["lost_reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn task(command: TaskCommand) -> anyhow::Result<ExitCode> {
    match command {
        TaskCommand::Submit {
            server,
            system,
            cluster,
            kind,
            disk,
            rate,
            repair,
            task,
            name,
            size,
            wait,
            json,
        } => {
            let client = server.client()?;
            let mut args = serde_json::Map::new();
            if let Some(disk) = disk {
                args.insert("disk".into(), json!(disk));
            }
            if let Some(rate) = rate {
                args.insert("rate_mib_s".into(), json!(rate));
            }
            if repair {
                args.insert("repair".into(), json!(true));
            }
            if let Some(task) = task {
                args.insert("task".into(), json!(task));
            }
            if let Some(name) = name {
                args.insert("name".into(), json!(name));
            }
            if let Some(size) = size {
                args.insert("size".into(), json!(size));
            }
            let cluster_name = ClusterName::parse(&format!("{system}/{cluster}"))
                .map(|c| format!("c{}", c.cluster))
                .unwrap_or(cluster);
            let submitted: Value = client.post(
                "/api/v1/tasks",
                &json!({ "system": system, "cluster": cluster_name, "kind": kind, "args": args }),
            )?;
            let id = submitted["id"].as_str().unwrap_or_default().to_string();
            if !wait {
                if json {
                    println!("{}", serde_json::to_string_pretty(&submitted)?);
                } else {
                    println!("task {id} accepted by server {}", client.pair());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let ended = follow(&client, &id, json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ended)?);
            } else {
                print_task(&ended);
            }
            Ok(if ended["state"] == "complete" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        TaskCommand::Show { server, id, json } => {
            let task: Value = server.client()?.get(&format!("/api/v1/tasks/{id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task)?);
            } else {
                print_task(&task);
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List { server, json } => {
            let tasks: Value = server.client()?.get("/api/v1/tasks")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tasks)?);
            } else {
                for task in tasks["tasks"].as_array().into_iter().flatten() {
                    print_task(task);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follows task `id` to its end: a progress bar on a terminal.
fn follow(client: &Client, id: &str, quiet: bool) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(1000);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {percent}%")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let task: Value = match client.get(&format!("/api/v1/tasks/{id}")) {
            Ok(task) => task,
            Err(ClientError::Unreachable { .. }) => {
                bail!("server {} went away while task {id} ran", client.pair())
            }
            Err(err) => return Err(err.into()),
        };
        let state = task["state"].as_str().unwrap_or_default().to_string();
        if state == "complete" || state == "failed" {
            bar.finish_and_clear();
            return Ok(task);
        }
        let percent = task["progress"]["percent"].as_f64().unwrap_or_default();
        bar.set_position((percent * 10.0) as u64);
        bar.set_message(format!(
            "{} {state}",
            task["kind"].as_str().unwrap_or_default()
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_task(task: &Value) {
    println!(
        "{} {} on {} via {}: {}{}{}",
        task["id"].as_str().unwrap_or_default(),
        task["kind"].as_str().unwrap_or_default(),
        task["cluster"].as_str().unwrap_or_default(),
        task["agent"].as_str().unwrap_or_default(),
        task["state"].as_str().unwrap_or_default(),
        task["progress"]["percent"]
            .as_f64()
            .filter(|_| task["state"] == "running")
            .map(|p| format!(" {p:.1}%"))
            .unwrap_or_default(),
        task["failure"]
            .as_str()
            .map(|f| format!(" — {f}"))
            .unwrap_or_default()
    );
}

/// Runs one process of a domain.
pub(super) fn process(command: ProcessCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProcessCommand::Supervise { run } => supervisor::supervise(&run.get())?,
        ProcessCommand::Driver { run, cluster } => {
            let run = run.get();
            let domain = Domain::load(&run.config())?;
            let cluster = ClusterName::parse(&cluster).map_err(anyhow::Error::msg)?;
            crate::driver::run(&run, &domain, cluster)?
        }
        ProcessCommand::Agent { run, cluster, pair } => {
            let cluster = ClusterName::parse(&cluster).map_err(anyhow::Error::msg)?;
            crate::agent::run(&run.get(), cluster, pair)?
        }
        ProcessCommand::Server { run, name } => {
            let run = run.get();
            let domain = Domain::load(&run.config())?;
            let name = ProcessName::parse(&name).map_err(anyhow::Error::msg)?;
            crate::server::run(&run, &domain, name)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The processes of a domain, as the supervisor starts them.
#[derive(Debug, Subcommand)]
pub(super) enum ProcessCommand {
    /// The supervisor of a domain (started by `up`).
    #[command(hide = true)]
    Supervise {
        #[command(flatten)]
        run: RunDirArg,
    },
    /// A cluster's driver.
    #[command(hide = true)]
    Driver {
        #[command(flatten)]
        run: RunDirArg,
        /// The cluster, sN/cM.
        #[arg(long)]
        cluster: String,
    },
    /// An agent of a cluster.
    #[command(hide = true)]
    Agent {
        #[command(flatten)]
        run: RunDirArg,
        /// The cluster, sN/cM.
        #[arg(long)]
        cluster: String,
        /// A or B.
        #[arg(long, value_parser = Pair::parse)]
        pair: Pair,
    },
    /// A domain server.
    #[command(hide = true)]
    Server {
        #[command(flatten)]
        run: RunDirArg,
        /// Its name, sN/cM/server-a or host/server-b.
        #[arg(long)]
        name: String,
    },
}
