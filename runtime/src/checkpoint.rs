//! Checkpoint and restart: the job's arrays written to disk at a point the program chooses, and
//! read back by a later job, which may have another number of PEs or processes (Charm++'s
//! `CkStartCheckpoint` and `+restart`).
//!
//! # What this module owns
//!
//! * [`checkpoint`]: waits for quiescence, then every PE writes the elements it holds of every
//!   dense array, sparse array, single chare and group of a migratable type to `DIR/pe-<n>-<generation>.ckpt` (a random
//!   number per checkpoint); the calling PE writes `DIR/checkpoint.meta` last (the generation,
//!   the collections, the program's own state, the PE count), replacing the previous one in one
//!   rename, and only then removes the previous checkpoint's PE files. A job that dies while
//!   writing, or a checkpoint that fails, leaves the previous checkpoint whole.
//! * [`restore`]: registers the saved collections on every PE under their saved ids (so proxies
//!   saved inside elements or in the program's state stay valid), sends every element, read by
//!   the PEs in parallel, to its home PE under the new PE count, waits until all are in place,
//!   seals the sparse arrays, lets out the broadcasts held meanwhile, and hands the program's
//!   state back.
//! * The hidden group that does each PE's part (`Checkpointer`, under a reserved collection id).
//!
//! # Invariants
//!
//! * A checkpoint is taken at quiescence, with periodic load balancing held, so no message is in
//!   flight and no element moves: an element with a suspended entry method or `when` calls
//!   waiting at it, a collection still being built, or a call, broadcast or reduction waiting
//!   for a sparse array's insertion or `done_inserting`, makes [`checkpoint`] fail naming it; so
//!   does a count of saved elements that differs from the collection's (unsealed sparse arrays,
//!   whose count is not known, excepted). The previous checkpoint then stands.
//! * While a restore brings a collection back, its broadcasts wait on every PE (the PE's
//!   `restoring` flag on it) until every element is in place: one made from a `migrated` hook
//!   then reaches every element once, not only those that had arrived.
//! * After a restore, collection ids below the saving job's last are the restored ones only: a
//!   message for another (a group of the old job) aborts naming it, never waits; a section or a
//!   future in restored state fails the restore.
//! * Restored elements start a fresh history: migration count, reduction numbers and measured
//!   load start again from zero on every element together, which is consistent because nothing
//!   was in flight when they were saved. Channels keep theirs: their sequence numbers and the
//!   values that arrived and were not received yet are saved with the element (quiescence means
//!   nothing in flight, not nothing buffered).
//! * Groups of a `#[chare(migratable)]` type are saved, and come back only to a job of as many
//!   PEs (one element per PE has no faithful meaning under another count); other groups are not
//!   saved, and neither are sections (made again from the restored arrays), futures, and the
//!   entry point's own local variables (pass them as the `state`).
//! * Bad input is an error naming the file and what was wrong with it: a missing or truncated PE
//!   file, metadata from another program (its entry table differs) or another format version, a
//!   chare type this program does not have, a single chare placed on a PE the new job lacks.

use crate::chare::Chare;
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Construct, Construction, Control, Envelope, MIGRATION_ORDER};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::migration::Migrant;
use crate::proxy::Proxy;
use crate::registry::{Decoder, EntryTable};
use crate::scheduler::{with_pe, PeState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// First bytes of every checkpoint file.
const MAGIC: [u8; 8] = *b"charmrsK";
/// Format of the files; a checkpoint of another version is refused, naming both.
const VERSION: u32 = 2;
/// The metadata file, written last.
const META: &str = "checkpoint.meta";

/// What [`checkpoint`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    /// Elements written, over all PEs.
    pub elements: u64,
    /// Collections (dense arrays, sparse arrays, single chares, groups of migratable types)
    /// they belong to.
    pub collections: usize,
    /// Bytes of element state written, over all PEs.
    pub bytes: u64,
    /// PEs of the job that wrote it (one file each).
    pub pes: usize,
}

/// A collection as saved: enough to register it again and to rebuild its elements.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SavedCollection {
    coll: CollectionId,
    shape: Shape,
    /// Entry-table id of the chare type's constructor.
    ctor: u64,
    /// The chare type's name, for messages.
    chare: String,
}

