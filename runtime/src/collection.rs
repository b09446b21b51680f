//! Collections: their ids, their [`Shape`] (single chare, group, dense N-d array) and the default
//! placement of elements on PEs.
//!
//! Every chare lives in a collection (a single chare is a collection of one), addressed by
//! `(CollectionId, Index)`. Ids are made without coordination: the creating PE in the top bits, a
//! per-PE counter below, so no two collections of a job share an id. Placement is a pure function of
//! the shape and the index (the element's *home*), so any PE finds any element without a lookup.

use crate::array_map::MapId;
use crate::error::{Error, Result};
use crate::index::Index;
use serde::{Deserialize, Serialize};

/// Job-wide unique id of a collection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
pub struct CollectionId(pub(crate) u64);

/// The bit of a [`CollectionId`] that marks a section's id (see `crate::section`).
const SECTION_BIT: u64 = 1 << 39;

impl CollectionId {
    /// The hidden group that does each PE's part of a checkpoint or restart
    /// (`crate::checkpoint`): creator PE 0's last serial, which its counter never reaches.
    pub(crate) const CHECKPOINTER: CollectionId = CollectionId(SECTION_BIT - 1);
    /// The hidden group that installs readonlies' values (`crate::readonly`): creator PE 0's
    /// second-to-last serial, which its counter never reaches either.
    pub(crate) const READONLY_STORE: CollectionId = CollectionId(SECTION_BIT - 2);

    /// The creating PE's serial number of this collection.
    pub(crate) fn serial(self) -> u64 {
        self.0 & (SECTION_BIT - 1)
    }

    pub(crate) fn new(creator_pe: usize, serial: u64) -> CollectionId {
        CollectionId(((creator_pe as u64) << 40) | (serial & (SECTION_BIT - 1)))
    }

    /// The id of a section made with this (fresh) id.
    pub(crate) fn as_section(self) -> CollectionId {
        CollectionId(self.0 | SECTION_BIT)
    }

    /// Whether this is a section's id: its reductions count members by the counts sealed when
    /// it was made, never by a shape.
    pub(crate) fn is_section(self) -> bool {
        self.0 & SECTION_BIT != 0
    }
}

/// What kind of collection, with what it needs for placement.
///
/// Decoding a shape checks it ([`Shape::check_size`], and a sparse array's dimension count):
/// shapes arrive from other processes inside proxies, callbacks and sections, and an impossible
/// one would make index arithmetic overflow.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(try_from = "ShapeWire", into = "ShapeWire")]
pub enum Shape {
    /// A single chare living on `pe`.
    Single {
        /// Where it lives.
        pe: u32,
    },
    /// One element per PE; element `i` lives on PE `i`.
    Group,
    /// A dense array with these extents, block-placed in row-major order unless a map places it.
    Array {
        /// Extent of every dimension.
        dims: Index,
        /// The user placement ([`crate::ArrayMap`]), if any.
        map: Option<MapId>,
    },
    /// A sparse array: elements are inserted one by one, at any index of `dims` dimensions.
    /// Homes are given by the map, or by a hash of the index.
    Sparse {
        /// Number of dimensions of every index.
        dims: u8,
        /// The user placement ([`crate::ArrayMap`]), if any.
        map: Option<MapId>,
    },
}

/// [`Shape`]'s wire form: the same variants (so the same bytes); decoding one into a `Shape`
/// checks it.
#[derive(Serialize, Deserialize)]
enum ShapeWire {
    Single { pe: u32 },
    Group,
    Array { dims: Index, map: Option<MapId> },
    Sparse { dims: u8, map: Option<MapId> },
}

impl TryFrom<ShapeWire> for Shape {
    type Error = String;
    fn try_from(wire: ShapeWire) -> std::result::Result<Shape, String> {
        Shape::checked(wire).map_err(crate::wire::remembered)
    }
}

impl Shape {
    /// [`Shape::try_from`]'s checks.
    fn checked(wire: ShapeWire) -> std::result::Result<Shape, String> {
        let shape = match wire {
            ShapeWire::Single { pe } => {
                // Read back from a checkpoint, the PE is the old job's: `restore` refuses a
                // single chare on a PE this job lacks, naming the chare.
                if !crate::checkpoint::is_rehoming() {
                    known_pe(pe, || "a single chare".into())?;
                }
                Shape::Single { pe }
            }
            ShapeWire::Group => Shape::Group,
            ShapeWire::Array { dims, map } => Shape::Array { dims, map },
            ShapeWire::Sparse { dims, map } => {
                if usize::from(dims) > crate::index::KEY_DIMS {
                    return Err(format!(
                        "a sparse array of {dims} dimensions (at most {})",
                        crate::index::KEY_DIMS
                    ));
                }
                Shape::Sparse { dims, map }
            }
        };
        shape.check_size()?;
        Ok(shape)
    }
}

