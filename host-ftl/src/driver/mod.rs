//! The host FTL driver: owns the open-channel device and serves many guest FTLs, each through a
//! [`QueuePair`] of its own. It reaches the device only through [`OpenChannel`] (NVMe-format
//! vector and admin commands, log pages, notifications, and the costs its media work takes), so
//! any device that implements it can go under the driver; [`crate::Device`] is the emulator.
//!
//! * [`partition`]: each guest gets whole parallel units and a virtual geometry numbered from 0;
//!   the partition table is kept durably in the state store.
//! * [`validate`]: every command is checked and translated before it reaches the device.
//! * [`queue`]: the guest-facing boundary: 64-byte commands in, futures of completions out.
//! * [`fair`]: token buckets and weighted fair queueing, with short device queues.
//! * [`engine`]: the deterministic dispatching core, handed the time by its caller: on the real
//!   clock a dispatcher thread drives it; on a simulated one ([`plumbing::clock::SimClock`]) the
//!   caller does, through [`Driver::advance_to`], so fairness is tested deterministically.
//! * [`reclaim`]: a removed guest's chunks are reset before its PUs are given again.
//! * [`notify`]: chunk notifications routed to the owning guest.
//!
//! ```
//! use std::sync::Arc;
//! use host_ftl::driver::{Driver, DriverConfig, GuestSpec};
//! use host_ftl::{opcode, Addr, Device, Geometry, Sqe, Status};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = state_store::Store::open(dir.path()).unwrap();
//! let device = Arc::new(Device::in_memory(Geometry::tiny()).unwrap());
//! let driver = Driver::open(device, store, DriverConfig::default()).unwrap();
//! let qp = driver.add_guest("vm1", GuestSpec::new(1)).unwrap();
//! let geo = qp.geometry().clone();
//! // Write 2 blocks at the start of the guest's chunk 0: list at 0, data at 1024, OOB at 2048.
//! let list: Vec<u64> = (0..2).map(|b| Addr::new(0, 0, 0, b).to_ppa(&geo).unwrap().0).collect();
//! qp.region().write_u64s(0, &list).unwrap();
//! let sqe = Sqe::vector(opcode::VECTOR_WRITE, 1, 2, 0, 1024, 2048).unwrap();
//! let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! let cqe = rt.block_on(qp.submit(sqe));
//! assert_eq!(cqe.status, Status::SUCCESS);
//! ```

pub mod admin;
pub mod engine;
pub mod error;
pub mod fair;
pub mod notify;
pub mod partition;
pub mod queue;
pub mod reclaim;
pub mod validate;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use plumbing::clock::{Clock, MonotonicClock, SimClock};
use plumbing::lock;
use state_store::Store;

pub use engine::GuestCounters;
pub use error::{DriverError, Result};
pub use fair::{Estimate, Limits, Policy};
pub use partition::{GuestRecord, GuestState, Partition};
pub use queue::{Pending, QueuePair, MAX_QUEUE_DEPTH};
pub use validate::Checked;

use crate::command::Cqe;
use engine::{Engine, EngineConfig, GuestShared, Msg};
use fair::SchedConfig;
use notify::{GuestLog, Router};
use partition::PartitionTable;
use validate::POISON;

use crate::address::{Addr, Ppa};
use crate::dma::DmaRegion;
use crate::geometry::{Geometry, MAX_VECTOR};
use crate::open_channel::OpenChannel;
use crate::timing::{Costs, OpKind};

/// Which clock drives the driver.
#[derive(Clone, Debug, Default)]
pub enum ClockConfig {
    /// The real monotonic clock, with a dispatcher thread.
    #[default]
    Real,
    /// A simulated clock; no thread: the caller drives the driver with
    /// [`Driver::advance_to`] and [`Driver::step`].
    Simulated(Arc<SimClock>),
}

/// How much predicted device time may be in flight on one resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Budget {
    /// Derived from the geometry (see [`DriverConfig`]).
    #[default]
    Auto,
    /// No limit: commands go to the device as soon as the scheduler takes them.
    Unlimited,
    Ns(u64),
}