/// One element's state.
#[derive(Serialize, Deserialize)]
struct SavedElement {
    coll: CollectionId,
    index: Index,
    #[serde(with = "crate::wire::byte_vec")]
    state: Vec<u8>,
    /// Its channels: sequence numbers, and values that arrived and were not received yet.
    channels: Vec<crate::channel::ChannelEnd>,
}

/// `pe-<n>-<generation>.ckpt`: the elements PE `n` held.
#[derive(Serialize, Deserialize)]
struct PeFile {
    /// `magic` and `version` come first in every checkpoint file: `decode_file` reads them
    /// before the rest.
    magic: [u8; 8],
    version: u32,
    /// The checkpoint it belongs to (a random number, also in the metadata).
    generation: u64,
    pe: u32,
    elements: Vec<SavedElement>,
}

/// `checkpoint.meta`.
#[derive(Serialize, Deserialize)]
struct Meta {
    /// First, as in [`PeFile`].
    magic: [u8; 8],
    version: u32,
    /// The checkpoint's random number: its PE files carry it in their names and contents.
    generation: u64,
    /// PEs of the job that wrote the checkpoint (the number of PE files).
    pes: u32,
    /// Every collection id of the job that wrote it (restored or not: groups, sections) has a
    /// serial below this.
    serial_floor: u64,
    /// Checksum of the writing program's entry table.
    table: u64,
    elements: u64,
    collections: Vec<SavedCollection>,
    /// The program's own state (`checkpoint`'s `state`), postcard-encoded.
    state: Vec<u8>,
}

/// One PE's report after writing its file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PeSaved {
    bytes: u64,
    collections: Vec<PeCollection>,
    /// Collection ids this PE has made.
    made: u64,
}

/// One saved collection as one PE saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PeCollection {
    saved: SavedCollection,
    /// Elements saved here.
    elements: u64,
    /// Elements whose home is here, if known (an unsealed sparse array's is not). Over all PEs
    /// the two sums must agree.
    homed: Option<u64>,
}

/// One PE's report after reading its files: elements sent on, and for each sparse array the
/// elements sent to each home PE.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PeLoaded {
    elements: u64,
    sparse_homes: Vec<(CollectionId, Vec<u32>)>,
}

/// The hidden group whose elements do each PE's part of a checkpoint or a restart.
pub(crate) struct Checkpointer;

#[crate::chare]
impl Checkpointer {
    fn new() -> Self {
        Checkpointer
    }

    /// Writes this PE's elements to `dir`, as part of checkpoint `generation`.
    #[entry]
    fn save(&mut self, dir: String, generation: u64) -> std::result::Result<PeSaved, String> {
        with_pe("checkpoint", |pe| {
            pe.save_elements(Path::new(&dir), generation)
        })
        .map_err(|e| e.to_string())?
    }

    /// Registers the saved collections here, empty.
    #[entry]
    fn adopt(
        &mut self,
        collections: Vec<SavedCollection>,
        serial_floor: u64,
    ) -> std::result::Result<(), String> {
        with_pe("restore", |pe| pe.adopt_saved(&collections, serial_floor))
            .map_err(|e| e.to_string())?
    }

    /// Reads this PE's share of the files of `pes`-PE checkpoint `generation` in `dir`, sending
    /// every element to its home.
    #[entry]
    fn load(
        &mut self,
        dir: String,
        pes: u32,
        generation: u64,
        collections: Vec<SavedCollection>,
        dropped: Vec<CollectionId>,
    ) -> std::result::Result<PeLoaded, String> {
        with_pe("restore", |pe| {
            pe.load_elements(Path::new(&dir), pes, generation, &collections, &dropped)
        })
        .map_err(|e| e.to_string())?
    }

    /// Lets the broadcasts to the restored collections `colls` that waited on this PE go out:
    /// `restore` has every element in place.
    #[entry]
    fn settle(&mut self, colls: Vec<CollectionId>) {
        let _ = with_pe("restore", |pe| pe.restored(&colls));
    }
}

