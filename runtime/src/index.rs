//! Array indices: the dynamic [`Index`] (0 to 6 dimensions) and the [`ArrayIndex`] trait that lets
//! `usize` and tuples of up to six `usize` name array elements.
//!
//! Invariant: an [`Index`] stores `dims` coordinates (≤ [`MAX_DIMS`]), each < 2^32; the unused
//! coordinates are zero, so derived `Eq`/`Hash` compare exactly the meaningful part.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest number of dimensions of an array index (as in Charm++).
pub const MAX_DIMS: usize = 6;

/// Longest postcard encoding of a user index key, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * MAX_DIMS;

/// The dimension count of an index made from a user key (one more than any coordinate index,
/// so the two kinds never mix in one array).
pub const KEY_DIMS: usize = MAX_DIMS + 1;

/// Marks `Index::dims` as "a key of this many bytes".
const KEY_FLAG: u8 = 0x80;

/// An array element index of 0 to 6 dimensions, each coordinate < 2^32.
///
/// ```
/// use charmrs::Index;
/// let i = Index::new(&[1, 2, 3]).unwrap();
/// assert_eq!(i.to_string(), "(1, 2, 3)");
/// let dims = Index::new(&[2, 3, 4]).unwrap();
/// assert_eq!(i.linear(&dims), 1 * 12 + 2 * 4 + 3);
/// assert_eq!(Index::from_linear(i.linear(&dims), &dims), i);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Index {
    dims: u8,
    coords: [u32; MAX_DIMS],
}

impl Index {
    /// The index with no dimensions (that of a single chare).
    pub const SCALAR: Index = Index {
        dims: 0,
        coords: [0; MAX_DIMS],
    };

    /// Builds an index from its coordinates.
    ///
    /// # Errors
    /// More than [`MAX_DIMS`] coordinates, or a coordinate ≥ 2^32.
    pub fn new(coords: &[usize]) -> Result<Index> {
        if coords.len() > MAX_DIMS {
            return Err(Error::Options(format!(
                "an index has at most {MAX_DIMS} dimensions, {} were given",
                coords.len()
            )));
        }
        let mut c = [0u32; MAX_DIMS];
        for (slot, &x) in c.iter_mut().zip(coords) {
            *slot = u32::try_from(x).map_err(|_| Error::DimensionTooLarge {
                extent: x,
                max: u32::MAX as usize,
            })?;
        }
        Ok(Index {
            dims: coords.len() as u8,
            coords: c,
        })
    }

    /// A one-dimensional index.
    pub fn one(i: usize) -> Result<Index> {
        Index::new(&[i])
    }

    /// Number of dimensions ([`KEY_DIMS`] for a user key, see [`from_key`](Self::from_key)).
    pub fn dims(&self) -> usize {
        if self.dims & KEY_FLAG != 0 {
            KEY_DIMS
        } else {
            self.dims as usize
        }
    }

    /// An index made from a user key (any `Serialize` type whose postcard encoding fits in
    /// [`MAX_KEY_BYTES`] bytes): Charm++'s user-defined array indices. Equal keys give equal
    /// indices in every process. Declare a key type with [`index_key!`](crate::index_key) to use
    /// it directly as an array's index type.
    ///
    /// ```
    /// use charmrs::Index;
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Cell { level: u8, x: u32, y: u32 }
    /// let i = Index::from_key(&Cell { level: 2, x: 5, y: 9 }).unwrap();
    /// assert_eq!(i.key::<Cell>(), Some(Cell { level: 2, x: 5, y: 9 }));
    /// ```
    ///
    /// # Errors
    /// The key does not serialize, or its encoding is longer than [`MAX_KEY_BYTES`].
    pub fn from_key<K: serde::Serialize>(key: &K) -> Result<Index> {
        let mut buf = [0u8; MAX_KEY_BYTES];
        let used = postcard::to_slice(key, &mut buf)
            .map_err(|e| {
                Error::Options(format!(
                    "an index key of type {} does not fit in {MAX_KEY_BYTES} bytes: {e}",
                    std::any::type_name::<K>()
                ))
            })?
            .len();
        let mut coords = [0u32; MAX_DIMS];
        for (k, chunk) in buf.chunks(4).enumerate() {
            coords[k] = u32::from_le_bytes(chunk.try_into().expect("24 bytes in chunks of 4"));
        }
        Ok(Index {
            dims: KEY_FLAG | used as u8,
            coords,
        })
    }