/// The driver's settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub clock: ClockConfig,
    /// Deliver completions at the time the device's timing model says the media is done
    /// (sleeping until then on the real clock); without it, at once.
    pub timing: bool,
    pub policy: Policy,
    /// Per PU. `Auto`: the time to program 64 blocks (one full vector command).
    pub pu_budget: Budget,
    /// Per channel. `Auto`: the time 64 blocks take on the channel for each PU of a group (each
    /// PU may have one full vector command's transfers in flight); 0 when channels are not
    /// modelled, so nothing waits for them.
    pub channel_budget: Budget,
    /// Commands of each guest the scheduler looks at per pass.
    pub scan_limit: usize,
    /// Token buckets hold this many nanoseconds of their rate (SPDK refills every 1 ms).
    pub burst_ns: u64,
    /// A guest's region size when its spec does not say.
    pub region_bytes: u64,
    /// The state store namespace of the partition table.
    pub namespace: String,
    /// Weight of a reclaim among the guests.
    pub reclaim_weight: u32,
    /// Chunks per reset command while reclaiming.
    pub reclaim_batch: usize,
}

impl Default for DriverConfig {
    fn default() -> DriverConfig {
        DriverConfig {
            clock: ClockConfig::Real,
            timing: false,
            policy: Policy::Fair,
            pu_budget: Budget::Auto,
            channel_budget: Budget::Auto,
            scan_limit: 64,
            burst_ns: 1_000_000,
            region_bytes: 4 << 20,
            namespace: "host-ftl".into(),
            reclaim_weight: 1,
            reclaim_batch: 8,
        }
    }
}

/// The largest region a guest may ask for.
const MAX_REGION: u64 = 1 << 30;

/// What a new guest asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// Parallel units.
    pub pus: usize,
    /// Share of the device when guests contend (at least 1).
    pub weight: u32,
    pub limits: Limits,
    /// Size of its DMA region; the driver's default when `None`.
    pub region_bytes: Option<u64>,
}

impl GuestSpec {
    /// `pus` parallel units, weight 1, no limits, the default region.
    pub fn new(pus: usize) -> GuestSpec {
        GuestSpec { pus, weight: 1, limits: Limits::default(), region_bytes: None }
    }

    pub fn weight(self, weight: u32) -> GuestSpec {
        GuestSpec { weight, ..self }
    }

    pub fn iops(mut self, iops: u64) -> GuestSpec {
        self.limits.iops = Some(iops);
        self
    }

    pub fn bytes_per_sec(mut self, bytes: u64) -> GuestSpec {
        self.limits.bytes_per_sec = Some(bytes);
        self
    }

    pub fn region(self, bytes: u64) -> GuestSpec {
        GuestSpec { region_bytes: Some(bytes), ..self }
    }
}

/// A guest as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    pub record: GuestRecord,
    /// `None` while reclaiming.
    pub counters: Option<GuestCounters>,
}

/// What the inbox holds: messages, whether the driver closed, and whether the dispatcher was
/// asked to look at the engine again.
#[derive(Default)]
struct InboxState {
    msgs: VecDeque<Msg>,
    closed: bool,
    kicked: bool,
}

/// Messages waiting for the engine.
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    cv: Condvar,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox { state: Mutex::new(InboxState::default()), cv: Condvar::new() }
    }

    /// Queues a message; gives it back if the driver is closed. `wake`: tell the dispatcher
    /// (not needed when the sender runs the engine itself right after).
    pub(crate) fn push(&self, msg: Msg, wake: bool) -> std::result::Result<(), Box<Msg>> {
        let mut s = lock(&self.state);
        if s.closed {
            return Err(Box::new(msg));
        }
        s.msgs.push_back(msg);
        drop(s);
        if wake {
            self.cv.notify_one();
        }
        Ok(())
    }

    /// Wakes the dispatcher: the engine has something it must watch (a completion due later,
    /// a rate limit, a finished reclaim, messages left behind).
    pub(crate) fn kick(&self) {
        lock(&self.state).kicked = true;
        self.cv.notify_one();
    }

    fn take(&self) -> VecDeque<Msg> {
        std::mem::take(&mut lock(&self.state).msgs)
    }

    fn is_empty(&self) -> bool {
        lock(&self.state).msgs.is_empty()
    }

    /// Waits until a message or a kick comes, the driver closes, or `timeout` passes (forever
    /// if `None`).
    fn wait(&self, timeout: Option<Duration>) {
        let mut s = lock(&self.state);
        if !s.msgs.is_empty() || s.closed || s.kicked {
            s.kicked = false;
            return;
        }
        // A poisoned wait still returns: the caller looks at the inbox again either way.
        match timeout {
            Some(t) => drop(self.cv.wait_timeout(s, t)),
            None => drop(self.cv.wait(s)),
        }
    }

    fn close(&self) -> VecDeque<Msg> {
        let mut s = lock(&self.state);
        s.closed = true;
        let left = std::mem::take(&mut s.msgs);
        drop(s);
        self.cv.notify_all();
        left
    }
}