/// Writes a checkpoint of the job to directory `dir` (made if missing), with the program's own
/// `state` (what its entry point needs to go on: the step number, the proxies it holds).
///
/// Waits for quiescence first, so call it where the program waits for nothing but this (after a
/// reduction that ends a step, say). Every dense array, sparse array and single chare is saved:
/// their chare types must be `#[chare(migratable)]`. Groups are saved if their type is
/// migratable (they come back to a job of as many PEs only); sections are not saved. A
/// checkpoint already in `dir` is replaced once the new one is complete; if this one fails, the
/// previous one stands.
///
/// ```no_run
/// # use charmrs::prelude::*;
/// # #[derive(Clone, Serialize, Deserialize)] struct Cell { value: f64 }
/// # #[chare(migratable)] impl Cell { fn new() -> Self { Cell { value: 0.0 } }
/// #     #[entry] fn step(&mut self) { self.value += 1.0; } }
/// #[derive(Serialize, Deserialize)]
/// struct Progress { step: u32, cells: Array<Cell, usize> }
///
/// # fn main() { charmrs::start(|_args| async move {
/// let (mut progress, first) = match charmrs::restore::<Progress>("ckpt").await.unwrap() {
///     Some(p) => (p, false),                       // a restart: the cells are back
///     None => (Progress { step: 0, cells: Array::new(64, ()) }, true),
/// };
/// while progress.step < 100 {
///     progress.cells.step();
///     charmrs::wait_qd().await;
///     progress.step += 1;
///     if progress.step % 10 == 0 {
///         charmrs::checkpoint("ckpt", &progress).await.unwrap();
///     }
/// }
/// # let _ = first;
/// charmrs::exit(0);
/// # }); }
/// ```
///
/// # Errors
/// [`Error::Checkpoint`] naming what failed: not called on PE 0 (where the entry point runs), a
/// chare type that is not migratable, a busy element (suspended entry method, waiting `when`
/// calls, unfinished `async fn new`), a call, broadcast or reduction waiting for a sparse
/// array's insertion or `done_inserting`, a file that could not be written; [`Error::NotInRuntime`]
/// outside a running PE.
pub async fn checkpoint<S: Serialize>(dir: impl AsRef<Path>, state: &S) -> Result<Saved> {
    let state = postcard::to_allocvec(state)
        .map_err(|e| checkpoint_error(format!("serializing the program's state: {e}")))?;
    let dir = prepare_dir(dir.as_ref())?;
    let meta_path = dir.join(META);
    let group = checkpointer("charmrs::checkpoint")?;
    let _held = hold_balancing().await?;
    crate::wait_qd().await;
    let generation = new_generation();
    let reports = group.gather().save(path_string(&dir)?, generation).await;
    let pes = reports.len();
    // Until the metadata names this generation, the previous checkpoint in `dir` stands; a
    // failure removes what this one wrote.
    let failed = |e: Error| {
        remove_generations(&dir, |g| g == generation);
        e
    };
    let mut collections = BTreeMap::new();
    let (mut elements, mut bytes) = (0, 0);
    let mut tallies: BTreeMap<CollectionId, (u64, Option<u64>)> = BTreeMap::new();
    let mut serial_floor = 0;
    for report in reports {
        let report = report.map_err(|e| failed(checkpoint_error(e)))?;
        serial_floor = serial_floor.max(report.made);
        bytes += report.bytes;
        for c in report.collections {
            elements += c.elements;
            let t = tallies.entry(c.saved.coll).or_insert((0, Some(0)));
            t.0 += c.elements;
            t.1 = t.1.zip(c.homed).map(|(a, b)| a + b);
            collections.insert(c.saved.coll, c.saved);
        }
    }
    // Every element saved exactly once: a shortfall or a surplus would be a lost or doubled
    // element after the restart.
    for (coll, (saved, homed)) in tallies {
        if let Some(homed) = homed.filter(|&h| h != saved) {
            let chare = collections.get(&coll).map_or("?", |c| c.chare.as_str());
            return Err(failed(checkpoint_error(format!(
                "{saved} elements of {chare} {coll:?} were saved, and it has {homed}: elements \
                 moved while the PEs saved them; nothing was written as a checkpoint"
            ))));
        }
    }
    let meta = Meta {
        magic: MAGIC,
        version: VERSION,
        generation,
        pes: pes as u32,
        serial_floor,
        table: EntryTable::get().map_err(failed)?.checksum(),
        elements,
        collections: collections.into_values().collect(),
        state,
    };
    let encoded = postcard::to_allocvec(&meta).map_err(|e| {
        failed(checkpoint_error(format!(
            "encoding {}: {e}",
            meta_path.display()
        )))
    })?;
    // The PE files' renames reach the disk before the metadata that names them.
    sync_dir(&dir);
    write_atomically(&meta_path, |f| f.write_all(&encoded))
        .map_err(|e| failed(checkpoint_error(e)))?;
    // The metadata's rename reaches the disk before the files of earlier checkpoints go (a file
    // system need not keep the order of the two: a crash between them could otherwise leave the
    // old metadata naming deleted files).
    sync_dir(&dir);
    remove_generations(&dir, |g| g != generation);
    sync_dir(&dir);
    Ok(Saved {
        elements,
        collections: meta.collections.len(),
        bytes,
        pes,
    })
}

