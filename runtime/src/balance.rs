//! Measurement-based load balancing in AtSync mode (Charm++'s `AtSync` / `ResumeFromSync`).
//!
//! # What this module owns
//!
//! * [`BalanceConfig`]: the strategy and reporting chosen on the command line.
//! * What [`Ctx::at_sync`](crate::Ctx::at_sync) contributes ([`LbRecord`], [`AtSyncData`]) and
//!   the balancing step run at the collection's reduction root.
//! * [`LbMsg`]: the orders and acknowledgements of a step.
//!
//! # How a step runs
//!
//! Every element calls `at_sync`; that is a reduction (counted at home PEs like every reduction,
//! so it is exact even while elements move) whose value is one [`LbRecord`] per element: its
//! measured entry-method time since the last step and the PE it is on. The root then asks every
//! PE how long it was busy (not idle) since its last report for the collection
//! ([`LbMsg::Busy`]); a PE's busy time minus its elements' loads in the records is its
//! *background*: the scheduler, runtime traffic, and every other collection's work on it (a busy
//! group element, say), which the strategy must see even though it cannot move it. With every
//! answer in, the strategy turns the records into migrations; each source PE gets its list ([`LbMsg::Moves`]) and migrates
//! the elements (a busy element moves when it is free); every arrival reports
//! [`LbMsg::Arrived`] to the root, and when all have arrived the root reaches the `resume`
//! target. Loads are reset when recorded, so each step sees the time since the previous one.
//!
//! Invariants: a step completes only after every ordered migration has arrived (or was found
//! unnecessary), so `resume` never runs while an element of the step is in flight; elements that
//! cannot migrate are passed to the strategy as non-migratable and stay.

use crate::collection::{CollectionId, Shape};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::migration::Request;
use crate::options::Options;
use crate::reduction::{Kind, Part, TargetSpec};
use crate::scheduler::{with_pe, PeState};
use charmrs_lb::{LbStats, ObjStats, PeStats, Strategy};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::time::Instant;

/// The load-balancing settings of a job.
pub(crate) struct BalanceConfig {
    strategy: Option<Box<dyn Strategy>>,
    debug: bool,
    dump: Option<String>,
    period: Option<std::time::Duration>,
}

impl BalanceConfig {
    pub(crate) fn from_options(o: &Options) -> Result<BalanceConfig> {
        let strategy = match &o.balancer {
            Some(name) => Some(
                charmrs_lb::strategy_by_name(name)
                    .map_err(|e| Error::Options(format!("+balancer: {e}")))?,
            ),
            None => None,
        };
        let period = o.lb_period_ms.map(std::time::Duration::from_millis);
        if period.is_some() && strategy.is_none() {
            return Err(Error::Options(
                "+LBPeriod needs a strategy: add +balancer NAME".into(),
            ));
        }
        Ok(BalanceConfig {
            strategy,
            debug: o.lb_debug,
            dump: o.lb_dump.clone(),
            period,
        })
    }

    /// Whether entries are timed: load balancing or load dumps are on.
    pub(crate) fn measuring(&self) -> bool {
        self.strategy.is_some() || self.dump.is_some() || self.period.is_some()
    }

    /// The period of periodic balancing, if on.
    pub(crate) fn period(&self) -> Option<std::time::Duration> {
        self.period
    }
}

/// The task (on PE 0) that starts a periodic balancing step every `period`.
pub(crate) fn periodic(period: std::time::Duration) -> crate::envelope::LocalTask {
    Box::pin(async move {
        loop {
            crate::sleep(period).await;
            let started = with_pe("periodic load balancing", |pe| pe.collect_loads());
            if started.is_err() {
                return;
            }
        }
    })
}

/// One element's measurements, as the root sees them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct LbRecord {
    pub(crate) index: Index,
    /// The PE the element was on when it called `at_sync`.
    pub(crate) pe: u32,
    /// Seconds of entry-method time since the last step.
    pub(crate) load: f64,
    pub(crate) migratable: bool,
}

/// The value an `at_sync` reduction combines: every element's record, and (in the parts made on
/// this process) where to resume.
#[derive(Clone)]
pub(crate) struct AtSyncData {
    records: Vec<LbRecord>,
    resume: Option<TargetSpec>,
}