/// What queue pairs share with the driver.
pub(crate) struct Core {
    pub(crate) device: Arc<dyn OpenChannel>,
    pub(crate) inbox: Inbox,
    pub(crate) engine: Mutex<Engine>,
    pub(crate) router: Arc<Router>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) costs: Costs,
    /// On the real clock, a submitter that finds the engine unlocked runs it itself instead of
    /// waking the dispatcher thread (see [`Core::run_inline`]).
    pub(crate) inline: bool,
}

impl Core {
    /// Hands the inbox to the engine and runs it at `now`, under the engine's lock (so that
    /// messages reach the engine in the order they were queued, whoever runs it). Returns the
    /// names of the reclaims it completed.
    fn run_engine(&self, eng: &mut Engine, now: u64) -> Vec<String> {
        for m in self.inbox.take() {
            eng.handle(m, now);
        }
        eng.run(now);
        std::mem::take(&mut eng.reclaimed)
    }

    /// The submitter's fastest path: when nobody holds the engine, no message waits for it and
    /// the engine would run `checked` at once (see [`Engine::run_now`]), run it right here and
    /// return its completion; `None` (nothing done) otherwise.
    pub(crate) fn run_now(&self, guest: &GuestShared, checked: &Checked) -> Option<Cqe> {
        if !self.inline {
            return None;
        }
        let mut eng = self.engine.try_lock().ok()?;
        if !self.inbox.is_empty() {
            return None;
        }
        let now = self.clock.now_ns();
        eng.run_now(guest, checked, now)
    }

    /// The submitter's fast path: when nobody holds the engine, run it on this thread right
    /// away, so a command the scheduler lets go is executed and completed without crossing to
    /// the dispatcher thread and back. The scheduler, validation and fairness are the same; the
    /// dispatcher is woken only if the engine has something to watch over time, or if the engine
    /// was busy (then it runs the command as before). Returns whether the engine ran here.
    pub(crate) fn run_inline(&self) -> bool {
        if !self.inline {
            return false;
        }
        let Ok(mut eng) = self.engine.try_lock() else {
            self.inbox.kick();
            return false;
        };
        let now = self.clock.now_ns();
        let reclaimed = self.run_engine(&mut eng, now);
        let watch = !reclaimed.is_empty() || eng.next_event(now).is_some();
        // Reclaims finished here are handed back so the dispatcher finishes them (that needs
        // the partition table); it takes them on its next pass.
        eng.reclaimed = reclaimed;
        drop(eng);
        if watch || !self.inbox.is_empty() {
            self.inbox.kick();
        }
        true
    }
}

/// What the driver and its dispatcher thread share.
struct State {
    core: Arc<Core>,
    table: Mutex<PartitionTable>,
    guests: Mutex<BTreeMap<String, QueuePair>>,
    next_id: Arc<AtomicU64>,
    stop: AtomicBool,
    region_default: u64,
}

impl State {
    /// Hands the inbox to the engine and runs it at `now`; finishes the reclaims it completed.
    fn run_once(&self, now: u64) {
        let reclaimed = {
            let mut eng = lock(&self.core.engine);
            self.core.run_engine(&mut eng, now)
        };
        for name in reclaimed {
            self.finish_reclaim(&name);
        }
    }

    fn next_event(&self, now: u64) -> Option<u64> {
        if !self.core.inbox.is_empty() {
            return Some(now);
        }
        lock(&self.core.engine).next_event(now)
    }

