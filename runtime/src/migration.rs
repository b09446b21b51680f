//! Migration and location management: elements move between PEs, messages find them.
//!
//! # What this module owns
//!
//! * [`Migrant`]: an element in flight — its serialized state and bookkeeping.
//! * The PE's side of migration ([`PeState::run_migrations`], [`PeState::arrive`]) and of
//!   location management ([`PeState::not_here`], [`PeState::located`], the location cache).
//!
//! # How a message finds a migrated element
//!
//! Every element has a *home* PE computed from its index ([`Shape::home_pe`]), so nobody needs a
//! lookup to address it. The home always knows where its elements are, up to a message in flight:
//! a departure from the home records the destination; an arrival anywhere else tells the home.
//! A PE that left an element behind keeps a forwarding pointer. A call reaching a PE that does not
//! hold its element is forwarded — along the forwarding pointer if there is one, otherwise to the
//! home — and the PE that finally delivers a forwarded call tells the sender where the element is,
//! so its next calls go there directly (the location cache).
//!
//! # Invariants
//!
//! * Exactly once: a call is delivered where the element is, or forwarded, or buffered at the home
//!   until the element's location is known — never dropped or duplicated. Calls that reach a PE
//!   the element is travelling to are ordered behind the migration message (both come from the
//!   PE the element left, and PE-to-PE channels are FIFO).
//! * No cycles: every location record carries the element's *epoch* (its migration count) and a
//!   record is only ever replaced by a newer one, so following records always goes forward in the
//!   element's history; a hop limit turns a broken invariant into an abort naming the element.
//! * Reductions and broadcasts count elements at their home PE (see [`crate::reduction`] and
//!   [`PeState::broadcast_unsettled`]), so migration never changes how many contributions or
//!   deliveries a PE expects.
//! * An element moves only between messages, never while one of its entry methods runs or is
//!   suspended, and never while `when` calls wait at it: a migration the program asked for waits
//!   until it is free; one a balancing step ordered is dropped (the element stays).

use crate::chare::Chare;
use crate::collection::{CollectionId, Shape};
use crate::ctx::Ctx;
use crate::element::{Element, ElementObj};
use crate::envelope::{Body, Control, CtxParts, Envelope, Invocation, Route};
use crate::index::Index;
use crate::scheduler::PeState;
use serde::{Deserialize, Serialize};
use std::rc::Rc;

/// Rebuilds a migrated element of a known chare type on its new PE.
pub(crate) type UnpackFn = fn(&mut Migrant, CtxParts) -> Result<Rc<dyn ElementObj>, String>;

/// Elements of one collection on a PE, with their indices.
type Residents = Vec<(Index, Rc<dyn ElementObj>)>;

/// A forwarded call that exceeds this many hops means a location invariant broke: abort. Hops
/// from a PE the element itself left (following its departure) do not count: a call chasing an
/// element that moves on every message makes one such hop per move, however many it takes.
const MAX_HOPS: u32 = 64;

/// An element on its way to another PE.
#[derive(Serialize, Deserialize)]
pub(crate) struct Migrant {
    pub(crate) coll: CollectionId,
    pub(crate) index: Index,
    /// The element's migration count, this migration included; 0 for an element read back
    /// from a checkpoint (`crate::checkpoint`).
    pub(crate) epoch: u32,
    /// Number of the element's next reduction contribution.
    pub(crate) reductions: u64,
    /// Measured load carried along (seconds).
    pub(crate) load: f64,
    /// The element's channels: sequence numbers and values not received yet.
    pub(crate) channels: Vec<crate::channel::ChannelEnd>,
    /// Number of the element's next contribution to each of its sections.
    pub(crate) sections: Vec<(CollectionId, u64)>,
    /// The chare's state, from [`Chare::pack`].
    #[serde(with = "crate::wire::byte_vec")]
    pub(crate) state: Vec<u8>,
    /// If a load-balancing step ordered the move: (root PE, step), told on arrival.
    pub(crate) balance: Option<(u32, u64)>,
}

