//! Sparse arrays: elements inserted one by one (`Array::insert`), then `done_inserting`.
//!
//! # What this module owns
//!
//! * How many elements have their home on each PE, for the collections whose placement the
//!   runtime cannot count from the shape alone (mapped dense arrays: computed once; sparse
//!   arrays: established by `done_inserting`) — reductions need it to know what to wait for.
//! * The `done_inserting` census: the requesting PE asks every PE how many insertions it issued
//!   and how many insertions of elements homed there were announced to it; when the two sums
//!   agree every insertion is in place and its home knows it, and
//!   the per-PE counts are sealed on every PE. Otherwise it asks again a little later.
//!
//! Invariants: a reduction over a sparse array that reaches a PE before the seal waits there
//! (never completes early or with a wrong count); an insertion issued by a PE that has seen the
//! seal is an error naming the array. What waits here for an insertion or for the seal is named
//! by [`PeState::waiting_for_insertions`] (a checkpoint, which does not save it, refuses to run
//! while anything does).

use crate::collection::{CollectionId, Shape};
use crate::envelope::{Body, Control, Envelope};
use crate::reduction::Incoming;
use crate::scheduler::LocalCollection;
use crate::scheduler::PeState;
use std::rc::Rc;

/// Reduction traffic that waits for a sparse array's seal.
pub(crate) struct Deferred {
    seq: u64,
    shape: Shape,
    incoming: Incoming,
}

impl PeState {
    /// (elements whose home is this PE, PEs with at least one) of `coll`, or `None` for a sparse
    /// array that is not sealed here yet.
    pub(crate) fn membership(
        &self,
        coll: CollectionId,
        shape: &Shape,
    ) -> Option<(usize, Vec<usize>)> {
        let n = self.num_pes();
        if !shape.counted_by_pe() && !coll.is_section() {
            return Some((shape.local_count(self.pe, n), shape.member_pes(n)));
        }
        let counts = self.counts_by_home(coll, shape)?;
        let members = (0..n).filter(|&p| counts[p] > 0).collect();
        Some((counts[self.pe] as usize, members))
    }

    /// The first half of [`membership`](Self::membership) alone (no member list built): how many
    /// elements of `coll` have their home on this PE.
    pub(crate) fn homes_here(&self, coll: CollectionId, shape: &Shape) -> Option<usize> {
        if !shape.counted_by_pe() && !coll.is_section() {
            return Some(shape.local_count(self.pe, self.num_pes()));
        }
        Some(self.counts_by_home(coll, shape)?[self.pe] as usize)
    }

    /// Elements per home PE of a mapped dense or sparse array or a section (computed once for a
    /// dense array), or `None` for a sparse array or section that is not sealed here yet.
    fn counts_by_home(&self, coll: CollectionId, shape: &Shape) -> Option<Rc<[u32]>> {
        let known = self.home_counts.borrow().get(&coll).cloned();
        match known {
            Some(c) => Some(c),
            None if matches!(shape, Shape::Array { .. }) && !coll.is_section() => {
                let c: Rc<[u32]> = shape.home_counts(self.num_pes()).into();
                self.home_counts.borrow_mut().insert(coll, c.clone());
                Some(c)
            }
            None => None,
        }
    }

    /// Keeps reduction traffic for sparse array `coll` until it is sealed here.
    pub(crate) fn wait_for_seal(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        incoming: Incoming,
    ) {
        self.unsealed
            .borrow_mut()
            .entry(coll)
            .or_default()
            .push(Deferred {
                seq,
                shape,
                incoming,
            });
    }

    /// Counts an insertion issued by this PE; fails if the array is sealed already.
    pub(crate) fn count_insert(&self, coll: CollectionId) -> crate::Result<()> {
        if self.home_counts.borrow().contains_key(&coll) {
            return Err(crate::Error::Options(format!(
                "insert into sparse array {coll:?} after done_inserting"
            )));
        }
        *self.inserts_issued.borrow_mut().entry(coll).or_default() += 1;
        Ok(())
    }

