//! `when`-buffered messages: a call whose condition does not hold yet waits at its element and is
//! delivered once the condition holds (charm4py's `@when`).
//!
//! Conditions are re-checked after every entry method (and every `Coro::with`) on the element.
//! Equality conditions `self.field == arg` are indexed by the hash of the argument, so a re-check
//! costs one lookup per such entry instead of one test per buffered message; other conditions are
//! tested in arrival order. Invariants: among the buffered messages whose condition holds, the
//! earliest arrival is delivered first; each buffered message is delivered exactly once; the full
//! condition is evaluated before delivery (a hash match alone never delivers).

use crate::chare::{Chare, Entry};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// A buffered call, type-erased over its entry.
pub(crate) trait PendingWhen<C> {
    fn entry_id(&self) -> u64;
    /// The hash of the compared argument, for an indexed equality condition.
    fn key(&self) -> Option<u64>;
    fn ready(&self, chare: &C) -> bool;
    /// Delivers the call (its condition held).
    fn run(
        self: Box<Self>,
        pe: &crate::scheduler::PeState,
        element: Rc<crate::element::Element<C>>,
    );
}

/// Hashes the chare field an equality condition compares with.
type StateKeyFn<C> = fn(&C) -> u64;

/// The buffered calls of one element.
pub(crate) struct WhenBuffer<C> {
    next_seq: u64,
    calls: BTreeMap<u64, Box<dyn PendingWhen<C>>>,
    /// Equality-indexed calls: (entry id, argument hash) → arrival numbers.
    keyed: FxHashMap<(u64, u64), BTreeSet<u64>>,
    /// Entries with keyed calls pending, with how to hash the compared state, and how many.
    keyed_entries: FxHashMap<u64, (StateKeyFn<C>, usize)>,
    /// Arrival numbers of calls whose condition is not an indexed equality.
    scanned: BTreeSet<u64>,
}

impl<C: Chare> Default for WhenBuffer<C> {
    fn default() -> Self {
        WhenBuffer {
            next_seq: 0,
            calls: BTreeMap::new(),
            keyed: FxHashMap::default(),
            keyed_entries: FxHashMap::default(),
            scanned: BTreeSet::new(),
        }
    }
}

impl<C: Chare> WhenBuffer<C> {
    pub(crate) fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Buffers a call of entry `E` whose `arg_key` is `key`.
    pub(crate) fn push<E: Entry<C>>(&mut self, key: Option<u64>, call: Box<dyn PendingWhen<C>>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.calls.insert(seq, call);
        match key {
            Some(k) => {
                self.keyed.entry((E::ID, k)).or_default().insert(seq);
                self.keyed_entries
                    .entry(E::ID)
                    .or_insert((E::state_key, 0))
                    .1 += 1;
            }
            None => {
                self.scanned.insert(seq);
            }
        }
    }

    /// Takes the earliest buffered call whose condition holds on `chare`, if any.
    pub(crate) fn take_ready(&mut self, chare: &C) -> Option<Box<dyn PendingWhen<C>>> {
        let mut best: Option<u64> = None;
        for (&entry, &(state_key, _)) in &self.keyed_entries {
            if let Some(seqs) = self.keyed.get(&(entry, state_key(chare))) {
                // A hash match is a candidate; the full condition decides.
                if let Some(&seq) = seqs.iter().find(|s| self.calls[s].ready(chare)) {
                    best = Some(best.map_or(seq, |b| b.min(seq)));
                }
            }
        }
        let earlier = |s: &&u64| best.is_none_or(|b| **s < b);
        if let Some(&seq) = self
            .scanned
            .iter()
            .take_while(earlier)
            .find(|s| self.calls[s].ready(chare))
        {
            best = Some(seq);
        }
        let seq = best?;
        let call = self.calls.remove(&seq).expect("indexed calls are buffered");
        if !self.scanned.remove(&seq) {
            let entry = call.entry_id();
            let slot = (entry, call.key().expect("an indexed call has a key"));
            if let Some(seqs) = self.keyed.get_mut(&slot) {
                seqs.remove(&seq);
                if seqs.is_empty() {
                    self.keyed.remove(&slot);
                }
            }
            if let Some(count) = self.keyed_entries.get_mut(&entry) {
                count.1 -= 1;
                if count.1 == 0 {
                    self.keyed_entries.remove(&entry);
                }
            }
        }
        Some(call)
    }
}

/// Hash of a `when` key (the compared argument, or the chare field it is compared with).
pub fn hash_key<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(value)
}