/// A migration asked for, not done yet.
pub(crate) struct Request {
    pub(crate) coll: CollectionId,
    pub(crate) index: Index,
    pub(crate) to: usize,
    pub(crate) balance: Option<(u32, u64)>,
    /// A periodic load-balancing decision: dropped if the element is busy, like an AtSync one
    /// (a move the program asked for waits instead).
    pub(crate) periodic: bool,
}

/// The [`UnpackFn`] of chare type `C`.
pub(crate) fn unpack_element<C: Chare>(
    m: &mut Migrant,
    parts: CtxParts,
) -> Result<Rc<dyn ElementObj>, String> {
    // The user's `Deserialize` and `migrated` run here, outside any entry method: a panic in
    // them becomes an error the caller reports naming the element.
    let (chare, ctx) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut chare = C::unpack(&m.state)?;
        let ctx = Ctx::<C>::arrived(parts, m.reductions, &m.sections);
        chare.migrated(&ctx);
        Ok::<_, String>((chare, ctx))
    }))
    .unwrap_or_else(|payload| {
        Err(format!(
            "unpacking it or its `migrated` hook panicked: {}",
            crate::panic::describe(payload)
        ))
    })?;
    let element = Element::new(chare, ctx);
    element.add_load(m.load);
    element.set_channels(std::mem::take(&mut m.channels));
    Ok(Rc::new(element))
}

impl PeState {
    /// Where the location cache says element `index` of `coll` is, if it knows better than its
    /// home.
    #[inline]
    pub(crate) fn cached_location(&self, coll: CollectionId, index: &Index) -> Option<usize> {
        let locations = self.locations.borrow();
        if locations.is_empty() {
            return None;
        }
        locations.get(&(coll, *index)).map(|&(pe, _)| pe as usize)
    }

    /// Records that element `index` of `coll` is on `pe` since its `epoch`-th migration, unless
    /// a newer record exists. Returns whether the record changed.
    fn record_location(&self, coll: CollectionId, index: Index, pe: u32, epoch: u32) -> bool {
        let home = {
            let cols = self.collections.borrow();
            match cols.get(&coll) {
                Some(c) => c.shape.home_pe(&index, self.num_pes()) == self.pe,
                None => false,
            }
        };
        if home {
            let mut cols = self.collections.borrow_mut();
            let c = cols.get_mut(&coll).expect("checked above");
            if c.find(&index).is_some() {
                return false;
            }
            match c.away.get(&index) {
                Some(&(_, e)) if e >= epoch => false,
                _ => {
                    c.away.insert(index, (pe, epoch));
                    true
                }
            }
        } else {
            // A late update about an element that is here now would send this PE's own calls
            // to it round the PE it names (and nothing would correct that while it stays).
            let resident = self
                .collections
                .borrow()
                .get(&coll)
                .is_some_and(|c| c.find(&index).is_some());
            if resident {
                return false;
            }
            let mut locations = self.locations.borrow_mut();
            match locations.get(&(coll, index)) {
                Some(&(_, e)) if e >= epoch => false,
                _ => {
                    locations.insert((coll, index), (pe, epoch));
                    true
                }
            }
        }
    }

    /// A forwarded call reached its element here: tell the PE that sent it.
    pub(crate) fn correct_origin(&self, coll: CollectionId, index: Index, origin: usize) {
        if origin == self.pe || origin >= self.num_pes() {
            return;
        }
        let epoch = self
            .collections
            .borrow()
            .get(&coll)
            .and_then(|c| c.epochs.get(&index).copied())
            .unwrap_or(0);
        self.send(
            origin,
            Envelope::new(
                0,
                Control::Located {
                    coll,
                    index,
                    pe: self.pe as u32,
                    epoch,
                    inserted: false,
                },
            ),
        );
    }

