//! Quiescence detection: [`start_qd`] / [`wait_qd`] (charm4py's `charm.startQD` / `waitQD`).
//!
//! Every PE counts the application messages it sent and the ones it processed (runtime control
//! traffic — task wake-ups and this module's own probes — is not counted). PE 0 runs waves: it asks
//! every PE for its two counters and sums them. The job is quiescent when, in two consecutive waves,
//! the sums are equal (nothing in flight) and unchanged (nothing happened in between) — the
//! four-counter method. Then every requester is told, and reaches its own target (targets stay
//! on the PE that registered them, so they never need to travel). A request that arrives while a
//! wave is being collected is answered only by a later pair of waves: the wave under way may
//! have counted the requester's PE before the sends it made just before asking. Invariant: a wave is in
//! progress exactly while requests are waiting; waves are spaced by [`WAVE_GAP`] so a busy job is
//! not flooded with probes.

use crate::envelope::{Control, Envelope};
use crate::future::{encode_value, Future};
use crate::reduction::{Target, TargetSpec};
use crate::scheduler::{with_pe, PeState};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

/// Pause between two waves that did not find quiescence.
pub const WAVE_GAP: Duration = Duration::from_micros(50);

/// The wave coordinator's state (meaningful on PE 0 only).
#[derive(Default)]
pub(crate) struct QdState {
    /// On every PE: this PE's own targets, by token.
    targets: FxHashMap<u64, TargetSpec>,
    next_token: u64,
    /// On PE 0: who asked (PE, token) before the wave being collected began.
    waiting: Vec<(u32, u64)>,
    /// On PE 0: who asked while a wave was being collected. That wave may have counted the
    /// requester's PE before the requester's last sends; only a wave begun after the request can
    /// conclude for it, so these join `waiting` when the next wave begins.
    late: Vec<(u32, u64)>,
    in_wave: bool,
    /// Replies to the current wave's probes (all of them between two waves).
    replies: usize,
    sums: (u64, u64),
    previous: Option<(u64, u64)>,
}