    /// The resets are done: make them durable, then free the PUs durably.
    fn finish_reclaim(&self, name: &str) {
        if let Err(e) = self.core.device.flush() {
            tracing::error!(guest = name, error = %e, "cannot flush the reclaimed chunks; the PUs stay reserved until the next open");
            return;
        }
        // Every chunk is reset durably; the record still says reclaiming.
        failpoint::hit("host_ftl::reclaim::flushed");
        match lock(&self.table).delete(name) {
            Ok(()) => tracing::info!(guest = name, "PUs of the removed guest are free"),
            Err(e) => tracing::error!(guest = name, error = %e, "cannot free the PUs of the removed guest"),
        }
    }

    fn dispatcher(self: Arc<State>) {
        while !self.stop.load(Ordering::SeqCst) {
            let now = self.core.clock.now_ns();
            self.run_once(now);
            let next = self.next_event(now);
            let wait = next.map(|t| Duration::from_nanos(t.saturating_sub(self.core.clock.now_ns())));
            if wait != Some(Duration::ZERO) {
                self.core.inbox.wait(wait);
            }
        }
    }
}

/// The host FTL driver.
pub struct Driver {
    state: Arc<State>,
    sim: Option<Arc<SimClock>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("simulated", &self.sim.is_some()).finish_non_exhaustive()
    }
}

/// Checks a guest name: 1 to 64 of letters, digits, '.', '_', '-'.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(DriverError::BadName(name.to_string()))
    }
}

impl Driver {
    /// Opens the driver on `device` (any [`OpenChannel`]; the emulator is
    /// [`crate::Device`]) with the partition table in `store`. Guests of the table are served
    /// again (their queue pairs through [`Driver::guest`]); reclaims a crash cut short are
    /// started again.
    pub fn open(device: Arc<dyn OpenChannel>, store: Arc<Store>, config: DriverConfig) -> Result<Driver> {
        let geo = device.geometry().clone();
        if Addr::from_ppa(&geo, Ppa(POISON)).is_ok() {
            return Err(DriverError::BadConfig("the device's LBA format uses all 64 bits".into()));
        }
        if config.region_bytes == 0 || config.region_bytes > MAX_REGION {
            return Err(DriverError::BadConfig(format!("region_bytes must be 1 to {MAX_REGION}")));
        }
        let table = PartitionTable::load(store, &config.namespace, &geo)?;
        let (clock, sim): (Arc<dyn Clock>, _) = match &config.clock {
            ClockConfig::Real => (Arc::new(MonotonicClock), None),
            ClockConfig::Simulated(c) => (c.clone(), Some(c.clone())),
        };
        let costs = device.costs();
        let budget = |b: Budget, auto: u64| match b {
            Budget::Auto => Some(auto),
            Budget::Unlimited => None,
            Budget::Ns(ns) => Some(ns),
        };
        let full = MAX_VECTOR as u64;
        let auto_pu = costs.media(OpKind::Program, full) + costs.transfer(full);
        let sched = SchedConfig {
            policy: config.policy,
            pu_budget: budget(config.pu_budget, auto_pu),
            channel_budget: budget(config.channel_budget, u64::from(geo.num_pu) * costs.transfer(full)),
            scan_limit: config.scan_limit.max(1),
            burst_ns: config.burst_ns,
        };
        let router = Arc::new(Router::new(&*device)?);
        let next_id = Arc::new(AtomicU64::new(1));
        let engine_cfg = EngineConfig {
            sched,
            timing: config.timing,
            reclaim_weight: config.reclaim_weight.max(1),
            reclaim_batch: config.reclaim_batch,
        };
        let engine = Engine::new(device.clone(), costs, engine_cfg, router.clone(), next_id.clone());
        let core = Arc::new(Core {
            device,
            inbox: Inbox::new(),
            engine: Mutex::new(engine),
            router,
            clock,
            costs,
            inline: sim.is_none(),
        });
        let records: Vec<GuestRecord> = table.records().values().cloned().collect();
        let state = Arc::new(State {
            core,
            table: Mutex::new(table),
            guests: Mutex::new(BTreeMap::new()),
            next_id,
            stop: AtomicBool::new(false),
            region_default: config.region_bytes,
        });
        let mut driver = Driver { state, sim, thread: None };
        for r in records {
            match r.state {
                GuestState::Active => {
                    let qp = driver.serve(&r)?;
                    lock(&driver.state.guests).insert(r.name.clone(), qp);
                }
                GuestState::Reclaiming => {
                    tracing::info!(guest = %r.name, "resuming the reclaim of a removed guest");
                    driver.send(Msg::Reclaim { name: r.name.clone(), pus: r.pus.clone() });
                }
            }
        }
        if driver.sim.is_none() {
            let state = driver.state.clone();
            let handle = std::thread::Builder::new()
                .name("host-ftl-dispatch".into())
                .spawn(move || state.dispatcher())
                .map_err(DriverError::Thread)?;
            driver.thread = Some(handle);
        }
        Ok(driver)
    }