/// Checks a PE number decoded from a message or a checkpoint (`what` names what it belongs
/// to) against the decoding PE's job. Off a PE (nothing to check against) it passes.
///
/// # Errors
/// A PE the job does not have, named with the job's PE count.
pub(crate) fn known_pe(pe: u32, what: impl FnOnce() -> String) -> std::result::Result<(), String> {
    match crate::scheduler::with_pe("decoding a PE number", |p| p.num_pes()) {
        Ok(n) if pe as usize >= n => {
            Err(format!("{} on PE {pe}, and this job has {n} PEs", what()))
        }
        _ => Ok(()),
    }
}

impl From<Shape> for ShapeWire {
    fn from(shape: Shape) -> ShapeWire {
        match shape {
            Shape::Single { pe } => ShapeWire::Single { pe },
            Shape::Group => ShapeWire::Group,
            Shape::Array { dims, map } => ShapeWire::Array { dims, map },
            Shape::Sparse { dims, map } => ShapeWire::Sparse { dims, map },
        }
    }
}

/// The most elements a dense array may have (2^32): placement and reduction counts walk a dense
/// array's index space, and a shape received from another process is checked against this too.
pub const MAX_DENSE_ELEMENTS: u64 = 1 << 32;

impl Shape {
    /// Checks that a dense array's extents are coordinates (not a user key) that multiply to at
    /// most [`MAX_DENSE_ELEMENTS`].
    pub fn check_size(&self) -> Result<(), String> {
        if let Shape::Array { dims, .. } = self {
            if dims.is_key() {
                return Err(
                    "a dense array's extents must be coordinates, not a user key (types made \
                     with index_key! index sparse arrays: Array::new_sparse)"
                        .to_owned(),
                );
            }
            let volume = dims
                .coords()
                .iter()
                .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64));
            if volume.is_none_or(|v| v > MAX_DENSE_ELEMENTS) {
                return Err(format!(
                    "a dense array of extents {:?} has more than {MAX_DENSE_ELEMENTS} elements",
                    dims.coords()
                ));
            }
        }
        Ok(())
    }

    /// Human-readable kind, for diagnostics ("single chare", "group", "3-d array").
    pub fn describe(&self) -> String {
        match self {
            Shape::Single { .. } => "single chare".into(),
            Shape::Group => "group".into(),
            Shape::Array { dims, .. } => {
                format!("{}-d array of dimensions {dims}", dims.dims())
            }
            Shape::Sparse { dims, .. } => format!("sparse {dims}-d array"),
        }
    }

    /// Checks that `index` names an element of a collection of this shape in a job of `num_pes`.
    pub fn check(&self, index: &Index, num_pes: usize) -> Result<()> {
        match self {
            Shape::Single { .. } if index.dims() == 0 => Ok(()),
            Shape::Group if index.dims() == 1 => {
                let pe = index.get(0);
                if pe < num_pes {
                    Ok(())
                } else {
                    Err(Error::PeOutOfRange { pe, num_pes })
                }
            }
            Shape::Sparse { dims, .. } if index.dims() == *dims as usize => Ok(()),
            Shape::Array { dims, .. } if index.dims() == dims.dims() => {
                if index.within(dims) {
                    Ok(())
                } else {
                    Err(Error::IndexOutOfRange {
                        index: *index,
                        dims: *dims,
                    })
                }
            }
            _ => Err(Error::IndexDimensions {
                index: *index,
                got: index.dims(),
                expected: match self {
                    Shape::Single { .. } => 0,
                    Shape::Group => 1,
                    Shape::Array { dims, .. } => dims.dims(),
                    Shape::Sparse { dims, .. } => *dims as usize,
                },
                collection: self.describe(),
            }),
        }
    }

    /// [`check`](Self::check), and that a user map places `index` on one of `num_pes` PEs (a
    /// map's out-of-range answer would be taken as PE 0, where such an element can never be).
    pub(crate) fn check_placed(&self, index: &Index, num_pes: usize) -> Result<()> {
        self.check(index, num_pes)?;
        if let Shape::Array { map: Some(m), .. } | Shape::Sparse { map: Some(m), .. } = self {
            m.check(index, num_pes)?;
        }
        Ok(())
    }

    /// Home PE of a (valid) element.
    pub fn home_pe(&self, index: &Index, num_pes: usize) -> usize {
        match self {
            Shape::Single { pe } => *pe as usize,
            Shape::Group => index.get(0),
            Shape::Array { map: Some(m), .. } | Shape::Sparse { map: Some(m), .. } => {
                m.place(index, num_pes)
            }
            Shape::Array { dims, map: None } => {
                block_owner(index.linear(dims), dims.volume(), num_pes)
            }
            Shape::Sparse { map: None, .. } => hashed_home(index, num_pes),
        }
    }

    /// Whether elements of this shape are placed by a function of the index that the runtime
    /// cannot count cheaply (a map or a sparse array): their per-PE counts are computed once
    /// (dense) or at `done_inserting` (sparse) and kept by each PE.
    pub(crate) fn counted_by_pe(&self) -> bool {
        matches!(
            self,
            Shape::Array { map: Some(_), .. } | Shape::Sparse { .. }
        )
    }

    /// The elements whose home is `pe`, in row-major order.
    pub(crate) fn local_elements(&self, pe: usize, num_pes: usize) -> Vec<Index> {
        match self {
            Shape::Single { pe: home } => {
                if *home as usize == pe {
                    vec![Index::SCALAR]
                } else {
                    vec![]
                }
            }
            Shape::Group => vec![Index::new(&[pe]).expect("PE numbers fit an index")],
            Shape::Array { dims, map: None } => {
                let (lo, hi) = block_range(pe, dims.volume(), num_pes);
                (lo..hi).map(|pos| Index::from_linear(pos, dims)).collect()
            }
            Shape::Array { dims, map: Some(m) } => (0..dims.volume())
                .map(|pos| Index::from_linear(pos, dims))
                .filter(|i| m.place(i, num_pes) == pe)
                .collect(),
            Shape::Sparse { .. } => Vec::new(),
        }
    }
}