    /// A call for an element this PE does not hold: forward it to where the element is, or buffer
    /// it at the home until that is known.
    pub(crate) fn not_here(&self, coll: CollectionId, index: Index, mut env: Envelope) {
        let (home, next, chare, migratable, departed_here) = {
            let cols = self.collections.borrow();
            let c = cols.get(&coll).expect("the caller found the collection");
            // An index the collection cannot have (out of a dense array's extents, the wrong
            // dimension count; only a message from another process can name one, proxies check)
            // would otherwise wait at the home forever.
            if let Err(e) = c.shape.check(&index, self.num_pes()) {
                let entry = match &env.body {
                    Body::Point { call, .. } => call.entry_name(),
                    _ => "?",
                };
                let chare = c.chare;
                drop(cols);
                return self.abort_job(format!(
                    "charmrs: PE {}: a message for entry `{entry}` names element {index} of \
                     {chare} collection {coll:?}, which it cannot have: {e}",
                    self.pe
                ));
            }
            let home = c.shape.home_pe(&index, self.num_pes());
            let next = if home == self.pe {
                c.away.get(&index).map(|&(pe, _)| pe as usize)
            } else {
                Some(
                    self.locations
                        .borrow()
                        .get(&(coll, index))
                        .map_or(home, |&(pe, _)| pe as usize),
                )
            };
            (
                home,
                next,
                c.chare,
                // A sparse array's element may live away from its home without ever migrating
                // (inserted on another PE): its calls are forwarded whatever the chare.
                c.mobility.migratable || matches!(c.shape, Shape::Sparse { .. }),
                c.departed.contains(&index),
            )
        };
        let entry = match &env.body {
            Body::Point { call, .. } => call.entry_name(),
            _ => "?",
        };
        if !migratable {
            return self.abort_job(format!(
                "charmrs: a message for entry `{entry}` reached PE {} for element {index} of {chare} \
                 collection {coll:?}, which is not on this PE",
                self.pe
            ));
        }
        match next {
            Some(to) if to != self.pe => {
                // At least 1 once forwarded: the delivering PE then corrects the origin's cache.
                let hops = if departed_here {
                    env.route.hops().max(1)
                } else {
                    env.route.hops() + 1
                };
                if hops > MAX_HOPS {
                    return self.abort_job(format!(
                        "charmrs: a message for entry `{entry}` of element {index} of {chare} was \
                         forwarded {MAX_HOPS} times without reaching it (PE {}, home PE {home})",
                        self.pe
                    ));
                }
                let origin = if env.route.is_set() {
                    env.route.origin()
                } else {
                    self.pe
                };
                env.route = Route::new(origin, hops);
                // Not a new message for quiescence detection's purposes: the forwarding PE counts
                // one more sent, the next PE one more processed.
                self.send_direct(to, env);
            }
            _ => {
                // At the home, location unknown: the element is being inserted or is on its way
                // — unless the array is sealed and the element was never inserted.
                let sealed = self.home_counts.borrow().contains_key(&coll);
                let mut cols = self.collections.borrow_mut();
                let c = cols.get_mut(&coll).expect("looked up above");
                if sealed && home == self.pe && c.never_inserted(&index) {
                    drop(cols);
                    return self
                        .abort_job(never_inserted_error(entry, index, chare, coll, self.pe));
                }
                c.lost.entry(index).or_default().push(env);
            }
        }
    }

    /// At `done_inserting`'s seal of sparse array `coll`: a call waiting here for an element
    /// that was never inserted ends the job (it would wait for ever).
    pub(crate) fn check_never_inserted(&self, coll: CollectionId) {
        let found = {
            let cols = self.collections.borrow();
            let Some(c) = cols.get(&coll) else { return };
            c.lost
                .iter()
                .filter(|(index, _)| c.never_inserted(index))
                .map(|(index, waiting)| {
                    let entry = match waiting.first().map(|env| &env.body) {
                        Some(Body::Point { call, .. }) => call.entry_name(),
                        _ => "?",
                    };
                    (*index, entry, c.chare)
                })
                .next()
        };
        if let Some((index, entry, chare)) = found {
            self.abort_job(never_inserted_error(entry, index, chare, coll, self.pe));
        }
    }