    /// The user key this index was made from, if it was made from a key of type `K`.
    pub fn key<K: serde::de::DeserializeOwned>(&self) -> Option<K> {
        if self.dims & KEY_FLAG == 0 {
            return None;
        }
        let len = (self.dims & !KEY_FLAG) as usize;
        let mut buf = [0u8; MAX_KEY_BYTES];
        for (k, c) in self.coords.iter().enumerate() {
            buf[4 * k..4 * k + 4].copy_from_slice(&c.to_le_bytes());
        }
        let (value, rest) = postcard::take_from_bytes::<K>(buf.get(..len)?).ok()?;
        rest.is_empty().then_some(value)
    }

    /// Whether this index was made from a user key.
    pub fn is_key(&self) -> bool {
        self.dims & KEY_FLAG != 0
    }

    /// Coordinate `d` (0 if `d ≥ dims`).
    pub fn get(&self, d: usize) -> usize {
        self.coords.get(d).copied().unwrap_or(0) as usize
    }

    /// The coordinates as a slice of `u32` (for a key: its encoding, in words).
    pub fn coords(&self) -> &[u32] {
        if self.is_key() {
            &self.coords
        } else {
            &self.coords[..self.dims()]
        }
    }

    /// Number of elements of an array whose extents are `self` (1 for zero dimensions).
    pub fn volume(&self) -> u64 {
        self.coords().iter().map(|&x| x as u64).product()
    }

    /// Whether every coordinate is below the matching extent of `dims` (same dimension count).
    pub fn within(&self, dims: &Index) -> bool {
        self.dims == dims.dims && self.coords().iter().zip(dims.coords()).all(|(i, d)| i < d)
    }

    /// Row-major linear position of `self` in an array of extents `dims` (last coordinate fastest).
    pub fn linear(&self, dims: &Index) -> u64 {
        self.coords()
            .iter()
            .zip(dims.coords())
            .fold(0u64, |acc, (&i, &d)| acc * d as u64 + i as u64)
    }

    /// Inverse of [`linear`](Self::linear): the index at row-major position `pos` of `dims`.
    pub fn from_linear(mut pos: u64, dims: &Index) -> Index {
        let mut out = Index {
            dims: dims.dims,
            coords: [0; MAX_DIMS],
        };
        for d in (0..dims.dims()).rev() {
            let extent = dims.coords[d].max(1) as u64;
            out.coords[d] = (pos % extent) as u32;
            pos /= extent;
        }
        out
    }
}

impl fmt::Display for Index {
    /// Python tuple notation, as charm4py prints `thisIndex`: `(1, 2)`, `(5,)`, `()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_key() {
            let len = (self.dims & !KEY_FLAG) as usize;
            f.write_str("key:")?;
            for b in self.coords.iter().flat_map(|c| c.to_le_bytes()).take(len) {
                write!(f, "{b:02x}")?;
            }
            return Ok(());
        }
        f.write_str("(")?;
        for (k, c) in self.coords().iter().enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        if self.dims == 1 {
            f.write_str(",")?;
        }
        f.write_str(")")
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A type that names an element of an N-d array: `usize`, tuples of 2–6 `usize`, or [`Index`].
pub trait ArrayIndex: Copy + Send + 'static + fmt::Debug {
    /// Converts to the runtime's index representation.
    ///
    /// # Errors
    /// A coordinate ≥ 2^32.
    fn to_index(&self) -> Result<Index>;
    /// Converts back; `None` if `index` has the wrong number of dimensions for `Self`.
    fn from_index(index: &Index) -> Option<Self>;
    /// Number of dimensions, if fixed by the type (`None` for [`Index`]).
    fn fixed_dims() -> Option<usize>;
}