impl Shape {
    /// How many elements have their home on `pe` (for shapes not counted per PE: see
    /// [`counted_by_pe`](Self::counted_by_pe)).
    pub(crate) fn local_count(&self, pe: usize, num_pes: usize) -> usize {
        match self {
            Shape::Single { pe: home } => usize::from(*home as usize == pe),
            Shape::Group => 1,
            Shape::Array { dims, map: None } => {
                let (lo, hi) = block_range(pe, dims.volume(), num_pes);
                (hi - lo) as usize
            }
            Shape::Array { .. } | Shape::Sparse { .. } => {
                unreachable!("mapped and sparse arrays are counted per PE, not by shape")
            }
        }
    }

    /// Elements per home PE of a dense mapped array (one pass over the index space).
    pub(crate) fn home_counts(&self, num_pes: usize) -> Vec<u32> {
        let mut counts = vec![0u32; num_pes];
        if let Shape::Array { dims, .. } = self {
            for pos in 0..dims.volume() {
                counts[self.home_pe(&Index::from_linear(pos, dims), num_pes)] += 1;
            }
        }
        counts
    }

    /// The PEs that hold at least one element, in increasing order (the members of the
    /// collection's reduction tree).
    pub(crate) fn member_pes(&self, num_pes: usize) -> Vec<usize> {
        (0..num_pes)
            .filter(|&p| self.local_count(p, num_pes) > 0)
            .collect()
    }
}

/// Home of a sparse element without a map: a hash of its coordinates (the same in every process).
fn hashed_home(index: &Index, num_pes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    index.hash(&mut h);
    (h.finish() % num_pes.max(1) as u64) as usize
}

/// Block placement: position `pos` of `total` goes to PE `pos * P / total`.
fn block_owner(pos: u64, total: u64, num_pes: usize) -> usize {
    ((pos as u128 * num_pes as u128) / total.max(1) as u128) as usize
}

/// Positions owned by `pe` under [`block_owner`]: `[ceil(pe*T/P), ceil((pe+1)*T/P))`.
fn block_range(pe: usize, total: u64, num_pes: usize) -> (u64, u64) {
    let p = num_pes as u128;
    let t = total as u128;
    let lo = (pe as u128 * t).div_ceil(p);
    let hi = ((pe as u128 + 1) * t).div_ceil(p);
    (lo as u64, hi as u64)
}

#[cfg(test)]
mod tests {

