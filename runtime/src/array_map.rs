//! [`ArrayMap`]: a user placement function for array elements (Charm++'s `CkArrayMap`).
//!
//! A map decides each element's *home* PE from its index — where a dense element is built, where
//! an inserted element goes when `insert` names no PE, and where messages for an element go
//! first. Maps are declared with [`array_map!`](crate::array_map) as statics and registered at
//! link time under a stable id (a hash of their path), so a [`MapId`] means the same function in
//! every process of a job even though function addresses differ between processes.
//!
//! Invariants: a map is a pure function of `(index, number of PEs)`; a result outside `0..P` is an
//! error the runtime reports naming the map and the index, at creation or insertion.

use crate::index::Index;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// A placement function: `(index, number of PEs) -> PE`.
pub type PlaceFn = fn(&Index, usize) -> usize;

/// A named placement function for array elements; declare one with
/// [`array_map!`](crate::array_map).
///
/// ```no_run
/// use charmrs::prelude::*;
/// // Every element on the PE given by its first coordinate (mod P).
/// charmrs::array_map!(BY_ROW = |index, pes| index.get(0) % pes);
///
/// # struct Cell;
/// # #[chare] impl Cell { fn new() -> Self { Cell } }
/// # fn main() { charmrs::start(|_| async move {
/// let a = Array::<Cell, (usize, usize)>::new_mapped((8, 8), &BY_ROW, ());
/// # }); }
/// ```
pub struct ArrayMap {
    path: &'static str,
    place: PlaceFn,
}

impl ArrayMap {
    /// A map called `path` (the macro passes the static's full path).
    pub const fn new(path: &'static str, place: PlaceFn) -> ArrayMap {
        ArrayMap { path, place }
    }

    /// The map's stable id.
    pub fn id(&self) -> MapId {
        MapId(crate::registry::entry_id(self.path))
    }

    /// Where the map puts `index` in a job of `num_pes` PEs.
    pub fn place(&self, index: &Index, num_pes: usize) -> usize {
        (self.place)(index, num_pes)
    }

    /// The map's path, for diagnostics.
    pub fn path(&self) -> &'static str {
        self.path
    }
}

/// Link-time registration of an [`ArrayMap`] (used by [`array_map!`](crate::array_map)).
#[doc(hidden)]
pub struct MapRegistration(pub &'static ArrayMap);

inventory::collect!(MapRegistration);

/// The id of a registered [`ArrayMap`], as stored in a collection's shape.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct MapId(u64);

fn registry() -> &'static FxHashMap<u64, &'static ArrayMap> {
    static MAPS: OnceLock<FxHashMap<u64, &'static ArrayMap>> = OnceLock::new();
    MAPS.get_or_init(|| {
        inventory::iter::<MapRegistration>
            .into_iter()
            .map(|r| (r.0.id().0, r.0))
            .collect()
    })
}

impl MapId {
    /// The registered map, if this binary has it.
    pub(crate) fn map(self) -> Option<&'static ArrayMap> {
        registry().get(&self.0).copied()
    }

    /// Home PE of `index`: the map's choice. An unknown map or a result out of range falls back
    /// to PE `0` here; creation and insertion check both and report them.
    pub(crate) fn place(self, index: &Index, num_pes: usize) -> usize {
        match self.map() {
            Some(m) => {
                let pe = m.place(index, num_pes);
                if pe < num_pes {
                    pe
                } else {
                    0
                }
            }
            None => 0,
        }
    }

    /// Checks that the map exists and puts `index` on an existing PE.
    pub(crate) fn check(self, index: &Index, num_pes: usize) -> crate::Result<()> {
        let map = self.map().ok_or_else(|| {
            crate::Error::Options(format!(
                "array map {self:?} is not registered in this binary"
            ))
        })?;
        let pe = map.place(index, num_pes);
        if pe < num_pes {
            Ok(())
        } else {
            Err(crate::Error::Options(format!(
                "array map {} placed element {index} on PE {pe}, but this job has {num_pes} PEs",
                map.path
            )))
        }
    }
}

/// Declares a static [`ArrayMap`] and registers it: `array_map!(NAME = |index, pes| expr);`
/// where `index: &Index`, `pes: usize` and `expr` is the PE (`0..pes`).
#[macro_export]
macro_rules! array_map {
    ($vis:vis $name:ident = |$index:ident, $pes:ident| $body:expr) => {
        $vis static $name: $crate::ArrayMap = $crate::ArrayMap::new(
            concat!(module_path!(), "::", stringify!($name)),
            |$index: &$crate::Index, $pes: usize| -> usize { $body },
        );
        $crate::__private::inventory::submit! {
            $crate::__private::MapRegistration(&$name)
        }
    };
}

/// Checks that map `m` places every element of the dense array `shape` on an existing PE.
pub(crate) fn check_all(m: MapId, shape: &crate::Shape, num_pes: usize) -> crate::Result<()> {
    if let crate::Shape::Array { dims, .. } = shape {
        for pos in 0..dims.volume() {
            m.check(&Index::from_linear(pos, dims), num_pes)?;
        }
    }
    Ok(())
}
