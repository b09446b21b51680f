//! Entry ids: compile-time hashes of the qualified path, registered at link time.

use charmrs::prelude::*;
use charmrs::registry::{entry_id, EntryTable};
use charmrs::Entry;

struct Counted;

#[chare]
impl Counted {
    fn new() -> Self {
        Counted
    }

    #[entry]
    fn bump(&mut self, _by: u32) {}
}

#[test]
fn entry_ids_are_stable_hashes_of_the_qualified_name() {
    const ID: u64 = <__charmrs_entry_Counted_bump as Entry<Counted>>::ID;
    assert_eq!(ID, entry_id(concat!(module_path!(), "::Counted::bump")));
    let table = EntryTable::get().unwrap();
    let bump = table
        .entries()
        .iter()
        .find(|e| e.name == "Counted::bump")
        .unwrap();
    assert_eq!(bump.id, ID);
    assert_eq!(bump.path, "registry::Counted::bump");
    let wire = table.wire_id(ID).unwrap();
    assert_eq!(table.by_wire_id(wire).unwrap().name, "Counted::bump");
    assert!(
        table.entries().iter().any(|e| e.name == "Counted::new"),
        "constructors registered"
    );
    assert_eq!(table.checksum(), EntryTable::get().unwrap().checksum());
}
