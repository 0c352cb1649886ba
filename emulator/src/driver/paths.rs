//! The driver's host-facing paths: which controllers' volumes it serves over
//! NBD, and on which addresses, following the ownership file both drivers of a
//! server system map ([`controllers::ownership`]).
//!
//! Every [`TICK`] the driver reads both controllers' records and acts on the
//! decision of the failover state machine ([`decide`]):
//!
//! - its own volumes: claim them and serve them on its own address; if the
//!   partner took them over while this driver was away, wait until it hands
//!   them back (failback), then bind the address again;
//! - the partner's: leave them while the partner's lease is fresh. When the
//!   partner dies (kill -9) take them over at once: recover the stripes it was
//!   writing, move `serving` with a compare-and-swap, and bind the partner's
//!   address (address takeover: a host reconnecting to the address it knows
//!   reaches this driver). When the partner's lease runs out but its process
//!   still runs (hung, SIGSTOP), fence it first: SIGKILL, checked by pid and
//!   start time, and wait until it is gone, so it can never finish a write
//!   over newer data. When the partner comes back, stop serving its address
//!   (the NBD server drains: requests in flight complete and are answered),
//!   then hand its volumes back.
//!
//! A heartbeat thread renews this driver's lease every
//! [`controllers::ownership::HEARTBEAT`]; it is a plain thread so a busy
//! runtime cannot starve it into a false failover.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use controllers::ownership::{decide, Decision, Health, Ownership, CONTROLLERS, HEARTBEAT};
use controllers::volume::Volumes;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::domain::ClusterName;
use crate::nbd::export::{Catalog, Refusal};
use crate::nbd::hook::NbdHook;
use crate::nbd::server::{self, ListenAddress, Listener, ServerConfig};
use crate::rundir::RunDir;

/// How often the driver looks at the ownership file.
pub const TICK: Duration = Duration::from_millis(50);
/// How long a driver waits for a partner that never joined before serving its
/// volumes too (a partner that did join and died is taken over at once).
pub const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// How long fencing waits for a killed controller to be gone.
const FENCE_WAIT: Duration = Duration::from_secs(5);

/// An NBD server on one controller's address.
struct Running {
    address: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The paths of one driver.
pub(crate) struct Paths {
    me: ClusterName,
    ownership: Arc<Ownership>,
    volumes: Arc<Volumes>,
    /// The address configured for this controller (`127.0.0.1:0`: any port).
    configured: String,
    started: Instant,
    running: [Option<Running>; CONTROLLERS as usize],
    /// What was last logged about each controller, to log changes only.
    said: [Option<Decision>; CONTROLLERS as usize],
    /// Why binding this controller's own address failed last (None: bound,
    /// or not tried).
    own_bind_error: Option<String>,
    /// The link-fault hook of each controller's address.
    hooks: [Arc<NbdHook>; CONTROLLERS as usize],
}

/// The link-fault hooks of both controller addresses of `me`'s system
/// (`sN/c0/nbd`, `sN/c1/nbd`), each following the run's link book.
pub(crate) fn link_hooks(run: &RunDir, me: ClusterName) -> [Arc<NbdHook>; CONTROLLERS as usize] {
    let name = |cluster| {
        format!(
            "{}/nbd",
            ClusterName {
                system: me.system,
                cluster
            }
        )
    };
    let hooks = [NbdHook::new(name(0)), NbdHook::new(name(1))];
    let links: Vec<String> = hooks.iter().map(|hook| hook.link().to_string()).collect();
    for (hook, state) in hooks
        .iter()
        .zip(crate::link::book::watch(run.root(), &links))
    {
        hook.apply(*state.borrow());
        tokio::spawn(Arc::clone(hook).follow(state));
    }
    hooks
}

impl Paths {
    pub(crate) fn new(
        me: ClusterName,
        ownership: Arc<Ownership>,
        volumes: Arc<Volumes>,
        configured: String,
        hooks: [Arc<NbdHook>; CONTROLLERS as usize],
    ) -> Self {
        Self {
            me,
            ownership,
            volumes,
            configured,
            started: Instant::now(),
            running: [None, None],
            said: [None, None],
            own_bind_error: None,
            hooks,
        }
    }

