//! A group on some PEs only (charm4py's `Group(C, onPEs=pes)`): a sparse 1-d array whose element
//! `p` lives on PE `p`, placed there by a built-in [`ArrayMap`](crate::ArrayMap), so its home is
//! its PE and a call to it takes no forwarding hop.
//!
//! Invariants: the PEs are checked (at least one, each exists, none twice) before anything is
//! sent; the array
//! is sealed (`done_inserting`) before [`Array::on_pes`] returns, so a broadcast reaches every
//! member and a reduction over it completes with exactly one contribution per listed PE.

use crate::chare::Chare;
use crate::error::{Error, Result};
use crate::proxy::Array;
use crate::scheduler::with_pe;

crate::array_map!(pub(crate) ELEMENT_P_ON_PE_P = |index, pes| index.get(0) % pes.max(1));

impl<C: Chare> Array<C, usize>
where
    C::Init: Clone,
{
    /// A group of `C` on the PEs `pes` only (charm4py's `Group(C, onPEs=pes)`): one element per
    /// listed PE, indexed by its PE number, each built there with a clone of `init`. A broadcast
    /// reaches the listed PEs, `at(p)` is the element on PE `p`, reductions count one
    /// contribution per listed PE, and `ctx.index::<usize>()` is the element's PE. Like a
    /// group's, its elements stay on their PEs (unless the chare type is migratable and a load
    /// balancer moves them).
    ///
    /// ```
    /// use charmrs::prelude::*;
    ///
    /// struct Helper;
    ///
    /// #[chare]
    /// impl Helper {
    ///     fn new() -> Self { Helper }
    ///
    ///     #[entry]
    ///     fn whereabouts(&mut self, ctx: &Ctx<Self>) -> (usize, usize) {
    ///         (ctx.index::<usize>(), ctx.my_pe())
    ///     }
    /// }
    ///
    /// let code = charmrs::Runtime::new(4).run(|_| async {
    ///     let helpers = Array::<Helper, usize>::on_pes(&[1, 3], ()).await;
    ///     assert_eq!(helpers.gather().whereabouts().await, [(1, 1), (3, 3)]);
    ///     charmrs::exit(0);
    /// }).unwrap();
    /// assert_eq!(code, 0);
    /// ```
    ///
    /// # Panics
    /// See [`try_on_pes`](Self::try_on_pes).
    pub async fn on_pes(pes: &[usize], init: C::Init) -> Self {
        Self::try_on_pes(pes, init)
            .await
            .unwrap_or_else(|e| panic!("Array::on_pes: {e}"))
    }

    /// Like [`on_pes`](Self::on_pes), reporting errors instead of panicking.
    ///
    /// # Errors
    /// No PEs, a PE that does not exist or is listed twice (nothing is created then), or
    /// outside a running PE.
    pub async fn try_on_pes(pes: &[usize], init: C::Init) -> Result<Self> {
        let num_pes = with_pe("Array::on_pes", |pe| pe.num_pes())?;
        if pes.is_empty() {
            return Err(Error::Options(
                "Array::on_pes: no PEs given (a group needs at least one element)".to_owned(),
            ));
        }
        let mut seen = vec![false; num_pes];
        for &p in pes {
            if p >= num_pes {
                return Err(Error::PeOutOfRange { pe: p, num_pes });
            }
            if std::mem::replace(&mut seen[p], true) {
                return Err(Error::Options(format!(
                    "Array::on_pes: PE {p} is listed twice"
                )));
            }
        }
        let group = Self::new_sparse_dims(1, Some(&ELEMENT_P_ON_PE_P))?;
        for &p in pes {
            group.try_insert(p, init.clone(), Some(p))?;
        }
        group.done_inserting().await;
        Ok(group)
    }
}