/// The contribution of one element's `at_sync`: its record with the load measured so far (which
/// restarts from zero).
pub(crate) fn at_sync_part(coll: CollectionId, mut record: LbRecord, resume: TargetSpec) -> Part {
    let _ = with_pe("at_sync", |pe| {
        let cols = pe.collections.borrow();
        if let Some(element) = cols.get(&coll).and_then(|c| c.find(&record.index)) {
            // The running entry (which called `at_sync`, maybe in a later poll of a suspended
            // one) counts up to now; the clock is marked here, so the rest of it counts towards
            // the next step.
            let so_far = if pe.measuring {
                let took = pe.clock_mark();
                pe.entry_secs.set(pe.entry_secs.get() + took);
                took
            } else {
                0.0
            };
            record.load = element.load() + so_far;
            element.set_load(0.0);
        }
    });
    Part {
        data: Box::new(AtSyncData {
            records: vec![record],
            resume: Some(resume),
        }),
        kind: Kind::at_sync(),
        target: TargetSpec::Balance,
    }
}

/// Where an `at_sync` partial resumes, if `data` is one made in this process.
pub(crate) fn resume_of(data: &(dyn Any + Send)) -> Option<TargetSpec> {
    data.downcast_ref::<AtSyncData>().and_then(|d| d.resume)
}

/// Gives decoded `at_sync` data (which lost its resume target on the wire) the one this process
/// remembered.
pub(crate) fn set_resume(data: &mut (dyn Any + Send), resume: TargetSpec) {
    if let Some(d) = data.downcast_mut::<AtSyncData>() {
        d.resume.get_or_insert(resume);
    }
}

pub(crate) fn combine(
    acc: &mut Box<dyn Any + Send>,
    next: Box<dyn Any + Send>,
    _op: crate::Reducer,
) -> std::result::Result<(), String> {
    let next = next
        .downcast::<AtSyncData>()
        .map_err(|_| "an at_sync part of another type".to_string())?;
    let acc = acc
        .downcast_mut::<AtSyncData>()
        .ok_or("a contribution that is not an at_sync")?;
    acc.records.extend(next.records);
    if acc.resume.is_none() {
        acc.resume = next.resume;
    }
    Ok(())
}

pub(crate) fn clone(v: &(dyn Any + Send)) -> Box<dyn Any + Send> {
    Box::new(
        v.downcast_ref::<AtSyncData>()
            .expect("at_sync parts are checked")
            .clone(),
    )
}

pub(crate) fn encode(v: &(dyn Any + Send)) -> std::result::Result<Vec<u8>, String> {
    let d = v
        .downcast_ref::<AtSyncData>()
        .ok_or("a value that is not an at_sync part")?;
    postcard::to_stdvec(&d.records).map_err(|e| e.to_string())
}

pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Box<dyn Any + Send>, String> {
    let records: Vec<LbRecord> = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    Ok(Box::new(AtSyncData {
        records,
        resume: None,
    }))
}

/// Load-balancing traffic between the root of a step and the PEs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum LbMsg {
    /// Root → source PE: move these elements (index, destination PE); arrivals are reported to
    /// the root for an AtSync step (`step` is `Some`), not for a periodic one.
    Moves {
        coll: CollectionId,
        step: Option<u64>,
        root: u32,
        moves: Vec<(Index, u32)>,
    },
    /// PE 0 → every PE: report your elements' loads (periodic mode).
    Collect { root: u32 },
    /// A PE's loads: its migratable residents `(collection, index, seconds)` and its background
    /// seconds since the last report.
    Report {
        pe: u32,
        objects: Vec<(CollectionId, Index, f64)>,
        background: f64,
    },
    /// Destination PE → root: one element of the step arrived (or needed no move).
    Arrived { coll: CollectionId, step: u64 },
    /// Root of an AtSync step → every PE: report how long you were busy since your last report
    /// for `coll` (or since `coll` was created here).
    Busy {
        root: u32,
        coll: CollectionId,
        step: u64,
    },
    /// A PE's answer to [`LbMsg::Busy`]: seconds not idle (entries, the scheduler, runtime
    /// traffic) in that window.
    BusyReport {
        pe: u32,
        coll: CollectionId,
        step: u64,
        busy: f64,
    },
}