    /// Why this controller's own address could not be bound, if it could not
    /// (at start-up: another program has the port).
    pub(crate) fn own_bind_error(&self) -> Option<&str> {
        self.own_bind_error.as_deref()
    }

    fn id(&self) -> u8 {
        self.me.cluster as u8
    }

    fn name(&self, controller: u8) -> ClusterName {
        ClusterName {
            system: self.me.system,
            cluster: usize::from(controller),
        }
    }

    /// One look at the ownership file, and what follows from it.
    pub(crate) async fn step(&mut self) {
        for controller in 0..CONTROLLERS {
            let record = match self.ownership.record(controller) {
                Ok(record) => record,
                Err(err) => {
                    tracing::error!(%err, "cannot read the ownership file");
                    return;
                }
            };
            // The health of whoever serves these volumes, if that is a third
            // party to this decision (our own volumes, held by the partner).
            let server_health = record
                .serving
                .filter(|&c| c != self.id() && c != controller)
                .and_then(|c| self.ownership.record(c).ok())
                .map(|server| server.health);
            let decision = decide(
                self.id(),
                &record,
                server_health,
                self.started.elapsed() >= STARTUP_GRACE,
            );
            let who = self.name(controller);
            if self.said[usize::from(controller)] != Some(decision) {
                tracing::debug!(controller = %who, ?decision, ?record, "ownership");
                self.said[usize::from(controller)] = Some(decision);
            }
            match decision {
                Decision::Serve => self.serve(controller, record.address).await,
                Decision::Leave | Decision::WaitForHandBack => self.stop(controller).await,
                Decision::Claim { from } => {
                    if self.moved(controller, from) {
                        tracing::info!(volumes_of = %who, "serving this controller's volumes");
                        self.serve(controller, record.address).await;
                    }
                }
                // A partner that never recorded an address (it never came up
                // this run) has no host-facing address to take over.
                Decision::TakeOver { .. } if record.address.is_none() => {}
                Decision::TakeOver { from } => {
                    tracing::warn!(controller = %who, health = ?record.health, "partner is gone: taking over its volumes");
                    let engine = Arc::clone(self.volumes.engine());
                    let _ =
                        tokio::task::spawn_blocking(move || engine.recover_dead_processes()).await;
                    if self.moved(controller, from) {
                        tracing::warn!(volumes_of = %who, address = ?record.address, "took over the partner's volumes and address");
                        self.serve(controller, record.address).await;
                    }
                }
                Decision::Fence { identity } => {
                    tracing::warn!(controller = %who, pid = identity as u32, "partner's lease ran out while its process runs (hung): fencing it");
                    let fenced = tokio::task::spawn_blocking(move || fence(identity))
                        .await
                        .unwrap_or(false);
                    if fenced {
                        tracing::warn!(controller = %who, pid = identity as u32, "partner fenced (killed)");
                    } else {
                        tracing::error!(controller = %who, pid = identity as u32, "could not fence the partner; its volumes stay where they are");
                    }
                }
                Decision::HandBack => {
                    self.stop(controller).await;
                    if self.moved_to(controller, Some(self.id()), controller) {
                        tracing::info!(volumes_of = %who, "partner is back: its volumes handed back");
                    }
                }
            }
        }
    }

    fn moved(&self, of: u8, from: Option<u8>) -> bool {
        self.moved_to(of, from, self.id())
    }

    fn moved_to(&self, of: u8, from: Option<u8>, to: u8) -> bool {
        match self.ownership.move_serving(of, from, to) {
            Ok(moved) => moved,
            Err(err) => {
                tracing::error!(%err, "cannot change ownership");
                false
            }
        }
    }

