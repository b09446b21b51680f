//! Readonly globals: a value set during the job (usually once, by the entry point) and then
//! readable on every PE of every process — Charm++'s readonly variables, charm4py's
//! `charm4py.readonlies` and `charm.thisProxy.updateGlobals(...)`.
//!
//! A [`Readonly<T>`] is a `static` declared with [`readonly!`](crate::readonly!), which also
//! registers it (`inventory`) under the FNV-1a hash of its path, as entries are: processes of the
//! same binary agree on ids without talking. [`Readonly::set`] (PE 0 only) stores the value in
//! the calling process and broadcasts its encoding to a hidden group ([`ReadonlyStore`], one
//! element per PE, under a reserved collection id, so it never takes an id a checkpoint's
//! collections may need), whose elements decode it into their process's copy; it returns once
//! every PE has done so.
//!
//! Invariants: each `set` is a generation of its job (numbered from 1, one more than the job's
//! current one); a process's current value only moves to a later generation of the same job, or
//! to a value of another job (a later `Runtime::run` in the same process), so the first of its
//! PEs to receive a value installs it and the others find it there; a PE reads only a value of
//! its own job, so a value never leaks from one job into the next; a replaced value is leaked,
//! never freed, because [`get`](Readonly::get) hands out `&'static` references; `get` before a
//! value of its job reached the calling process panics naming the readonly and saying where to
//! set it, never returns a default or another job's value.

use crate::chare;
use crate::chare::Payload;
use crate::collection::CollectionId;
use crate::envelope::Construct;
use crate::registry::entry_id;
use crate::scheduler::with_pe;
use crate::wire::Buffer;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A value set during the job (usually once, by the entry point) and readable on every PE of
/// every process (Charm++'s readonly variables, charm4py's `readonlies` / `updateGlobals`).
/// Declare it with [`readonly!`](crate::readonly!), set it with [`set`](Readonly::set) (an
/// `await` that returns once every process has it), read it anywhere afterwards with
/// [`get`](Readonly::get).
///
/// ```
/// use charmrs::prelude::*;
///
/// charmrs::readonly! {
///     /// The number of steps, chosen when the job starts.
///     static STEPS: u32;
/// }
///
/// struct Walker;
///
/// #[chare]
/// impl Walker {
///     fn new() -> Self { Walker }
///
///     #[entry]
///     fn steps_left(&mut self, done: u32) -> u32 {
///         *STEPS.get() - done             // read on any PE, in any process
///     }
/// }
///
/// let code = charmrs::Runtime::new(2).run(|_| async {
///     STEPS.set(100).await;               // every PE of every process has it now
///     let walker = Single::<Walker>::new((), Some(1));
///     assert_eq!(walker.ret().steps_left(40).await, 60);
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
pub struct Readonly<T> {
    /// Its path (`module::NAME`), for messages.
    path: &'static str,
    /// The current value of this process, or null; each value stored is leaked (readers hold
    /// `&'static` references to it) and replaced only by a later generation.
    current: AtomicPtr<Generation<T>>,
    /// Shared like a `T` (the `AtomicPtr` alone would make it `Sync` for any `T`): a static
    /// readonly needs `T: Sync`, since every PE thread reads the same value.
    _shares: PhantomData<T>,
}

impl<T: 'static> std::fmt::Debug for Readonly<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.current() {
            Some(g) => write!(
                f,
                "Readonly({}, set: job {} generation {})",
                self.path, g.job, g.number
            ),
            None => write!(f, "Readonly({}, not set)", self.path),
        }
    }
}

/// A value of a readonly, the job of this process that set or received it, and the number of
/// that job's `set` that made it (1 for the first).
struct Generation<T> {
    job: u64,
    number: u64,
    value: T,
}

/// The job of the calling PE (`None` on a thread that is not a PE).
fn current_job() -> Option<u64> {
    with_pe("Readonly", |pe| pe.shared.job).ok()
}

impl<T: 'static> Readonly<T> {
    /// An unset readonly named `path` (used by [`readonly!`](crate::readonly!)).
    #[doc(hidden)]
    pub const fn new(path: &'static str) -> Readonly<T> {
        Readonly {
            path,
            current: AtomicPtr::new(std::ptr::null_mut()),
            _shares: PhantomData,
        }
    }

    /// The current value of this process.
    fn current(&self) -> Option<&'static Generation<T>> {
        let p = self.current.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was made by `Box::into_raw` in `install` and is never freed
        // (a replaced generation is leaked, not dropped), so it stays valid for the process's
        // life; the Acquire load pairs with the Release of the CAS that published it, so its
        // contents are initialised.
        unsafe { p.as_ref() }
    }

    /// The value.
    ///
    /// # Panics
    /// If it has not been set in this job, or its value has not reached this process yet: set
    /// it before anything that reads it is sent (`NAME.set(v).await` in the entry point).
    pub fn get(&self) -> &'static T {
        self.try_get().unwrap_or_else(|| {
            panic!(
                "readonly `{}` was read before it was set in this job and process: set it with \
                 `{}.set(value).await` in the entry point before sending anything that reads it",
                self.path,
                self.path.rsplit("::").next().unwrap_or(self.path)
            )
        })
    }

    /// The value, if one of this job has reached this process. On a thread that is not a PE
    /// (say, one an entry method started), the value last set in this process, of any job.
    pub fn try_get(&self) -> Option<&'static T> {
        let g = self.current()?;
        match current_job() {
            Some(job) if job != g.job => None,
            _ => Some(&g.value),
        }
    }

    /// Its path, `module::NAME`.
    pub fn path(&self) -> &'static str {
        self.path
    }

    /// Makes `value`, generation `number` of job `job`, current unless a value of that job and
    /// that or a later generation is; returns whether it did. A value of another job is
    /// replaced: jobs of one process run one after another, each setting its readonlies anew.
    fn install(&self, job: u64, number: u64, value: T) -> bool {
        let fresh = Box::into_raw(Box::new(Generation { job, number, value }));
        let mut seen = self.current.load(Ordering::Acquire);
        loop {
            // SAFETY: as in `current`: null or a leaked, initialised generation.
            if unsafe { seen.as_ref() }.is_some_and(|g| g.job == job && g.number >= number) {
                // SAFETY: `fresh` came from `Box::into_raw` above and was never published.
                drop(unsafe { Box::from_raw(fresh) });
                return false;
            }
            match self.current.compare_exchange_weak(
                seen,
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // The replaced generation is leaked: readers may hold references into it.
                Ok(_) => return true,
                Err(now) => seen = now,
            }
        }
    }
}