/// The first PE number in `msg` that a job of `num_pes` PEs does not have, described.
fn unknown_pe_in(msg: &LbMsg, num_pes: usize) -> Option<String> {
    let bad = |pe: u32| pe as usize >= num_pes;
    match msg {
        LbMsg::Moves {
            coll, root, moves, ..
        } => {
            if bad(*root) {
                return Some(format!("an order from PE {root}"));
            }
            let (index, to) = moves.iter().find(|(_, to)| bad(*to))?;
            Some(format!(
                "an order to move element {index} of {coll:?} to PE {to}"
            ))
        }
        LbMsg::Collect { root } | LbMsg::Busy { root, .. } if bad(*root) => {
            Some(format!("a report asked for by PE {root}"))
        }
        LbMsg::Report { pe, .. } | LbMsg::BusyReport { pe, .. } if bad(*pe) => {
            Some(format!("a report from PE {pe}"))
        }
        _ => None,
    }
}

/// An AtSync step at its root, its elements' loads combined, waiting for every PE's busy time
/// (which gives the PEs' background: what the step's elements do not account for).
struct Gathering {
    records: Vec<LbRecord>,
    resume: TargetSpec,
    /// Per PE, its busy seconds once reported.
    busy: Vec<Option<f64>>,
    missing: usize,
}

/// A step waiting at its root for the migrations it ordered.
struct RootStep {
    remaining: usize,
    resume: TargetSpec,
}

/// One PE's load-balancing state.
#[derive(Default)]
pub(crate) struct PeLb {
    steps: FxHashMap<(CollectionId, u64), RootStep>,
    next_step: u64,
    /// At PE 0: the periodic step being collected (reports so far), if any.
    collecting: Option<Vec<LbMsg>>,
    /// Background seconds already reported (periodic mode reports the increase).
    reported_background: f64,
    /// At PE 0: periodic steps are held (a checkpoint or restore is under way).
    held: bool,
    /// At the root of AtSync steps: the steps waiting for the PEs' busy times.
    gathering: FxHashMap<(CollectionId, u64), Gathering>,
    /// Per collection balanced by AtSync: this PE's busy seconds (`wall - idle`) when its
    /// current window began (the collection's creation here, or the last report for it).
    window_start: FxHashMap<CollectionId, f64>,
}

impl PeState {
    /// Holds (or lets go) the periodic balancing steps this PE (PE 0) starts; returns whether a
    /// step started before is still collecting loads.
    pub(crate) fn hold_periodic_balancing(&self, hold: bool) -> bool {
        let mut lb = self.lb.borrow_mut();
        lb.held = hold;
        lb.collecting.is_some()
    }

    /// At the root of an `at_sync` reduction: asks every PE for its busy time since its last
    /// report (answers: [`busy_reported`](Self::busy_reported)), then balances, orders the
    /// migrations and resumes when they are done. Without a strategy or a dump it resumes at once.
    pub(crate) fn start_balancing(&self, coll: CollectionId, data: Box<dyn Any + Send>) {
        let Ok(data) = data.downcast::<AtSyncData>() else {
            return self.abort_job("charmrs: at_sync: a reduction of another type".into());
        };
        let AtSyncData {
            mut records,
            resume,
        } = *data;
        let Some(resume) = resume else {
            return self.abort_job(format!(
                "charmrs: at_sync over {coll:?}: the root PE {} has no resume target",
                self.pe
            ));
        };
        records.sort_by_key(|r| r.index);
        let config = &self.shared.balance;
        if config.strategy.is_none() && config.dump.is_none() {
            // Only measuring: nothing to decide, nothing to write.
            return self.reach(resume, Box::new(()), crate::future::encode_value::<()>);
        }
        let step = {
            let mut lb = self.lb.borrow_mut();
            lb.next_step += 1;
            let step = lb.next_step;
            lb.gathering.insert(
                (coll, step),
                Gathering {
                    records,
                    resume,
                    busy: vec![None; self.num_pes()],
                    missing: self.num_pes(),
                },
            );
            step
        };
        self.send_lb_to_every_pe(LbMsg::Busy {
            root: self.pe as u32,
            coll,
            step,
        });
    }

    /// Sends load-balancing message `msg` to PE `dst`.
    fn send_lb(&self, dst: usize, msg: LbMsg) {
        self.send(
            dst,
            crate::envelope::Envelope::new(0, crate::envelope::Control::Balance(msg)),
        );
    }

    /// Sends load-balancing message `msg` to every PE (this one included).
    fn send_lb_to_every_pe(&self, msg: LbMsg) {
        for dst in 0..self.num_pes() {
            self.send_lb(dst, msg.clone());
        }
    }