/// Restores the checkpoint in directory `dir`, if there is one (`Ok(None)` if `dir` holds no
/// checkpoint metadata), and returns the state the program gave [`checkpoint`].
///
/// Call it from the entry point before anything else touches the restored collections. The job
/// may have another number of PEs or processes than the one that wrote the checkpoint: every
/// element goes to its home under the new count (or where its array's map places it). Proxies
/// inside the state and inside elements address the restored collections. Restored sparse arrays
/// are sealed (`done_inserting` has been called). See [`checkpoint`] for an example.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file and the fault: unreadable or truncated files, another
/// format version, a checkpoint written by another program (its entry table differs), a single
/// chare on a PE this job lacks, a state that does not decode as `S`; also if not called on PE 0.
pub async fn restore<S: DeserializeOwned>(dir: impl AsRef<Path>) -> Result<Option<S>> {
    let dir = dir.as_ref();
    let meta_path = dir.join(META);
    let bytes = match std::fs::read(&meta_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", &meta_path, e)),
    };
    let meta: Meta = decode_file(&meta_path, &bytes)?;
    let dir = &dir
        .canonicalize()
        .map_err(|e| io_error("resolving the directory", dir, e))?;
    let table = EntryTable::get()?;
    if meta.table != table.checksum() {
        return Err(checkpoint_error(format!(
            "{} was written by another program (its entry table differs from this one's): \
             restart the program that wrote it",
            meta_path.display()
        )));
    }
    let num_pes = crate::num_pes();
    // A group's elements are per PE: they come back only to a job of as many PEs.
    let (collections, dropped): (Vec<SavedCollection>, Vec<SavedCollection>) = meta
        .collections
        .iter()
        .cloned()
        .partition(|c| !matches!(c.shape, Shape::Group) || meta.pes as usize == num_pes);
    for c in &collections {
        c.shape
            .check_size()
            .map_err(|e| checkpoint_error(format!("{}: {} {e}", meta_path.display(), c.chare)))?;
        construction(table, c).map_err(checkpoint_error)?;
        if let Shape::Single { pe } = c.shape {
            if pe as usize >= num_pes {
                return Err(checkpoint_error(format!(
                    "the single chare {} of {} lived on PE {pe}, and this job has {num_pes} PEs",
                    c.chare,
                    meta_path.display()
                )));
            }
        }
    }
    // Every PE's counter, saved or not, is below it: so is every saved collection's serial.
    let floor = meta.serial_floor;
    if with_pe("charmrs::restore", |pe| pe.collections_made())? > 0 {
        // A collection made before would hold one of the ids the restored ones take back.
        return Err(checkpoint_error(format!(
            "restore {} before making any collection: the entry point made one already",
            dir.display()
        )));
    }
    let group = checkpointer("charmrs::restore")?;
    let _held = hold_balancing().await?;
    for done in group.gather().adopt(collections.clone(), floor).await {
        done.map_err(checkpoint_error)?;
    }
    let dir_string = path_string(dir)?;
    let mut elements = 0;
    let mut sparse: BTreeMap<CollectionId, Vec<u32>> = BTreeMap::new();
    let loads = group.gather().load(
        dir_string,
        meta.pes,
        meta.generation,
        collections.clone(),
        dropped.iter().map(|c| c.coll).collect(),
    );
    for loaded in loads.await {
        let loaded = loaded.map_err(checkpoint_error)?;
        elements += loaded.elements;
        for (coll, homes) in loaded.sparse_homes {
            let total = sparse.entry(coll).or_insert_with(|| vec![0; num_pes]);
            for (t, h) in total.iter_mut().zip(homes) {
                *t += h;
            }
        }
    }
    if elements != meta.elements {
        return Err(checkpoint_error(format!(
            "the PE files of {} hold {elements} elements; its metadata says {}",
            dir.display(),
            meta.elements
        )));
    }
    // Every element is on its way home; quiescence means every one has arrived. Broadcasts
    // made meanwhile (from a `migrated` hook) waited on each PE; they go out now, and reach
    // every element.
    crate::wait_qd().await;
    for c in &collections {
        if let Shape::Sparse { .. } = c.shape {
            let counts = sparse.remove(&c.coll).unwrap_or_else(|| vec![0; num_pes]);
            with_pe("charmrs::restore", |pe| pe.broadcast_seal(c.coll, counts))?;
        }
    }
    let colls: Vec<CollectionId> = collections.iter().map(|c| c.coll).collect();
    group.gather().settle(colls).await;
    let state = rehoming(|| crate::wire::decoded(&meta.state)).map_err(|e| {
        checkpoint_error(format!(
            "the program's state in {} does not decode as {}: {e}",
            meta_path.display(),
            std::any::type_name::<S>()
        ))
    })?;
    Ok(Some(state))
}