    /// At the home of sparse element `index`: notes that it was inserted on `pe`, or names the
    /// two PEs if it was inserted before (the announcements of the two insertions arrive here
    /// in either order, and either may arrive after the element has migrated: each insertion
    /// is announced exactly once, so a second announcement is a second element).
    pub(crate) fn record_insertion(
        &self,
        coll: CollectionId,
        index: Index,
        pe: u32,
    ) -> std::result::Result<(), String> {
        let sealed = self.home_counts.borrow().contains_key(&coll);
        let mut cols = self.collections.borrow_mut();
        let c = cols
            .get_mut(&coll)
            .expect("the caller found the collection");
        if sealed {
            return Err(format!(
                "charmrs: element {index} of {} was inserted on PE {pe} after done_inserting \
                 sealed the array (seen at its home, PE {})",
                c.chare, self.pe
            ));
        }
        match c.inserted_on.insert(index, pe) {
            None => Ok(()),
            Some(first) => Err(format!(
                "charmrs: element {index} of {} was inserted twice: on PE {first} and on PE {pe} \
                 (seen at its home, PE {})",
                c.chare, self.pe
            )),
        }
    }

    /// A location record from the PE that holds (or last held) an element; `inserted`: the
    /// announcement of a sparse element's insertion on `pe`, sent to its home.
    pub(crate) fn located(
        &self,
        coll: CollectionId,
        index: Index,
        pe: u32,
        epoch: u32,
        inserted: bool,
    ) {
        if pe as usize >= self.num_pes() {
            return self.abort_job(format!(
                "charmrs: PE {}: a location update puts element {index} of {coll:?} on unknown PE {pe}",
                self.pe
            ));
        }
        if !self.collections.borrow().contains_key(&coll) {
            // Not created here yet (the creation and this update took different paths).
            let env = Envelope::new(
                0,
                Control::Located {
                    coll,
                    index,
                    pe,
                    epoch,
                    inserted,
                },
            );
            return self.buffer_for(coll, env);
        }
        if inserted {
            if let Err(e) = self.record_insertion(coll, index, pe) {
                return self.abort_job(e);
            }
        }
        if self.record_location(coll, index, pe, epoch) {
            self.release_lost(coll, index);
        }
    }

    /// Forwards the calls buffered at the home for `index`, now that its location is known.
    pub(crate) fn release_lost(&self, coll: CollectionId, index: Index) {
        let waiting = self
            .collections
            .borrow_mut()
            .get_mut(&coll)
            .and_then(|c| c.lost.remove(&index));
        for env in waiting.into_iter().flatten() {
            self.redeliver(env);
        }
    }

    /// Delivers a broadcast on a PE where some elements are away from home or visiting: each
    /// element gets it from its home PE — directly if it is here, forwarded if it is away — so
    /// every element gets every broadcast exactly once, wherever it moves meanwhile. A result
    /// asked for (ret/gather) comes back from each away element on its own, announced by this
    /// PE's part (`PartialCount::Pe { extras }`), so the gather waits for all of them.
    pub(crate) fn broadcast_unsettled(
        &self,
        coll: CollectionId,
        chare: &'static str,
        priority: i32,
        call: Box<dyn Invocation>,
    ) {
        let (residents, away): (Residents, Vec<Index>) = {
            let cols = self.collections.borrow();
            let c = cols.get(&coll).expect("the caller found the collection");
            let n = self.num_pes();
            let residents = c
                .elements
                .iter()
                .filter(|(i, _)| c.shape.home_pe(i, n) == self.pe)
                .cloned()
                .collect();
            let mut away: Vec<Index> = c.away.keys().copied().collect();
            away.sort_unstable();
            (residents, away)
        };
        let extras = away.len() as u32;
        if !away.is_empty() {
            for index in away {
                let env = Envelope::new(
                    priority,
                    Body::Point {
                        coll,
                        index,
                        call: call.clone_box(),
                    },
                );
                self.redeliver(env);
            }
        }
        call.invoke_all(self, &residents, chare, extras);
    }

    /// Asks for element `index` of `coll` to move to PE `to` once the current message is done.
    pub(crate) fn request_migration(&self, request: Request) {
        self.migrations.borrow_mut().push(request);
    }