    /// Starts this PE's window for the AtSync steps of collection `coll` (created or adopted
    /// here): its first report covers the time from now.
    pub(crate) fn start_balancing_window(&self, coll: CollectionId) {
        if self.measuring {
            let busy = self.busy_secs();
            self.lb.borrow_mut().window_start.insert(coll, busy);
        }
    }

    /// Seconds this PE was not idle since it started.
    fn busy_secs(&self) -> f64 {
        let t = self.times();
        (t.wall - t.idle).max(0.0)
    }

    /// At the root of AtSync step `step` of `coll`: PE `pe` was busy `busy` seconds in its
    /// window; balances once every PE answered. Answers may come from other processes: checked
    /// as hostile input.
    fn busy_reported(&self, pe: u32, coll: CollectionId, step: u64, busy: f64) {
        let complete = {
            let mut lb = self.lb.borrow_mut();
            let Some(g) = lb.gathering.get_mut(&(coll, step)) else {
                drop(lb);
                return self.abort_job(format!(
                    "charmrs: PE {}: a busy time from PE {pe} for unknown balancing step {step} \
                     of {coll:?}",
                    self.pe
                ));
            };
            let slot = match g.busy.get_mut(pe as usize) {
                Some(slot @ None) if busy.is_finite() && busy >= 0.0 => slot,
                _ => {
                    drop(lb);
                    return self.abort_job(format!(
                        "charmrs: balancing step {step} of {coll:?}: a bad busy time {busy} from \
                         PE {pe} (unknown PE, negative, or reported twice; the job has {} PEs)",
                        self.num_pes()
                    ));
                }
            };
            *slot = Some(busy);
            g.missing -= 1;
            if g.missing == 0 {
                lb.gathering.remove(&(coll, step))
            } else {
                None
            }
        };
        if let Some(g) = complete {
            self.balance_step(coll, step, g);
        }
    }

    /// Balances AtSync step `step` of `coll` with every PE's busy time in: a PE's background is
    /// its busy time minus its loads in the step's records (at least zero).
    fn balance_step(&self, coll: CollectionId, step: u64, gathered: Gathering) {
        let Gathering {
            records,
            resume,
            busy,
            ..
        } = gathered;
        let config = &self.shared.balance;
        let mut background: Vec<f64> = busy.iter().map(|b| b.unwrap_or(0.0)).collect();
        for r in &records {
            if let Some(b) = background.get_mut(r.pe as usize) {
                *b -= r.load;
            }
        }
        let stats = LbStats {
            pes: background
                .into_iter()
                .map(|b| PeStats::new(b.max(0.0)))
                .collect(),
            objects: records
                .iter()
                .enumerate()
                .map(|(k, r)| ObjStats {
                    id: k as u64,
                    pe: r.pe as usize,
                    load: r.load,
                    migratable: r.migratable,
                })
                .collect(),
        };
        if let Some(path) = &config.dump {
            let file = format!("{path}.{step}");
            if let Err(e) = charmrs_lb::dump::save_dump(&stats, &file) {
                eprintln!("charmrs: +LBDump: cannot write {file}: {e}");
            }
        }
        let Some(strategy) = &config.strategy else {
            return self.reach(resume, Box::new(()), crate::future::encode_value::<()>);
        };
        if let Err(e) = stats.validate() {
            return self.abort_job(format!(
                "charmrs: load balancing step {step}: bad measurements: {e}"
            ));
        }
        let started = Instant::now();
        let migrations = strategy.balance(&stats);
        let took = started.elapsed();
        if config.debug {
            match stats.evaluate(&migrations) {
                Ok((before, after)) => println!(
                    "[LB] step {step} ({}): {} objects on {} PEs, {} migrations, max/avg {:.3} -> {:.3} \
                     (max {:.4} s -> {:.4} s), strategy took {:.2} ms",
                    strategy.name(),
                    records.len(),
                    self.num_pes(),
                    migrations.len(),
                    before.max_over_avg,
                    after.max_over_avg,
                    before.max,
                    after.max,
                    took.as_secs_f64() * 1e3
                ),
                Err(e) => println!("[LB] step {step}: {e}"),
            }
        }
        if migrations.is_empty() {
            return self.reach(resume, Box::new(()), crate::future::encode_value::<()>);
        }
        self.lb.borrow_mut().steps.insert(
            (coll, step),
            RootStep {
                remaining: migrations.len(),
                resume,
            },
        );
        self.send_moves(
            Some(step),
            migrations
                .iter()
                .map(|m| (m.from, coll, records[m.obj as usize].index, m.to)),
        );
    }