/// Periodic load balancing held while it lives (see [`hold_balancing`]).
struct BalancingHeld;

impl Drop for BalancingHeld {
    fn drop(&mut self) {
        let _ = with_pe("charmrs::checkpoint", |pe| {
            pe.hold_periodic_balancing(false)
        });
    }
}

/// Holds periodic load balancing (`+LBPeriod`, started by PE 0 on a timer, whose load reports
/// quiescence does not count) and waits until a step started before has ordered its
/// migrations, which quiescence then covers: no element moves while PEs save or restore.
async fn hold_balancing() -> Result<BalancingHeld> {
    while with_pe("charmrs::checkpoint", |pe| pe.hold_periodic_balancing(true))? {
        crate::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(BalancingHeld)
}

/// The group of [`Checkpointer`]s, made on first use under its reserved id (calls on PE 0 only,
/// so it is made once).
fn checkpointer(what: &'static str) -> Result<Proxy<Checkpointer>> {
    with_pe(what, |pe| {
        if pe.pe != 0 {
            return Err(checkpoint_error(format!(
                "`{what}` was called on PE {}: call it from the entry point (PE 0)",
                pe.pe
            )));
        }
        Ok(pe.hidden_group(CollectionId::CHECKPOINTER, || {
            Construct::<Checkpointer>::boxed(())
        }))
    })?
}

/// How to build elements of saved collection `c` in this program: its constructor, as an
/// empty sparse array's creation carries it (no arguments: restored elements are unpacked).
fn construction(
    table: &EntryTable,
    c: &SavedCollection,
) -> std::result::Result<Box<dyn Construction>, String> {
    let unknown = || {
        format!(
            "this program has no chare type {} (constructor id {:#x})",
            c.chare, c.ctor
        )
    };
    let info = table
        .wire_id(c.ctor)
        .and_then(|w| table.by_wire_id(w))
        .ok_or_else(unknown)?;
    let Decoder::Constructor(crate::wire::ConstructorCodec { decode, .. }) = info.decoder else {
        return Err(unknown());
    };
    // postcard's encoding of `None`: no constructor arguments.
    let build = decode(&[0]).map_err(|e| format!("{}: {e}", c.chare))?.0;
    if !build.mobility().migratable {
        return Err(format!(
            "chare {} is not migratable in this program",
            build.chare_name()
        ));
    }
    Ok(build)
}

impl PeState {
    /// [`Checkpointer::save`]: packs every element here of every saved kind of collection and
    /// writes them to `dir/pe-<n>-<generation>.ckpt`.
    fn save_elements(&self, dir: &Path, generation: u64) -> std::result::Result<PeSaved, String> {
        let mut collections = Vec::new();
        let mut elements = Vec::new();
        let mut bytes = 0u64;
        {
            let cols = self.collections.borrow();
            let mut ids: Vec<CollectionId> = cols.keys().copied().collect();
            ids.sort();
            for coll in ids {
                let c = &cols[&coll];
                if coll.is_section() || coll == CollectionId::CHECKPOINTER {
                    continue;
                }
                if matches!(c.shape, Shape::Group) && !c.mobility.migratable {
                    // A group of a type that cannot be serialized: the program makes it again.
                    continue;
                }
                if !c.mobility.migratable {
                    return Err(format!(
                        "chare {} ({}) is not migratable, so it cannot be checkpointed: declare \
                         it with #[chare(migratable)] and derive Serialize and Deserialize",
                        c.chare,
                        c.shape.describe()
                    ));
                }
                if let Some(index) = c.under_construction() {
                    return Err(format!(
                        "element {index} of {} on PE {} is still being built (async fn new)",
                        c.chare, self.pe
                    ));
                }
                if let Some(what) = self.waiting_for_insertions(coll, c) {
                    return Err(format!(
                        "{what}: a checkpoint does not save it; checkpoint where nothing waits \
                         (after the insertion, or after done_inserting)"
                    ));
                }
                collections.push(PeCollection {
                    saved: SavedCollection {
                        coll,
                        shape: c.shape,
                        ctor: c.ctor,
                        chare: c.chare.to_owned(),
                    },
                    elements: c.elements.len() as u64,
                    homed: self.homes_here(coll, &c.shape).map(|n| n as u64),
                });
                for (index, element) in c.elements.iter() {
                    // The table holds one reference: more means a suspended entry method.
                    if Rc::strong_count(element) > 1 || element.pinned() {
                        return Err(format!(
                            "element {index} of {} on PE {} is busy: an entry method of it is \
                             suspended, or `when` calls wait at it; checkpoint where none is",
                            c.chare, self.pe
                        ));
                    }
                    let state = element
                        .pack()
                        .map_err(|e| format!("element {index} of {}: {e}", c.chare))?;
                    let mut channels = element.channel_snapshot();
                    crate::channel::encode_values(&mut channels)
                        .map_err(|e| format!("element {index} of {}: {e}", c.chare))?;
                    bytes += state.len() as u64;
                    elements.push(SavedElement {
                        coll,
                        index: *index,
                        state,
                        channels,
                    });
                }
            }
        }
        let file = PeFile {
            magic: MAGIC,
            version: VERSION,
            generation,
            pe: self.pe as u32,
            elements,
        };
        let path = pe_file(dir, self.pe, generation);
        // Encoded straight into the file: each state is one write of its bytes.
        write_atomically(&path, |f| {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
            postcard::to_io(&file, &mut out).map_err(std::io::Error::other)?;
            out.flush()
        })?;
        Ok(PeSaved {
            bytes,
            collections,
            made: self.collections_made(),
        })
    }

    /// [`Checkpointer::adopt`]: registers the saved collections here, with no elements (a
    /// single chare only on its own PE).
    fn adopt_saved(
        &self,
        collections: &[SavedCollection],
        serial_floor: u64,
    ) -> std::result::Result<(), String> {
        let table = EntryTable::get().map_err(|e| e.to_string())?;
        self.prepare_restore(serial_floor, collections.iter().map(|c| c.coll).collect());
        for c in collections {
            if matches!(c.shape, Shape::Single { pe } if pe as usize != self.pe) {
                continue;
            }
            let build = construction(table, c)?;
            self.adopt(c.coll, c.shape, &*build)?;
            if let Some(adopted) = self.collections.borrow_mut().get_mut(&c.coll) {
                adopted.restoring = true;
            }
        }
        Ok(())
    }

    /// [`Checkpointer::settle`]: every element of `colls` is in place; their broadcasts that
    /// waited here meanwhile go out.
    pub(crate) fn restored(&self, colls: &[CollectionId]) {
        for coll in colls {
            let held = self
                .collections
                .borrow_mut()
                .get_mut(coll)
                .map(|c| {
                    c.restoring = false;
                    std::mem::take(&mut c.unsealed_broadcasts)
                })
                .unwrap_or_default();
            // A sparse array not sealed yet keeps them (again) until its seal.
            for env in held {
                self.deliver(env);
            }
        }
    }

    /// [`Checkpointer::load`]: reads the files of old PEs `pe, pe + n, …` (`n` PEs now) and sends
    /// each element to its home under the new PE count.
    fn load_elements(
        &self,
        dir: &Path,
        pes: u32,
        generation: u64,
        collections: &[SavedCollection],
        dropped: &[CollectionId],
    ) -> std::result::Result<PeLoaded, String> {
        let n = self.num_pes();
        let shapes: BTreeMap<CollectionId, Shape> =
            collections.iter().map(|c| (c.coll, c.shape)).collect();
        let mut sent = 0u64;
        let mut sparse: BTreeMap<CollectionId, Vec<u32>> = BTreeMap::new();
        for old in (self.pe..pes as usize).step_by(n) {
            let path = pe_file(dir, old, generation);
            let bytes =
                std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let file: PeFile = decode_file(&path, &bytes).map_err(|e| e.to_string())?;
            if file.generation != generation {
                return Err(format!(
                    "{} belongs to another checkpoint than {}'s",
                    path.display(),
                    META
                ));
            }
            if file.pe as usize != old {
                return Err(format!(
                    "{} holds the elements of PE {}, not of PE {old}",
                    path.display(),
                    file.pe
                ));
            }
            for e in file.elements {
                if dropped.contains(&e.coll) {
                    // A group saved by a job of another PE count: read, not restored.
                    sent += 1;
                    continue;
                }
                let shape = shapes.get(&e.coll).copied().ok_or_else(|| {
                    format!(
                        "{} holds element {} of {:?}, a collection the metadata does not list",
                        path.display(),
                        e.index,
                        e.coll
                    )
                })?;
                // Placed as well as in range: a map may not place it under this PE count.
                shape
                    .check_placed(&e.index, n)
                    .map_err(|err| format!("{}: {err}", path.display()))?;
                let home = shape.home_pe(&e.index, n);
                if let Shape::Sparse { .. } = shape {
                    sparse.entry(e.coll).or_insert_with(|| vec![0; n])[home] += 1;
                    // Counted as an insertion issued here (its home records it on arrival), so
                    // that a later `done_inserting`'s census balances.
                    *self.inserts_issued.borrow_mut().entry(e.coll).or_default() += 1;
                }
                // Its unreceived channel values are decoded, when received, as restored state.
                let mut channels = e.channels;
                for end in &mut channels {
                    for (_, data) in &mut end.arrived {
                        data.mark_restored();
                    }
                }
                let migrant = Migrant {
                    coll: e.coll,
                    index: e.index,
                    epoch: 0,
                    reductions: 0,
                    load: 0.0,
                    channels,
                    sections: Vec::new(),
                    state: e.state,
                    balance: None,
                };
                self.send(
                    home,
                    Envelope::new(MIGRATION_ORDER, Control::Migrate(Box::new(migrant))),
                );
                sent += 1;
            }
        }
        Ok(PeLoaded {
            elements: sent,
            sparse_homes: sparse.into_iter().collect(),
        })
    }
}

fn pe_file(dir: &Path, pe: usize, generation: u64) -> PathBuf {
    dir.join(format!("pe-{pe}-{generation:016x}.ckpt"))
}

/// A fresh checkpoint's number: the clock's nanoseconds and the process id, mixed.
fn new_generation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Removes the PE files in `dir` (and temporary files left by a writer that died) of the
/// checkpoints whose number `which` picks (best effort: a file left behind is never read, the
/// metadata names the files it needs).
fn remove_generations(dir: &Path, which: impl Fn(u64) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let generation = name
            .strip_prefix("pe-")
            .and_then(|rest| {
                rest.strip_suffix(".ckpt")
                    .or_else(|| rest.strip_suffix(".tmp"))
            })
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(_, g)| u64::from_str_radix(g, 16).ok());
        if generation.is_some_and(&which) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Syncs `dir` itself, so the renames into it survive a crash of the host (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Makes `dir` and returns it absolute: every process of the job (all started in one working
/// directory, or on nodes sharing the file system) writes and reads under the same path.
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("making the directory", dir, e))?;
    dir.canonicalize()
        .map_err(|e| io_error("resolving the directory", dir, e))
}

fn path_string(dir: &Path) -> Result<String> {
    dir.to_str().map(str::to_owned).ok_or_else(|| {
        checkpoint_error(format!(
            "the directory {} is not valid UTF-8",
            dir.display()
        ))
    })
}

/// Writes `path` with `write` through a temporary file, synced, then renamed over it: a reader
/// sees the old file or the whole new one.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::result::Result<(), String> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

/// Decodes checkpoint file `path` (`bytes`), after checking the magic and format version that
/// begin every one, so that a file of another version is named as such, not as damaged.
fn decode_file<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    match postcard::take_from_bytes::<([u8; 8], u32)>(bytes) {
        Ok(((magic, version), _)) if magic == MAGIC => {
            if version != VERSION {
                return Err(checkpoint_error(format!(
                    "{} has format version {version}; this program reads version {VERSION}",
                    path.display()
                )));
            }
        }
        _ => {
            return Err(checkpoint_error(format!(
                "{} is not a charmrs checkpoint file",
                path.display()
            )))
        }
    }
    // Under `rehoming`: PE numbers in the file are the old job's, which `restore` checks
    // itself (a single chare on a PE this job lacks is refused naming it).
    rehoming(|| crate::wire::decoded(bytes)).map_err(|e| {
        checkpoint_error(format!(
            "{} is damaged or truncated ({} bytes): {e}",
            path.display(),
            bytes.len()
        ))
    })
}