impl ArrayIndex for Index {
    fn to_index(&self) -> Result<Index> {
        Ok(*self)
    }
    fn from_index(index: &Index) -> Option<Self> {
        Some(*index)
    }
    fn fixed_dims() -> Option<usize> {
        None
    }
}

impl ArrayIndex for usize {
    fn to_index(&self) -> Result<Index> {
        Index::new(&[*self])
    }
    fn from_index(index: &Index) -> Option<Self> {
        (index.dims() == 1).then(|| index.get(0))
    }
    fn fixed_dims() -> Option<usize> {
        Some(1)
    }
}

macro_rules! tuple_index {
    ($n:literal; $($t:ident $k:tt),+) => {
        impl ArrayIndex for ($($t,)+) {
            fn to_index(&self) -> Result<Index> {
                Index::new(&[$(self.$k),+])
            }
            fn from_index(index: &Index) -> Option<Self> {
                (index.dims() == $n).then(|| ($(index.get($k),)+))
            }
            fn fixed_dims() -> Option<usize> {
                Some($n)
            }
        }
    };
}
/// Makes a user key type usable as an array index type (`Array<C, MyKey>`), through
/// [`Index::from_key`]: the type must be `Copy + Debug + Serialize + DeserializeOwned`, and its
/// postcard encoding fit in [`MAX_KEY_BYTES`] bytes. Use it with sparse arrays
/// ([`Array::new_sparse`](crate::Array::new_sparse)).
///
/// ```
/// #[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
/// struct Octant { level: u8, code: u64 }
/// charmrs::index_key!(Octant);
/// use charmrs::ArrayIndex;
/// assert_eq!(Octant::fixed_dims(), Some(charmrs::KEY_DIMS));
/// ```
#[macro_export]
macro_rules! index_key {
    ($t:ty) => {
        impl $crate::ArrayIndex for $t {
            fn to_index(&self) -> $crate::Result<$crate::Index> {
                $crate::Index::from_key(self)
            }
            fn from_index(index: &$crate::Index) -> ::std::option::Option<Self> {
                index.key::<$t>()
            }
            fn fixed_dims() -> ::std::option::Option<usize> {
                ::std::option::Option::Some($crate::KEY_DIMS)
            }
        }
    };
}

tuple_index!(1; usize 0);
tuple_index!(2; usize 0, usize 1);
tuple_index!(3; usize 0, usize 1, usize 2);
tuple_index!(4; usize 0, usize 1, usize 2, usize 3);
tuple_index!(5; usize 0, usize 1, usize 2, usize 3, usize 4);
tuple_index!(6; usize 0, usize 1, usize 2, usize 3, usize 4, usize 5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_like_python_tuples() {
        assert_eq!(Index::SCALAR.to_string(), "()");
        assert_eq!(Index::one(5).unwrap().to_string(), "(5,)");
        assert_eq!((1usize, 2usize).to_index().unwrap().to_string(), "(1, 2)");
    }

    #[test]
    fn linear_roundtrip_all_dims() {
        for nd in 1..=MAX_DIMS {
            let extents: Vec<usize> = (0..nd).map(|d| d + 2).collect();
            let dims = Index::new(&extents).unwrap();
            for pos in 0..dims.volume() {
                let i = Index::from_linear(pos, &dims);
                assert!(i.within(&dims));
                assert_eq!(i.linear(&dims), pos);
            }
        }
    }

    #[test]
    fn bad_indices_are_named() {
        let e = Index::new(&[1; 7]).unwrap_err();
        assert!(e.to_string().contains("at most 6"), "{e}");
        let e = Index::new(&[1usize << 40]).unwrap_err();
        assert!(e.to_string().contains(&(1usize << 40).to_string()), "{e}");
        assert_eq!(<(usize, usize)>::from_index(&Index::one(3).unwrap()), None);
    }
}