    fn send(&self, msg: Msg) {
        // The inbox only refuses after close, which happens in drop.
        let _ = self.state.core.inbox.push(msg, true);
    }

    /// Builds the queue pair of an active record and tells the engine and router about it.
    fn serve(&self, r: &GuestRecord) -> Result<QueuePair> {
        let core = &self.state.core;
        let part = Arc::new(Partition::new(core.device.geometry(), &r.pus, r.whole_groups)?);
        let bad_region = || DriverError::BadRecord {
            key: format!("guest/{}", r.name),
            reason: format!("region of {} bytes: must be 1 to {MAX_REGION}", r.region_bytes),
        };
        if r.region_bytes == 0 || r.region_bytes > MAX_REGION {
            return Err(bad_region());
        }
        let region = usize::try_from(r.region_bytes).map_err(|_| bad_region())?;
        let guest = Arc::new(GuestShared {
            name: r.name.clone(),
            id: self.state.next_id.fetch_add(1, Ordering::Relaxed),
            part: part.clone(),
            region: Arc::new(DmaRegion::new(region)),
            stats: Default::default(),
            log: Arc::new(GuestLog::default()),
            closed: AtomicBool::new(false),
            weight: r.weight,
            limits: r.limits,
            queued: Default::default(),
        });
        core.router.add(part, guest.log.clone());
        self.send(Msg::AddGuest(guest.clone()));
        Ok(QueuePair { guest, core: core.clone() })
    }

    /// Adds a guest with PUs of its own (see [`partition`] for how they are picked); its record
    /// is durable when this returns.
    pub fn add_guest(&self, name: &str, spec: GuestSpec) -> Result<QueuePair> {
        check_name(name)?;
        if spec.weight == 0 {
            return Err(DriverError::BadSpec("weight must be at least 1".into()));
        }
        if spec.limits.iops == Some(0) || spec.limits.bytes_per_sec == Some(0) {
            return Err(DriverError::BadSpec("a rate limit of 0 would stop the guest; leave it unset for none".into()));
        }
        let region_bytes = spec.region_bytes.unwrap_or(self.state.region_default);
        if region_bytes == 0 || region_bytes > MAX_REGION {
            return Err(DriverError::BadSpec(format!("region of {region_bytes} bytes: must be 1 to {MAX_REGION}")));
        }
        let mut table = lock(&self.state.table);
        match table.get(name).map(|r| r.state) {
            Some(GuestState::Active) => return Err(DriverError::GuestExists(name.into())),
            Some(GuestState::Reclaiming) => return Err(DriverError::Reclaiming(name.into())),
            None => {}
        }
        let (pus, whole_groups) = table.allocate(spec.pus)?;
        let record = GuestRecord {
            name: name.to_string(),
            pus,
            whole_groups,
            weight: spec.weight,
            limits: spec.limits,
            region_bytes,
            state: GuestState::Active,
        };
        Partition::new(self.state.core.device.geometry(), &record.pus, whole_groups)?;
        table.put(record.clone())?;
        // The guest's record is durable; nothing else of it exists yet.
        failpoint::hit("host_ftl::add_guest::recorded");
        let qp = self.serve(&record)?;
        lock(&self.state.guests).insert(name.to_string(), qp.clone());
        tracing::info!(guest = name, pus = ?record.pus, whole_groups, "guest added");
        Ok(qp)
    }