fn checkpoint_error(why: String) -> Error {
    Error::Checkpoint(why)
}

fn io_error(doing: &str, path: &Path, e: std::io::Error) -> Error {
    checkpoint_error(format!("{doing} {}: {e}", path.display()))
}

thread_local! {
    /// Set while state read back from a checkpoint is decoded on this thread ([`rehoming`]).
    static REHOMING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `decode` (of an element's or the program's state, read back from a checkpoint) so that
/// every [`ElementProxy`](crate::ElementProxy) decoded in it addresses its element's home in
/// this job ([`rehomed`]): the PE it remembers is the home under the old PE count.
pub(crate) fn rehoming<R>(decode: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            REHOMING.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(REHOMING.with(|r| r.replace(true)));
    decode()
}

/// Whether state read back from a checkpoint is being decoded on this thread ([`rehoming`]).
#[inline(always)]
pub(crate) fn is_rehoming() -> bool {
    REHOMING.with(Cell::get)
}

/// Inside [`rehoming`]: the home PE in this job of element `index` of `coll`, if this PE knows
/// the collection. `None` elsewhere (the proxy keeps its PE), at no cost but a flag's read.
#[inline(always)]
pub(crate) fn rehomed(coll: CollectionId, index: &Index) -> Option<u32> {
    if !is_rehoming() {
        return None;
    }
    home_now(coll, index)
}

/// Inside [`rehoming`]: where an element proxy saved with home `saved` points in this job: its
/// element's home if this PE knows the collection; else (a collection the restart did not bring
/// back: a group saved by a job of another PE count) `saved` if this job has that PE, or one it
/// has, where a call through it aborts naming the collection as one made before the restart.
#[cold]
#[inline(never)]
pub(crate) fn rehomed_proxy(coll: CollectionId, index: &Index, saved: u32) -> u32 {
    home_now(coll, index).unwrap_or_else(|| {
        with_pe("rehoming a proxy", |pe| pe.num_pes())
            .map_or(saved, |n| (saved as usize % n.max(1)) as u32)
    })
}

/// [`rehomed`]'s lookup, out of the way of every other decode.
#[cold]
#[inline(never)]
fn home_now(coll: CollectionId, index: &Index) -> Option<u32> {
    with_pe("rehoming a proxy", |pe| {
        let cols = pe.collections.try_borrow().ok()?;
        let shape = cols.get(&coll)?.shape;
        Some(shape.home_pe(index, pe.num_pes()) as u32)
    })
    .ok()
    .flatten()
}

/// Keeps this module's registrations (the `Checkpointer` entries) in every binary that links
/// the runtime: the entry table calls it, so the linker cannot leave this module out.
#[inline(never)]
pub(crate) fn linked() -> &'static str {
    <Checkpointer as Chare>::NAME
}