    /// Serves controller `of`'s volumes on its address, unless already.
    async fn serve(&mut self, of: u8, recorded: Option<String>) {
        if self.running[usize::from(of)].is_some() {
            return;
        }
        let address = match recorded {
            Some(address) => address,
            None if of == self.id() => self.configured.clone(),
            None => {
                tracing::error!(controller = %self.name(of), "no address recorded for the partner: cannot serve its volumes");
                return;
            }
        };
        let listener = match Listener::bind(&ListenAddress::Tcp(address.clone())).await {
            Ok(listener) => listener,
            Err(err) => {
                // The dead owner's sockets may still be closing: next tick.
                tracing::debug!(%err, %address, "cannot bind yet");
                if of == self.id() {
                    self.own_bind_error = Some(err.to_string());
                }
                return;
            }
        };
        if of == self.id() {
            self.own_bind_error = None;
        }
        let bound = listener.local_address();
        if of == self.id() {
            if let Err(err) = self.ownership.set_address(of, &bound) {
                tracing::error!(%err, "cannot record this controller's address");
            }
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let catalog = Catalog::owned(Arc::clone(&self.volumes), of, self.refusal());
        let task = tokio::spawn(server::run(
            listener,
            catalog,
            ServerConfig {
                link: Some(Arc::clone(&self.hooks[usize::from(of)])),
                ..ServerConfig::default()
            },
            async move {
                let _ = stopped.await;
            },
        ));
        tracing::info!(volumes_of = %self.name(of), address = %bound, "serving NBD");
        self.running[usize::from(of)] = Some(Running {
            address: bound,
            stop,
            task,
        });
    }

    /// Stops serving controller `of`'s volumes (draining), if serving them.
    async fn stop(&mut self, of: u8) {
        if let Some(running) = self.running[usize::from(of)].take() {
            tracing::info!(volumes_of = %self.name(of), address = %running.address, "no longer serving: draining");
            let _ = running.stop.send(());
            let _ = running.task.await;
        }
    }

    /// Stops every server (a clean stop of the driver).
    pub(crate) async fn stop_all(&mut self) {
        for controller in 0..CONTROLLERS {
            self.stop(controller).await;
        }
    }

    /// What a client asking this address for a volume another controller
    /// owns is told: who owns it and where to attach it.
    fn refusal(&self) -> Refusal {
        let ownership = Arc::clone(&self.ownership);
        let system = self.me.system;
        Arc::new(move |volume| {
            let owner = ClusterName {
                system,
                cluster: usize::from(volume.owner),
            };
            let at = ownership
                .record(volume.owner)
                .ok()
                .and_then(|record| record.address)
                .map(|address| format!("; attach it at nbd://{address}/{}", volume.name))
                .unwrap_or_default();
            format!(
                "volume {} is owned by controller {owner}, not served on this address{at}",
                volume.name
            )
        })
    }
}

/// Fences a hung controller: SIGKILL to the process `identity` names (pid and
/// start time, so a reused pid is never hit), then waits until it is gone. A
/// stopped process dies on SIGKILL without running again, so it can never
/// finish a write it had started. True when it is gone.
fn fence(identity: u64) -> bool {
    use disk_images::process::{alive, identity_of};
    let pid = identity as u32;
    if identity_of(pid) != Some(identity) {
        return true;
    }
    if let Err(err) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        tracing::error!(%err, pid, "SIGKILL failed");
    }
    let deadline = Instant::now() + FENCE_WAIT;
    while alive(identity) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Renews this driver's lease until `stop`; if another process took this
/// controller's record (it must never happen while this one runs), the
/// driver exits rather than act as a controller it no longer is.
pub(crate) fn heartbeat(ownership: Arc<Ownership>, me: ClusterName, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match ownership.beat(me.cluster as u8) {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(controller = %me, "another process joined as this controller: exiting");
                std::process::exit(1);
            }
            Err(err) => tracing::error!(%err, "heartbeat failed"),
        }
        std::thread::sleep(HEARTBEAT);
    }
}

/// How a volume's path looks now, for the state the driver reports:
/// `optimized` (its home controller serves it), `failed-over` (the partner
/// serves it at the home address), `transitioning` (its server is gone and
/// nobody took over yet), `offline` (nobody serves it).
pub(crate) fn path_state(home_health: Health, serving: Option<u8>, home: u8) -> &'static str {
    match serving {
        None => "offline",
        Some(c) if c != home => "failed-over",
        Some(_) => match home_health {
            Health::Alive { .. } => "optimized",
            _ => "transitioning",
        },
    }
}