    /// Removes a guest: its queue pair takes no more commands at once, its record is marked
    /// reclaiming durably, and its chunks are reset in the background (see [`reclaim`]).
    pub fn remove_guest(&self, name: &str) -> Result<()> {
        let mut table = lock(&self.state.table);
        let Some(record) = table.get(name).cloned() else { return Err(DriverError::NoSuchGuest(name.into())) };
        if record.state == GuestState::Reclaiming {
            return Err(DriverError::Reclaiming(name.into()));
        }
        let qp = lock(&self.state.guests).remove(name);
        if let Some(qp) = &qp {
            qp.guest.closed.store(true, Ordering::SeqCst);
        }
        if let Err(e) = table.put(GuestRecord { state: GuestState::Reclaiming, ..record.clone() }) {
            if let Some(qp) = qp {
                qp.guest.closed.store(false, Ordering::SeqCst);
                lock(&self.state.guests).insert(name.to_string(), qp);
            }
            return Err(e);
        }
        // The record says reclaiming; no chunk has been reset.
        failpoint::hit("host_ftl::remove_guest::marked");
        self.state.core.router.remove(&record.pus);
        if let Some(qp) = qp {
            self.send(Msg::RemoveGuest(qp.guest.id));
        }
        self.send(Msg::Reclaim { name: name.to_string(), pus: record.pus.clone() });
        tracing::info!(guest = name, "guest removed; reclaiming its PUs");
        Ok(())
    }

    /// The queue pair of an active guest.
    pub fn guest(&self, name: &str) -> Option<QueuePair> {
        lock(&self.state.guests).get(name).cloned()
    }

    /// Every guest of the partition table, active or reclaiming, by name.
    pub fn guests(&self) -> Vec<GuestInfo> {
        let table = lock(&self.state.table);
        let guests = lock(&self.state.guests);
        table
            .records()
            .values()
            .map(|r| GuestInfo { record: r.clone(), counters: guests.get(&r.name).map(QueuePair::counters) })
            .collect()
    }

    /// Device PUs that no guest owns.
    pub fn free_pus(&self) -> Vec<usize> {
        lock(&self.state.table).free()
    }

    /// Names of the removed guests whose PUs are still being reclaimed.
    pub fn reclaiming(&self) -> Vec<String> {
        let table = lock(&self.state.table);
        table.records().values().filter(|r| r.state == GuestState::Reclaiming).map(|r| r.name.clone()).collect()
    }

    /// The device under the driver.
    pub fn device(&self) -> &Arc<dyn OpenChannel> {
        &self.state.core.device
    }

    /// The device's geometry.
    pub fn geometry(&self) -> &Geometry {
        self.state.core.device.geometry()
    }

    /// The driver's time in nanoseconds (simulated or real).
    pub fn now(&self) -> u64 {
        self.state.core.clock.now_ns()
    }

    /// Commands queued in the driver or in flight on the device.
    pub fn busy(&self) -> usize {
        lock(&self.state.core.engine).busy()
    }

    /// When the next thing happens on the simulated clock (a completion, a rate limit
    /// expiring, or work submitted and not yet dispatched: now); `None` when idle.
    pub fn next_event(&self) -> Option<u64> {
        self.state.next_event(self.now())
    }

    /// Simulated clock only: runs everything due up to `t` in time order, and moves the clock
    /// to `t`.
    pub fn advance_to(&self, t: u64) -> Result<()> {
        let sim = self.sim.as_ref().ok_or(DriverError::NotSimulated)?;
        loop {
            let now = sim.now_ns();
            self.state.run_once(now);
            match self.state.next_event(now) {
                Some(e) if e > now && e <= t => sim.set(e),
                Some(e) if e == now => continue,
                _ => break,
            }
        }
        if sim.now_ns() < t {
            sim.set(t);
            self.state.run_once(t);
        }
        Ok(())
    }

    /// Simulated clock only: runs what is due now, then advances to the next event and runs
    /// it; returns its time, or `None` when nothing is left to happen.
    pub fn step(&self) -> Result<Option<u64>> {
        let sim = self.sim.as_ref().ok_or(DriverError::NotSimulated)?;
        let now = sim.now_ns();
        self.state.run_once(now);
        match self.state.next_event(now) {
            Some(e) => {
                self.advance_to(e)?;
                Ok(Some(e))
            }
            None => Ok(None),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for qp in lock(&self.state.guests).values() {
            qp.guest.closed.store(true, Ordering::SeqCst);
        }
        // Commands still in the inbox are dropped: their futures complete as aborted.
        drop(self.state.core.inbox.close());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the dispatcher thread panicked");
            }
        }
    }
}
