//! The lock around the UCX worker.
//!
//! # What this module owns
//!
//! [`SpinMutex`]: a mutual-exclusion lock whose uncontended lock is one
//! compare-and-swap and whose unlock is one plain release store. The worker
//! lock is taken on every `progress` call, millions of times a second by a
//! spinning PE, and almost never contended (a send from another PE of the
//! same process); `std::sync::Mutex` costs a second locked instruction per
//! call (its unlock swaps, to find sleepers), measured on this VM as a
//! large share of an idle progress call.
//!
//! # Invariants
//!
//! * At most one [`SpinGuard`] exists at a time; the protected value is
//!   reachable only through it.
//! * A waiter spins briefly, then yields its core, then sleeps in short
//!   naps: a thread holding the lock across a long UCX call (a large copy
//!   inside progress) does not have another thread burn a core for it.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct SpinMutex<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard
// exists at a time (acquire/release ordering on `locked` hands the value
// from one holder to the next), exactly like `std::sync::Mutex<T>`, which is
// `Sync` for `T: Send`.
unsafe impl<T: Send> Sync for SpinMutex<T> {}
// SAFETY: moving the lock moves the value, which is `Send`.
unsafe impl<T: Send> Send for SpinMutex<T> {}

/// Access to the value of a held [`SpinMutex`]; unlocks on drop.
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinMutex<T>,
    /// Not `Send` and not automatically `Sync` (its `Sync` would otherwise follow from
    /// `&SpinMutex<T>`'s, i.e. `T: Send`, while it hands out `&T`): see the impl below.
    _not_auto: std::marker::PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T` only (`DerefMut` needs `&mut` guard), which is safe
// across threads exactly when `T: Sync`, as for `std::sync::MutexGuard`.
unsafe impl<T: Sync> Sync for SpinGuard<'_, T> {}

impl<T> SpinMutex<T> {
    pub(crate) fn new(value: T) -> SpinMutex<T> {
        SpinMutex {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock if it is free.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        if !self.locked.load(Ordering::Relaxed)
            && self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            Some(SpinGuard {
                lock: self,
                _not_auto: std::marker::PhantomData,
            })
        } else {
            None
        }
    }

    /// Takes the lock, waiting for it (spin, then yield, then nap).
    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        if let Some(g) = self.try_lock() {
            return g;
        }
        self.lock_contended()
    }

    #[cold]
    fn lock_contended(&self) -> SpinGuard<'_, T> {
        let mut round = 0u32;
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            round = round.saturating_add(1);
            if round < 64 {
                std::hint::spin_loop();
            } else if round < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see the module invariants).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the only one, and `&mut self` is unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads (more than cores) increment a non-atomic pair under the lock;
    /// any overlap of two holders would break the pair's invariant or lose
    /// increments.
    #[test]
    fn stress_mutual_exclusion() {
        let m = Arc::new(SpinMutex::new((0u64, 0u64)));
        let threads = 6;
        let per = 50_000;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for i in 0..per {
                        let mut g = if (i + t) % 3 == 0 {
                            match m.try_lock() {
                                Some(g) => g,
                                None => m.lock(),
                            }
                        } else {
                            m.lock()
                        };
                        assert_eq!(g.0, g.1, "two holders at once");
                        g.0 += 1;
                        std::hint::black_box(&mut *g);
                        g.1 += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let g = m.lock();
        assert_eq!(*g, (threads * per, threads * per));
        assert!(m.try_lock().is_none(), "held by `g`");
    }
}