    /// A PE number from another process is checked against the job when decoded: a single
    /// chare's shape, an element proxy's home; the error names it and the job's PE count.
    #[test]
    fn decoded_pe_numbers_are_checked_against_the_job() {
        let (tx, rx) = std::sync::mpsc::channel();
        crate::Runtime::new(2)
            .affinity(false)
            .run(move |_| async move {
                let single = postcard::to_stdvec(&Shape::Single { pe: 7 }).unwrap();
                let fine = postcard::to_stdvec(&Shape::Single { pe: 1 }).unwrap();
                let proxy = |pe: u32| {
                    let p =
                        crate::proxy::ElementProxy::<crate::checkpoint::Checkpointer>::from_parts(
                            CollectionId::new(0, 5),
                            Index::new(&[3]).unwrap(),
                            pe as usize,
                        );
                    postcard::to_stdvec(&p).unwrap()
                };
                let results = [
                    crate::wire::decoded::<Shape>(&single).err(),
                    crate::wire::decoded::<Shape>(&fine).err(),
                    crate::wire::decoded::<
                        crate::proxy::ElementProxy<crate::checkpoint::Checkpointer>,
                    >(&proxy(9))
                    .err(),
                    crate::wire::decoded::<
                        crate::proxy::ElementProxy<crate::checkpoint::Checkpointer>,
                    >(&proxy(1))
                    .err(),
                ];
                tx.send(results).unwrap();
                crate::exit(0);
            })
            .unwrap();
        let [single, fine, proxy, fine_proxy] = rx.recv().unwrap();
        assert_eq!(
            single.as_deref(),
            Some("a single chare on PE 7, and this job has 2 PEs")
        );
        assert_eq!(fine, None);
        assert_eq!(
            proxy.as_deref(),
            Some("a proxy to element (3,) on PE 9, and this job has 2 PEs")
        );
        assert_eq!(fine_proxy, None);
    }

    /// A shape from another process is checked when decoded: impossible extents (whose volume
    /// overflows index arithmetic) or dimension counts are refused; good shapes round-trip.
    #[test]
    fn decoding_a_shape_checks_it() {
        let good = [
            Shape::Single { pe: 3 },
            Shape::Group,
            Shape::Array {
                dims: Index::new(&[4, 5, 6]).unwrap(),
                map: None,
            },
            Shape::Sparse { dims: 2, map: None },
        ];
        for shape in good {
            let bytes = postcard::to_stdvec(&shape).unwrap();
            assert_eq!(postcard::from_bytes::<Shape>(&bytes).unwrap(), shape);
        }
        let huge = Shape::Array {
            dims: Index::new(&[u32::MAX as usize; 6]).unwrap(),
            map: None,
        };
        let bytes = postcard::to_stdvec(&huge).unwrap();
        assert!(postcard::from_bytes::<Shape>(&bytes).is_err());
        let bytes = postcard::to_stdvec(&Shape::Sparse {
            dims: 40,
            map: None,
        })
        .unwrap();
        assert!(postcard::from_bytes::<Shape>(&bytes).is_err());
    }

    use super::*;

    #[test]
    fn dense_arrays_too_large_to_walk_are_refused() {
        let shape = |dims: &[usize]| Shape::Array {
            dims: Index::new(dims).unwrap(),
            map: None,
        };
        assert!(shape(&[1 << 16, 1 << 16]).check_size().is_ok());
        for dims in [
            &[u32::MAX as usize, u32::MAX as usize][..],
            &[1 << 16, 1 << 16, 2],
            &[u32::MAX as usize; 6],
        ] {
            let e = shape(dims).check_size().unwrap_err();
            assert!(e.contains("more than 4294967296 elements"), "{e}");
            // No wrap to a small count meanwhile.
            assert!(Index::new(dims).unwrap().volume() > MAX_DENSE_ELEMENTS);
        }
        assert!(Shape::Group.check_size().is_ok());
    }

    #[test]
    fn a_user_key_is_refused_as_extents() {
        // A key's words are not extents (a short key's multiply to nothing, a long one's to
        // garbage), and walking a key as extents used to index past its words.
        for key in [vec![1u8, 0, 0, 0, 1, 0, 0, 0], vec![7u8; 20]] {
            let dims = Index::from_key(&key).expect("a key that fits");
            let e = Shape::Array { dims, map: None }.check_size().unwrap_err();
            assert!(e.contains("not a user key"), "{e}");
            // Still no panic where a key is walked as extents anyway.
            let _ = Index::from_linear(3, &dims);
        }
    }

    #[test]
    fn block_range_matches_owner() {
        for total in [0u64, 1, 3, 7, 8, 100, 1001] {
            for p in 1..=9usize {
                let mut seen = 0;
                for pe in 0..p {
                    let (lo, hi) = block_range(pe, total, p);
                    for pos in lo..hi {
                        assert_eq!(block_owner(pos, total, p), pe, "total {total} P {p}");
                        seen += 1;
                    }
                }
                assert_eq!(seen, total);
            }
        }
    }

    #[test]
    fn check_names_the_problem() {
        let dims = Index::new(&[2, 3]).unwrap();
        let s = Shape::Array { dims, map: None };
        let e = s.check(&Index::new(&[2, 0]).unwrap(), 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "index (2, 0) is out of range for an array of dimensions (2, 3)"
        );
        let e = s.check(&Index::one(1).unwrap(), 4).unwrap_err();
        assert!(e.to_string().contains("2-d array"), "{e}");
        let e = Shape::Group.check(&Index::one(9).unwrap(), 4).unwrap_err();
        assert!(e.to_string().contains("unknown PE 9"), "{e}");
    }
}
