//! The entry-method table: every entry and constructor of every `#[chare]` in the binary.
//!
//! Each entry registers itself at link time (`inventory`) with a compile-time id, the FNV-1a hash of
//! its fully qualified path. Processes of the same binary therefore agree on ids without talking;
//! [`EntryTable::checksum`] lets processes of a job check that they run the same table. Ids map to
//! dense wire ids (the position in the sorted table). Invariant: ids in the table are unique; a
//! collision is reported as an error at start-up, never resolved silently.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// One registered entry method or constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// Compile-time id ([`entry_id`] of the qualified path).
    pub id: u64,
    /// `Type::method` (constructors are `Type::new`).
    pub name: &'static str,
    /// Fully qualified path the id was computed from.
    pub path: &'static str,
}

inventory::collect!(EntryInfo);

/// FNV-1a 64-bit hash of `path`, computed at compile time for entry ids.
///
/// ```
/// const ID: u64 = charmrs::registry::entry_id("app::Worker::work");
/// assert_eq!(ID, charmrs::registry::entry_id("app::Worker::work"));
/// assert_ne!(ID, charmrs::registry::entry_id("app::Worker::rest"));
/// ```
pub const fn entry_id(path: &str) -> u64 {
    let bytes = path.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// All entries of the binary, sorted by id.
#[derive(Debug)]
pub struct EntryTable {
    entries: Vec<EntryInfo>,
    checksum: u64,
}

impl EntryTable {
    fn build(items: impl IntoIterator<Item = EntryInfo>) -> Result<EntryTable> {
        let mut entries: Vec<EntryInfo> = items.into_iter().collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id).then(a.path.cmp(b.path)));
        entries.dedup_by(|a, b| a.id == b.id && a.path == b.path);
        if let Some(w) = entries.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(Error::EntryTable(format!(
                "`{}` and `{}` hash to the same id {:#x}; rename one of them",
                w[0].path, w[1].path, w[0].id
            )));
        }
        let mut checksum = entry_id("charmrs-entry-table");
        for e in &entries {
            checksum = (checksum ^ e.id)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(17);
        }
        Ok(EntryTable { entries, checksum })
    }

    /// The table of this binary (built once).
    ///
    /// # Errors
    /// Two entries whose paths hash to the same id.
    pub fn get() -> Result<&'static EntryTable> {
        static TABLE: OnceLock<Result<EntryTable>> = OnceLock::new();
        TABLE
            .get_or_init(|| EntryTable::build(inventory::iter::<EntryInfo>.into_iter().copied()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Dense wire id of the entry with compile-time id `id`.
    pub fn wire_id(&self, id: u64) -> Option<u32> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| i as u32)
    }

    /// The entry with dense wire id `wire`.
    pub fn by_wire_id(&self, wire: u32) -> Option<&EntryInfo> {
        self.entries.get(wire as usize)
    }

    /// Every entry, sorted by id.
    pub fn entries(&self) -> &[EntryInfo] {
        &self.entries
    }

    /// Order-sensitive hash of the whole table; equal in processes of the same binary.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &'static str) -> EntryInfo {
        EntryInfo {
            id: entry_id(path),
            name: path,
            path,
        }
    }

    #[test]
    fn dense_ids_follow_sorted_order_and_checksum_is_stable() {
        let a = EntryTable::build([info("a::X::f"), info("a::X::g"), info("b::Y::h")]).unwrap();
        let b = EntryTable::build([info("b::Y::h"), info("a::X::g"), info("a::X::f")]).unwrap();
        assert_eq!(a.checksum(), b.checksum());
        for e in a.entries() {
            let w = a.wire_id(e.id).unwrap();
            assert_eq!(a.by_wire_id(w), Some(e));
        }
        let c = EntryTable::build([info("a::X::f"), info("a::X::g")]).unwrap();
        assert_ne!(a.checksum(), c.checksum());
    }

    #[test]
    fn collision_is_an_error() {
        let mut x = info("a::X::f");
        x.path = "other::path";
        let e = EntryTable::build([info("a::X::f"), x]).unwrap_err();
        assert!(e.to_string().contains("same id"), "{e}");
    }
}