    /// Sends each source PE its moves `(from, collection, index, to)`, one message per source and
    /// collection, in PE order; arrivals are reported for an AtSync `step`.
    fn send_moves(
        &self,
        step: Option<u64>,
        moves: impl Iterator<Item = (usize, CollectionId, Index, usize)>,
    ) {
        let mut by_source: FxHashMap<(usize, CollectionId), Vec<(Index, u32)>> =
            FxHashMap::default();
        for (from, coll, index, to) in moves {
            by_source
                .entry((from, coll))
                .or_default()
                .push((index, to as u32));
        }
        let mut orders: Vec<_> = by_source.into_iter().collect();
        orders.sort_by_key(|((pe, coll), _)| (*pe, *coll));
        for ((source, coll), moves) in orders {
            let msg = LbMsg::Moves {
                coll,
                step,
                root: self.pe as u32,
                moves,
            };
            self.send_lb(source, msg);
        }
    }

    /// Handles load-balancing traffic.
    pub(crate) fn balance_message(&self, msg: LbMsg) {
        // Checked before anything happens: an element would leave this PE for nowhere, or a
        // reply go to a PE that does not exist.
        if let Some(why) = unknown_pe_in(&msg, self.num_pes()) {
            return self.abort_job(format!(
                "charmrs: PE {}: malformed load-balancing message: {why}, and this job has {} \
                 PEs",
                self.pe,
                self.num_pes()
            ));
        }
        match msg {
            LbMsg::Moves {
                coll,
                step,
                root,
                moves,
            } => {
                for (index, to) in moves {
                    self.request_migration(Request {
                        coll,
                        index,
                        to: to as usize,
                        balance: step.map(|s| (root, s)),
                        periodic: step.is_none(),
                    });
                }
                self.run_migrations();
            }
            LbMsg::Collect { root } => {
                let report = self.load_report();
                self.send_lb(root as usize, report);
            }
            report @ LbMsg::Report { .. } => self.periodic_report(report),
            LbMsg::Busy { root, coll, step } => {
                let now = self.busy_secs();
                let since = {
                    let mut lb = self.lb.borrow_mut();
                    now - lb.window_start.insert(coll, now).unwrap_or(0.0)
                };
                let report = LbMsg::BusyReport {
                    pe: self.pe as u32,
                    coll,
                    step,
                    busy: since.max(0.0),
                };
                self.send_lb(root as usize, report);
            }
            LbMsg::BusyReport {
                pe,
                coll,
                step,
                busy,
            } => self.busy_reported(pe, coll, step, busy),
            LbMsg::Arrived { coll, step } => {
                let done = {
                    let mut lb = self.lb.borrow_mut();
                    match lb.steps.get_mut(&(coll, step)) {
                        Some(s) => {
                            s.remaining -= 1;
                            if s.remaining == 0 {
                                lb.steps.remove(&(coll, step)).map(|s| s.resume)
                            } else {
                                None
                            }
                        }
                        None => {
                            drop(lb);
                            return self.abort_job(format!(
                                "charmrs: PE {}: an arrival for unknown balancing step {step} of {coll:?}",
                                self.pe
                            ));
                        }
                    }
                };
                if let Some(resume) = done {
                    self.reach(resume, Box::new(()), crate::future::encode_value::<()>);
                }
            }
        }
    }

    /// Starts a periodic step (PE 0): every PE reports its loads.
    pub(crate) fn collect_loads(&self) {
        if self.lb.borrow().collecting.is_some() {
            return; // the previous step is still being collected
        }
        if self.lb.borrow().held {
            return; // a checkpoint is being taken or restored: no element may move
        }
        self.lb.borrow_mut().collecting = Some(Vec::new());
        self.send_lb_to_every_pe(LbMsg::Collect {
            root: self.pe as u32,
        });
    }