impl<T: Payload + Sync> Readonly<T> {
    /// Sets the value in every process of the job and returns once every PE has it (charm4py's
    /// `updateGlobals(..., awaitable=True).get()`). Call it from the entry point (PE 0), before
    /// sending anything that reads it.
    ///
    /// A later `set` replaces the value everywhere the same way. Every value set stays allocated
    /// for the life of the process (readers hold `&'static` references): set a readonly once or
    /// rarely, not in a loop.
    ///
    /// # Panics
    /// On another PE than 0, or if its value cannot be encoded.
    pub async fn set(&'static self, value: T) {
        let encoded = postcard::to_stdvec(&value).unwrap_or_else(|e| {
            panic!("readonly `{}`: its value cannot be encoded: {e}", self.path)
        });
        let (job, stores) = with_pe("Readonly::set", |pe| {
            if pe.pe != 0 {
                panic!(
                    "readonly `{}` was set on PE {}: set readonlies from the entry point (PE 0)",
                    self.path, pe.pe
                );
            }
            let stores = pe.hidden_group::<ReadonlyStore>(CollectionId::READONLY_STORE, || {
                Construct::<ReadonlyStore>::boxed(())
            });
            (pe.shared.job, stores)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let number = self
            .current()
            .filter(|g| g.job == job)
            .map_or(0, |g| g.number)
            + 1;
        // Nothing else installs a generation of this job on PE 0's process between the two
        // lines above and this one (no await between them; other PEs only install what PE 0
        // sent), so this installs.
        let installed = self.install(job, number, value);
        assert!(
            installed,
            "readonly `{}`: generation {number} lost",
            self.path
        );
        stores
            .ret()
            .store(entry_id(self.path), number, Buffer::from(encoded))
            .await;
    }

    /// Makes the value encoded in `bytes`, of generation `number`, current in this process
    /// unless another PE of it did (used by the function [`readonly!`](crate::readonly!)
    /// registers).
    #[doc(hidden)]
    pub fn store_encoded(&self, number: u64, bytes: &[u8]) -> Result<(), String> {
        let job = current_job().ok_or("a readonly's value arrived outside a PE")?;
        if self
            .current()
            .is_some_and(|g| g.job == job && g.number >= number)
        {
            return Ok(());
        }
        let value: T = crate::wire::decoded(bytes)?;
        self.install(job, number, value);
        Ok(())
    }
}

/// One readonly of the binary, registered by [`readonly!`](crate::readonly!).
#[doc(hidden)]
pub struct ReadonlyInfo {
    /// [`entry_id`] of its path.
    pub id: u64,
    /// Its path, `module::NAME`.
    pub path: &'static str,
    /// Stores its encoded value of a given generation in this process.
    pub store: fn(u64, &[u8]) -> Result<(), String>,
}

inventory::collect!(ReadonlyInfo);

/// Declares [`Readonly`] statics: `charmrs::readonly! { static NAME: Type; … }` (doc comments and
/// `pub` allowed). The type must be `Clone + Send + Sync + Serialize + DeserializeOwned`.
#[macro_export]
macro_rules! readonly {
    ($($(#[$meta:meta])* $vis:vis static $name:ident : $ty:ty;)+) => {$(
        $(#[$meta])*
        $vis static $name: $crate::Readonly<$ty> =
            $crate::Readonly::new(concat!(module_path!(), "::", stringify!($name)));
        $crate::__private::inventory::submit! {
            $crate::__private::ReadonlyInfo {
                id: $crate::registry::entry_id(concat!(module_path!(), "::", stringify!($name))),
                path: concat!(module_path!(), "::", stringify!($name)),
                store: |number, bytes| $name.store_encoded(number, bytes),
            }
        }
    )+};
}

/// The built-in group whose elements store a readonly's value in their process.
#[doc(hidden)]
pub struct ReadonlyStore;

#[chare]
impl ReadonlyStore {
    fn new() -> Self {
        ReadonlyStore
    }

    /// Stores generation `number` of readonly `id`'s value in this process (if no other PE of it
    /// did).
    #[entry]
    fn store(&mut self, id: u64, number: u64, value: Buffer) {
        let info = inventory::iter::<ReadonlyInfo>
            .into_iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| {
                panic!("a readonly value arrived for unknown readonly #{id:016x}: is every process running the same binary?")
            });
        if let Err(e) = (info.store)(number, &value.0) {
            panic!("readonly `{}`: {e}", info.path);
        }
    }
}
