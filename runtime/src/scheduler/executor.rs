//! The PE-local executor: futures that run on one PE (the program's entry point now, suspendable
//! entry methods later) and are resumed by messages.
//!
//! A task's waker does not poll anything itself: it posts a `Resume` envelope to the owning PE
//! (its local queue when woken on that PE's thread, else its mailbox), so a task only ever runs
//! on its PE's thread, between other messages. Invariants: a
//! slot's `generation` changes when its task ends, so a stale waker's `Resume` is ignored; at most
//! one `Resume` per task is in flight (`queued` flag); the slab is never borrowed across a poll, so
//! a task may spawn tasks.

use super::shared::Shared;
use crate::envelope::{Body, Envelope, LocalTask};
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

struct TaskWaker {
    shared: Arc<Shared>,
    pe: usize,
    slot: u32,
    generation: u32,
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let env = Envelope::new(
                0,
                Body::Resume {
                    slot: self.slot,
                    generation: self.generation,
                },
            );
            // Woken on its own PE's thread: into the local queue, behind what arrived before.
            if let Some(env) = super::pe::queue_resume_if_current(self.pe, env) {
                self.shared
                    .mailbox(self.pe)
                    .expect("tasks run on PEs of this process")
                    .push(env);
            }
        }
    }
}

/// A task's name in traces: the entry method it runs (`Chare::entry`), `main`, or what else.
pub(crate) type TaskLabel = &'static str;

struct Slot {
    generation: u32,
    task: Option<LocalTask>,
    waker: Option<Arc<TaskWaker>>,
    label: TaskLabel,
}

/// The task slab of one PE.
#[derive(Default)]
pub(crate) struct Executor {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// The task being polled (slot, generation), if any.
    current: Cell<Option<(u32, u32)>>,
}

impl Executor {
    /// Stores `task` and polls it once right away.
    pub(crate) fn spawn(&self, shared: &Arc<Shared>, pe: usize, task: LocalTask, label: TaskLabel) {
        let slot = {
            let mut slots = self.slots.borrow_mut();
            let index = match self.free.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    slots.push(Slot {
                        generation: 0,
                        task: None,
                        waker: None,
                        label,
                    });
                    (slots.len() - 1) as u32
                }
            };
            let s = &mut slots[index as usize];
            s.task = Some(task);
            s.label = label;
            s.waker = Some(Arc::new(TaskWaker {
                shared: shared.clone(),
                pe,
                slot: index,
                generation: s.generation,
                queued: AtomicBool::new(false),
            }));
            (index, s.generation)
        };
        self.resume(slot.0, slot.1);
    }

    /// The label of task `slot` if it still is the task of `generation` (also while, or after,
    /// a poll of it panicked: its slot keeps the label).
    pub(crate) fn label(&self, slot: u32, generation: u32) -> Option<TaskLabel> {
        self.slots
            .borrow()
            .get(slot as usize)
            .filter(|s| s.generation == generation)
            .map(|s| s.label)
    }

    /// The task being polled, if any (its slot and generation).
    pub(crate) fn current(&self) -> Option<(u32, u32)> {
        self.current.get()
    }

    /// Whether `task` (slot, generation) has not ended.
    pub(crate) fn is_live(&self, (slot, generation): (u32, u32)) -> bool {
        self.label(slot, generation).is_some()
    }

    /// Polls task `slot` if it still is the task of `generation`; returns its label if it did.
    pub(crate) fn resume(&self, slot: u32, generation: u32) -> Option<TaskLabel> {
        let taken = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(slot as usize) {
                Some(s) if s.generation == generation => {
                    s.task.take().zip(s.waker.clone()).map(|t| (t, s.label))
                }
                _ => None,
            }
        };
        let ((mut task, waker), label) = taken?;
        waker.queued.store(false, Ordering::Release);
        let std_waker = Waker::from(waker);
        let mut cx = Context::from_waker(&std_waker);
        let outer = self.current.replace(Some((slot, generation)));
        let polled = catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(&mut cx)));
        self.current.set(outer);
        let done = match polled {
            Ok(poll) => poll.is_ready(),
            Err(payload) => {
                // Dropped before the unwind goes on (a panic in its destructor while unwinding
                // would abort the process); the poll's panic is the one reported.
                let _ = crate::panic::drop_caught(task);
                std::panic::resume_unwind(payload)
            }
        };
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot as usize];
        if done {
            s.generation = s.generation.wrapping_add(1);
            s.waker = None;
            drop(slots);
            self.free.borrow_mut().push(slot);
        } else {
            s.task = Some(task);
        }
        Some(label)
    }

    /// Drops every task (at shutdown), one at a time, each under `catch_unwind`: a task whose
    /// destructor panics is reported to `on_panic` with its label and the panic, and the others
    /// are still dropped.
    pub(crate) fn clear_each(&self, mut on_panic: impl FnMut(TaskLabel, String)) {
        let slots: Vec<_> = self.slots.borrow_mut().drain(..).collect();
        for slot in slots {
            let label = slot.label;
            if let Err(why) = crate::panic::drop_caught(slot) {
                on_panic(label, why);
            }
        }
    }
}