    /// This PE's loads since its last report (which restart from zero): one object per element
    /// a step may move; the elements that cannot move (groups, single chares, arrays of a
    /// non-migratable type) count in the PE's background, as the time outside entry methods
    /// does, so the strategy sees all the PE's load.
    fn load_report(&self) -> LbMsg {
        let mut objects = Vec::new();
        let mut fixed = 0.0;
        for (coll, c) in self.collections.borrow().iter() {
            let movable = c.mobility.migratable
                && matches!(c.shape, Shape::Array { .. } | Shape::Sparse { .. });
            for (index, element) in c.elements.iter() {
                if movable {
                    objects.push((*coll, *index, element.load()));
                } else {
                    fixed += element.load();
                }
                element.set_load(0.0);
            }
        }
        let background = self.times().background;
        let since = {
            let mut lb = self.lb.borrow_mut();
            let since = background - lb.reported_background;
            lb.reported_background = background;
            since
        };
        LbMsg::Report {
            pe: self.pe as u32,
            objects,
            background: since.max(0.0) + fixed,
        }
    }

    /// A PE's report of a periodic step; balances once every PE reported.
    fn periodic_report(&self, report: LbMsg) {
        let complete = {
            let mut lb = self.lb.borrow_mut();
            let Some(reports) = lb.collecting.as_mut() else {
                return;
            };
            reports.push(report);
            if reports.len() == self.num_pes() {
                lb.collecting.take()
            } else {
                None
            }
        };
        let Some(reports) = complete else { return };
        let Some(strategy) = &self.shared.balance.strategy else {
            return;
        };
        let mut stats = LbStats {
            pes: (0..self.num_pes()).map(|_| PeStats::new(0.0)).collect(),
            objects: Vec::new(),
        };
        let mut names = Vec::new();
        for r in reports {
            if let LbMsg::Report {
                pe,
                objects,
                background,
            } = r
            {
                // Reports may come from other processes: checked as hostile input.
                let Some(slot) = stats.pes.get_mut(pe as usize) else {
                    return self.abort_job(format!(
                        "charmrs: a load-balancing report from unknown PE {pe} (the job has {} PEs)",
                        self.num_pes()
                    ));
                };
                slot.background_load = background;
                for (coll, index, load) in objects {
                    stats
                        .objects
                        .push(ObjStats::new(names.len() as u64, pe as usize, load));
                    names.push((coll, index));
                }
            }
        }
        if let Err(e) = stats.validate() {
            return self.abort_job(format!(
                "charmrs: periodic load balancing: bad reports: {e}"
            ));
        }
        let migrations = strategy.balance(&stats);
        if self.shared.balance.debug {
            if let Ok((before, after)) = stats.evaluate(&migrations) {
                println!(
                    "[LB] periodic ({}): {} objects, {} migrations, max/avg {:.3} -> {:.3}",
                    strategy.name(),
                    stats.objects.len(),
                    migrations.len(),
                    before.max_over_avg,
                    after.max_over_avg
                );
            }
        }
        self.send_moves(
            None,
            migrations.iter().map(|m| {
                let (coll, index) = names[m.obj as usize];
                (m.from, coll, index, m.to)
            }),
        );
    }

    /// Tells the root of step `step` that one of its migrations is done.
    pub(crate) fn balance_arrived(&self, root: usize, coll: CollectionId, step: u64) {
        self.send_lb(root, LbMsg::Arrived { coll, step });
    }
}

#[cfg(test)]
mod tests {
    use super::{unknown_pe_in, LbMsg};
    use crate::collection::CollectionId;
    use crate::index::Index;

    /// Every PE number of a load-balancing message is checked against the job's PE count.
    #[test]
    fn pe_numbers_of_load_balancing_messages_are_checked() {
        let coll = CollectionId::new(0, 1);
        let moves = |root, to| LbMsg::Moves {
            coll,
            step: Some(1),
            root,
            moves: vec![
                (Index::new(&[3]).unwrap(), 1),
                (Index::new(&[4]).unwrap(), to),
            ],
        };
        assert_eq!(unknown_pe_in(&moves(0, 3), 4), None);
        assert_eq!(
            unknown_pe_in(&moves(0, 4), 4).as_deref(),
            Some("an order to move element (4,) of CollectionId(1) to PE 4")
        );
        assert_eq!(
            unknown_pe_in(&moves(9, 1), 4).as_deref(),
            Some("an order from PE 9")
        );
        let busy = LbMsg::Busy {
            root: 4,
            coll,
            step: 1,
        };
        assert!(unknown_pe_in(&busy, 4).is_some());
        assert!(unknown_pe_in(&LbMsg::Collect { root: 3 }, 4).is_none());
        let report = LbMsg::BusyReport {
            pe: 7,
            coll,
            step: 1,
            busy: 0.5,
        };
        assert_eq!(
            unknown_pe_in(&report, 4).as_deref(),
            Some("a report from PE 7")
        );
    }
}