/// Reaches `target` (a `Future<()>` or a callback) once the whole job is quiescent: no PE is
/// processing an application message and none is in flight.
///
/// # Panics
/// Outside a running PE.
pub fn start_qd(target: impl Into<Target<()>>) {
    let spec = target.into().spec();
    with_pe("start_qd", |pe| {
        let token = {
            let mut qd = pe.qd.borrow_mut();
            qd.next_token += 1;
            let token = qd.next_token;
            qd.targets.insert(token, spec);
            token
        };
        pe.send(
            0,
            Envelope::new(
                0,
                Control::QdStart {
                    from: pe.pe as u32,
                    token,
                },
            ),
        )
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Suspends until the job is quiescent (see [`start_qd`]).
///
/// ```
/// use charmrs::prelude::*;
///
/// struct Ring { calls: u32 }
///
/// #[chare]
/// impl Ring {
///     fn new() -> Self { Ring { calls: 0 } }
///
///     #[entry]
///     fn pass(&mut self, ctx: &Ctx<Self>, left: u32) {
///         self.calls += 1;
///         if left > 0 {
///             let next = (ctx.index::<usize>() + 1) % 4;
///             ctx.this_proxy().at(next).pass(left - 1);
///         }
///     }
///
///     #[entry]
///     fn calls(&self) -> u32 { self.calls }
/// }
///
/// fn main() {
///     charmrs::Runtime::new(2).run(|_| async {
///         let ring = Array::<Ring, usize>::new(4, ());
///         ring.at(0).pass(99);                 // 100 calls, each sent by the one before
///         charmrs::wait_qd().await;            // all of them have run
///         let calls: Vec<u32> = ring.gather().calls().await;
///         assert_eq!(calls, vec![25; 4]);
///         charmrs::exit(0);
///     }).unwrap();
/// }
/// ```
pub async fn wait_qd() {
    let done = Future::<()>::new();
    start_qd(done);
    done.await
}

/// Work in progress that quiescence must wait for although no message of it is in flight: a
/// task on this PE that will release messages already counted as processed (a sparse array's
/// `done_inserting`, whose census can take rounds with timer pauses between them, while
/// broadcasts and reductions wait for its seal). It counts as one message sent while it lives
/// and processed when dropped.
pub(crate) struct QdHold {
    pe: usize,
}

impl QdHold {
    /// Holds quiescence off on the calling PE.
    ///
    /// # Panics
    /// Outside a running PE.
    pub(crate) fn new(what: &'static str) -> QdHold {
        let pe = with_pe(what, |pe| {
            pe.count_sent();
            pe.pe
        })
        .unwrap_or_else(|e| panic!("{e}"));
        QdHold { pe }
    }
}

impl Drop for QdHold {
    fn drop(&mut self) {
        // On the PE that made it (a task stays on its PE); nothing to do once the PE is gone
        // (the job is ending).
        let _ = with_pe("QdHold", |pe| {
            debug_assert_eq!(pe.pe, self.pe, "a QdHold dropped on another PE");
            pe.count_processed();
        });
    }
}

/// Posts a `QdWave` to PE 0 when a wave's pause is over.
struct NextWave(Arc<crate::scheduler::Shared>);

impl Wake for NextWave {
    fn wake(self: Arc<Self>) {
        if let Some(m) = self.0.mailbox(0) {
            m.push(Envelope::new(0, Control::QdWave));
        }
    }
}

impl PeState {
    /// Handles the quiescence-detection control messages.
    pub(crate) fn quiescence(&self, msg: Control) {
        match msg {
            Control::QdStart { from, .. } if self.pe != 0 || from as usize >= self.num_pes() => {
                // Waves run from PE 0 only, and their result goes back to `from`.
                self.abort_job(format!(
                    "charmrs: quiescence detection: PE {} got a request from PE {from} meant for \
                     PE 0 of a job of {} PEs (a damaged message from another process)",
                    self.pe,
                    self.num_pes()
                ));
            }
            Control::QdStart { from, token } => {
                let mut qd = self.qd.borrow_mut();
                // A wave's probes are out and not all answered.
                let collecting = qd.in_wave && qd.replies < self.num_pes();
                if collecting {
                    qd.late.push((from, token));
                } else {
                    qd.waiting.push((from, token));
                }
                if !qd.in_wave {
                    qd.in_wave = true;
                    drop(qd);
                    self.qd_wave();
                }
            }
            Control::QdWave => self.qd_wave(),
            Control::QdProbe => {
                let (sent, processed) = self.message_counts();
                self.send(0, Envelope::new(0, Control::QdCounts { sent, processed }));
            }
            Control::QdCounts { sent, processed } => {
                let mut qd = self.qd.borrow_mut();
                if !qd.in_wave || self.pe != 0 {
                    drop(qd);
                    return self.abort_job(format!(
                        "charmrs: quiescence detection: PE {} got message counts no wave asked \
                         for (a damaged message from another process)",
                        self.pe
                    ));
                }
                let sums = qd
                    .sums
                    .0
                    .checked_add(sent)
                    .zip(qd.sums.1.checked_add(processed));
                let Some((sent, processed)) = sums else {
                    drop(qd);
                    return self.abort_job(
                        "charmrs: quiescence detection: message counts beyond 2^64 (a damaged \
                         message from another process)"
                            .into(),
                    );
                };
                qd.replies += 1;
                qd.sums = (sent, processed);
                if qd.replies < self.num_pes() {
                    return;
                }
                let sums = qd.sums;
                if sums.0 == sums.1 && qd.previous == Some(sums) {
                    let waiting = std::mem::take(&mut qd.waiting);
                    if qd.late.is_empty() {
                        qd.in_wave = false;
                        qd.previous = None;
                    } else {
                        // This wave is the first of the two the late requests need.
                        self.next_wave_later();
                    }
                    drop(qd);
                    for (from, token) in waiting {
                        self.send(from as usize, Envelope::new(0, Control::QdDone { token }));
                    }
                } else {
                    qd.previous = Some(sums);
                    drop(qd);
                    self.next_wave_later();
                }
            }
            Control::QdDone { token } => {
                let target = self.qd.borrow_mut().targets.remove(&token);
                match target {
                    Some(t) => self.reach(t, Box::new(()), encode_value::<()>),
                    None => self.abort_job(format!(
                        "charmrs: quiescence reported for an unknown request #{token} on PE {}",
                        self.pe
                    )),
                }
            }
            _ => unreachable!("only quiescence messages come here"),
        }
    }

    /// Starts the next wave after [`WAVE_GAP`].
    fn next_wave_later(&self) {
        let waker = Waker::from(Arc::new(NextWave(self.shared.clone())));
        let _ = self.add_timer(Instant::now() + WAVE_GAP, waker);
    }

    fn qd_wave(&self) {
        {
            let mut qd = self.qd.borrow_mut();
            qd.replies = 0;
            qd.sums = (0, 0);
            let late = std::mem::take(&mut qd.late);
            qd.waiting.extend(late);
        }
        for dst in 0..self.num_pes() {
            self.send(dst, Envelope::new(0, Control::QdProbe));
        }
    }
}