    /// Answers a `done_inserting` census.
    pub(crate) fn census(&self, coll: CollectionId, reply: (u32, u64)) {
        let issued = self
            .inserts_issued
            .borrow()
            .get(&coll)
            .copied()
            .unwrap_or(0);
        // The elements homed here are the insertions announced here (each is announced to its
        // home once, when its construction starts). Not the elements known to be here or away:
        // an element that moved on before its home heard of its insertion may be located here
        // already (a location notice overtook the insertion's, across processes), and counting
        // it would seal the array before the insertion's notice, which would then abort the job.
        let homed = self
            .collections
            .borrow()
            .get(&coll)
            .map_or(0, |c| c.inserted_on.len());
        self.fulfil(
            reply.0 as usize,
            reply.1,
            Ok(Box::new((issued, homed as u64))),
            crate::future::encode_value::<(u64, u64)>,
        );
    }

    /// Every insertion is in place: record the counts and run the reductions that waited.
    pub(crate) fn seal(&self, coll: CollectionId, counts: Vec<u32>) {
        if counts.len() != self.num_pes() {
            return self.abort_job(format!(
                "charmrs: sealing {coll:?} (done_inserting or a section): {} counts for {} PEs",
                counts.len(),
                self.num_pes()
            ));
        }
        // An insertion issued after the census counted its PE, whose home learnt of it before
        // this seal: the sealed count would leave its contributions out (or complete a reduction
        // twice).
        let known = self
            .collections
            .borrow()
            .get(&coll)
            .filter(|c| matches!(c.shape, crate::collection::Shape::Sparse { .. }))
            .map(|c| (c.inserted_on.len(), c.chare));
        if let Some((known, chare)) = known {
            let counted = counts[self.pe] as usize;
            if known > counted {
                return self.abort_job(format!(
                    "charmrs: sparse array of {chare} {coll:?}: PE {} is home to {known} \
                     inserted elements but done_inserting counted {counted}: an element was \
                     inserted after done_inserting was called",
                    self.pe
                ));
            }
        }
        self.home_counts.borrow_mut().insert(coll, counts.into());
        self.check_never_inserted(coll);
        let waiting = self.unsealed.borrow_mut().remove(&coll);
        for d in waiting.into_iter().flatten() {
            self.reduce(coll, d.seq, d.shape, d.incoming);
        }
        let broadcasts = self
            .collections
            .borrow_mut()
            .get_mut(&coll)
            .map(|c| std::mem::take(&mut c.unsealed_broadcasts))
            .unwrap_or_default();
        for env in broadcasts {
            self.deliver(env);
        }
    }

    /// What of sparse array `coll` (`c` here) waits on this PE for an insertion or for
    /// `done_inserting`'s seal, described for an error: a call at the home of an element not
    /// inserted yet, a broadcast, or reduction traffic. `None` if nothing does.
    pub(crate) fn waiting_for_insertions(
        &self,
        coll: CollectionId,
        c: &LocalCollection,
    ) -> Option<String> {
        if let Some((index, waiting)) = c.lost.iter().find(|(_, w)| !w.is_empty()) {
            let entry = match waiting.first().map(|env| &env.body) {
                Some(Body::Point { call, .. }) => call.entry_name(),
                _ => "?",
            };
            return Some(format!(
                "a call to {entry} of element {index} waits on PE {}, its home, for the \
                 element's insertion",
                self.pe
            ));
        }
        if !c.unsealed_broadcasts.is_empty() {
            return Some(format!(
                "a broadcast to sparse array {} waits on PE {} for done_inserting",
                c.chare, self.pe
            ));
        }
        if self
            .unsealed
            .borrow()
            .get(&coll)
            .is_some_and(|w| !w.is_empty())
        {
            return Some(format!(
                "a reduction over sparse array {} waits on PE {} for done_inserting",
                c.chare, self.pe
            ));
        }
        None
    }

    /// Seals `coll` here at once (so the caller of `done_inserting` sees it sealed) and sends the
    /// seal to every other PE.
    pub(crate) fn broadcast_seal(&self, coll: CollectionId, counts: Vec<u32>) {
        let all: Vec<usize> = (0..self.num_pes()).collect();
        self.seal_on(coll, counts, &all);
    }

    /// Seals `coll` on PEs `to`: here at once if this PE is one of them, by message elsewhere.
    pub(crate) fn seal_on(&self, coll: CollectionId, counts: Vec<u32>, to: &[usize]) {
        for &dst in to.iter().filter(|&&p| p != self.pe) {
            self.send(
                dst,
                Envelope::new(
                    0,
                    Control::Seal {
                        coll,
                        counts: counts.clone(),
                    },
                ),
            );
        }
        if to.contains(&self.pe) {
            self.seal(coll, counts);
        }
    }
}