    /// Carries out the migrations asked for; those whose element is busy wait for a later turn.
    pub(crate) fn run_migrations(&self) {
        let requests = std::mem::take(&mut *self.migrations.borrow_mut());
        let mut waiting = Vec::new();
        for r in requests {
            if let Some(r) = self.migrate_now(r) {
                waiting.push(r);
            }
        }
        if !waiting.is_empty() {
            self.migrations.borrow_mut().extend(waiting);
        }
    }

    /// Moves one element; gives the request back if the element cannot move yet.
    fn migrate_now(&self, r: Request) -> Option<Request> {
        let found = {
            let cols = self.collections.borrow();
            cols.get(&r.coll).and_then(|c| {
                c.find(&r.index).map(|e| {
                    let home = c.shape.home_pe(&r.index, self.num_pes()) == self.pe;
                    let epoch = c.epochs.get(&r.index).copied().unwrap_or(0);
                    (e, c.chare, home, epoch)
                })
            })
        };
        let Some((element, chare, home, epoch)) = found else {
            // Not here (it moved already): an LB order still counts as done.
            if let Some((root, step)) = r.balance {
                self.balance_arrived(root as usize, r.coll, step);
            }
            return None;
        };
        if r.to == self.pe {
            if let Some((root, step)) = r.balance {
                self.balance_arrived(root as usize, r.coll, step);
            }
            return None;
        }
        // Location records are ordered by migration count: one that wrapped would be taken for
        // an old one, and forwarding would follow stale records.
        let Some(next_epoch) = epoch.checked_add(1) else {
            self.abort_job(format!(
                "charmrs: element {} of {chare} has migrated {epoch} times, the most one element \
                 may",
                r.index
            ));
            return None;
        };
        // The table holds one reference; `element` another. More means a suspended entry (or
        // a pending `when` re-check) still uses it.
        if Rc::strong_count(&element) > 2 || element.pinned() {
            // A balancing step does not wait for a busy element (it may wait for messages that
            // only come after the step): it stays, and the step goes on. A move the program
            // asked for waits until the element is free.
            if let Some((root, step)) = r.balance {
                self.balance_arrived(root as usize, r.coll, step);
                return None;
            }
            if r.periodic {
                return None;
            }
            return Some(r);
        }
        let state = match element.pack() {
            Ok(s) => s,
            Err(e) => {
                self.abort_job(format!(
                    "charmrs: migrating element {} of {chare} from PE {} to PE {}: {e}",
                    r.index, self.pe, r.to
                ));
                return None;
            }
        };
        let mut channels = element.leave_channels();
        if self.is_remote(r.to) {
            // Values not received yet are encoded here, where a panic in their `Serialize` is
            // caught and named, not later inside the migration message's encoding.
            if let Err(e) = crate::channel::encode_values(&mut channels) {
                self.abort_job(format!(
                    "charmrs: migrating element {} of {chare} from PE {} to PE {}: {e}",
                    r.index, self.pe, r.to
                ));
                return None;
            }
        }
        let (reductions, sections) = element.leave_counts();
        let migrant = Migrant {
            coll: r.coll,
            index: r.index,
            epoch: next_epoch,
            reductions,
            load: element.load(),
            channels,
            sections,
            state,
            balance: r.balance,
        };
        {
            let mut cols = self.collections.borrow_mut();
            let c = cols.get_mut(&r.coll).expect("found above");
            c.remove(&r.index, home);
            c.epochs.remove(&r.index);
            // Not bounded: forgetting an element here would make calls that follow its
            // departure count as hops, and a long chain of such PEs abort a healthy job. It
            // grows no faster than the location record every departure leaves (`away` at the
            // home, `locations` elsewhere), one entry per element that left and never came back.
            c.departed.insert(r.index);
        }
        // The copy left here goes (its state travels packed): a panic in its `Drop` ends the job
        // naming it, not as a failure outside any entry method.
        if let Err(why) = crate::panic::drop_caught(element) {
            self.abort_job(format!(
                "charmrs: job aborted: dropping element {} of {chare} on PE {} after it \
                 migrated to PE {} panicked: {why}",
                r.index, self.pe, r.to
            ));
            return None;
        }
        self.record_location(r.coll, r.index, r.to as u32, next_epoch);
        self.send_direct(
            r.to,
            Envelope::new(
                crate::envelope::MIGRATION_ORDER,
                Control::Migrate(Box::new(migrant)),
            ),
        );
        None
    }

    /// An element arrives: rebuild it, tell its home, deliver what waited for it.
    pub(crate) fn arrive(&self, mut m: Migrant) {
        let coll = m.coll;
        let index = m.index;
        let known = self
            .collections
            .borrow()
            .get(&coll)
            .map(|c| (c.mobility, c.shape, c.chare));
        let Some((mobility, shape, chare)) = known else {
            // The collection's creation has not reached this PE yet: wait for it.
            return self.buffer_for(
                coll,
                Envelope::new(
                    crate::envelope::MIGRATION_ORDER,
                    Control::Migrate(Box::new(m)),
                ),
            );
        };
        // Only a message from another process can carry an index the collection cannot have.
        if let Err(e) = shape.check(&index, self.num_pes()) {
            return self.abort_job(format!(
                "charmrs: PE {}: an element of {chare} arrived with a bad index: {e}",
                self.pe
            ));
        }
        let parts = CtxParts {
            coll,
            index,
            shape,
            pe: self.pe,
        };
        // Epoch 0: read back from a checkpoint (a migration counts from 1), so the proxies in
        // its state name homes under the PE count of the job that saved it.
        let restored = m.epoch == 0;
        let origin = if restored {
            " (restored from a checkpoint)"
        } else {
            ""
        };
        let present = self
            .collections
            .borrow()
            .get(&coll)
            .is_some_and(|c| c.find(&index).is_some());
        if present {
            // Exactly once: an element never arrives where it already is.
            return self.abort_job(format!(
                "charmrs: element {index} of {chare} arrived on PE {}{origin}, which holds it \
                 already",
                self.pe
            ));
        }
        let unpacked = if restored {
            crate::checkpoint::rehoming(|| (mobility.unpack)(&mut m, parts))
        } else {
            (mobility.unpack)(&mut m, parts)
        };
        let element = match unpacked {
            Ok(e) => e,
            Err(e) => {
                return self.abort_job(format!(
                    "charmrs: element {index} of {chare} arriving on PE {}{origin}: {e}",
                    self.pe
                ))
            }
        };
        let home_pe = shape.home_pe(&index, self.num_pes());
        if restored && matches!(shape, Shape::Sparse { .. }) && home_pe == self.pe {
            // Its home catches a later second insertion of the index, as after an insert.
            if let Err(e) = self.record_insertion(coll, index, self.pe as u32) {
                return self.abort_job(e);
            }
        }
        {
            let mut cols = self.collections.borrow_mut();
            let c = cols.get_mut(&coll).expect("looked up above");
            c.insert(index, element, home_pe == self.pe);
            c.epochs.insert(index, m.epoch);
            c.away.remove(&index);
            c.departed.remove(&index);
        }
        self.locations.borrow_mut().remove(&(coll, index));
        if home_pe != self.pe {
            self.send(
                home_pe,
                Envelope::new(
                    0,
                    Control::Located {
                        coll,
                        index,
                        pe: self.pe as u32,
                        epoch: m.epoch,
                        inserted: false,
                    },
                ),
            );
        }
        if let Some((root, step)) = m.balance {
            self.balance_arrived(root as usize, coll, step);
        }
        self.release_lost(coll, index);
    }
}

/// The abort of a call to sparse element `index`, which was never inserted.
fn never_inserted_error(
    entry: &str,
    index: Index,
    chare: &str,
    coll: CollectionId,
    pe: usize,
) -> String {
    format!(
        "charmrs: a message for entry `{entry}` names element {index} of sparse array of \
         {chare} {coll:?}, which was never inserted (done_inserting sealed the array; seen at \
         its home, PE {pe})"
    )
}
