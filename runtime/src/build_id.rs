//! The running executable's build id: the linker's `NT_GNU_BUILD_ID` note, read from
//! `/proc/self/exe`, so that processes of one job can check they run the same build, not only the
//! same entry table (a struct argument whose fields changed keeps its type's name, and two
//! builds would decode each other's calls as garbage).
//!
//! # Invariants
//!
//! * Read once per process; `None` where there is none to read (not Linux, not a 64-bit
//!   little-endian ELF file, or linked without `--build-id`, which Debian's and most
//!   distributions' `cc` pass by default): then nothing is checked.
//! * Only safe file reads: a malformed file gives `None`, never a panic.

use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

/// `PT_NOTE`: a program header of notes.
const PT_NOTE: u32 = 4;
/// `NT_GNU_BUILD_ID`, owned by "GNU".
const NT_GNU_BUILD_ID: u32 = 3;
/// Largest note segment read (build-id notes are a few dozen bytes).
const MAX_NOTES: u64 = 1 << 16;

/// This executable's build id, if it has one.
pub(crate) fn build_id() -> Option<&'static [u8]> {
    static ID: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    ID.get_or_init(|| read_build_id("/proc/self/exe"))
        .as_deref()
}

/// The build id of the ELF file at `path`.
fn read_build_id(path: &str) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).ok()?;
    // ELF, 64-bit (class 2), little-endian (data 1).
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return None;
    }
    let phoff = u64_at(&header, 0x20)?;
    let phentsize = u64::from(u16_at(&header, 0x36)?);
    let phnum = u64::from(u16_at(&header, 0x38)?);
    if phentsize < 56 || phnum > 4096 {
        return None;
    }
    let mut headers = vec![0u8; (phentsize * phnum) as usize];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut headers).ok()?;
    for ph in headers.chunks_exact(phentsize as usize) {
        if u32_at(ph, 0)? != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(ph, 0x08)?, u64_at(ph, 0x20)?);
        if size > MAX_NOTES {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset)).ok()?;
        file.read_exact(&mut notes).ok()?;
        if let Some(id) = find_build_id(&notes) {
            return Some(id.to_vec());
        }
    }
    None
}

/// The descriptor of the `GNU` build-id note among `notes` (a note segment's bytes).
fn find_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    let padded = |n: u32| (n as usize).checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (u32_at(notes, 0)?, u32_at(notes, 4)?, u32_at(notes, 8)?);
        let name_end = 12usize.checked_add(padded(namesz)?)?;
        let desc_end = name_end.checked_add(padded(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && notes[12..12 + namesz as usize] == *b"GNU\0" {
            return Some(&notes[name_end..name_end + descsz as usize]);
        }
        notes = &notes[desc_end..];
    }
    None
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::{build_id, find_build_id, read_build_id};

    /// The test binary, linked as every binary of this workspace is, has a build id, read the
    /// same way twice.
    #[test]
    fn this_executable_has_a_build_id() {
        let id = build_id().expect("linked with --build-id");
        assert!(id.len() >= 8, "{id:?}");
        assert_eq!(read_build_id("/proc/self/exe").as_deref(), Some(id));
    }

    #[test]
    fn notes_are_parsed_and_malformed_ones_give_none() {
        // An ABI-tag note, then the build id.
        let mut notes = Vec::new();
        notes.extend_from_slice(&[4, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0]);
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0; 16]);
        notes.extend_from_slice(&[4, 0, 0, 0, 5, 0, 0, 0, 3, 0, 0, 0]);
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(find_build_id(&notes), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(find_build_id(&notes[..notes.len() - 4]), None);
        let huge = [
            4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 3, 0, 0, 0, b'G', b'N', b'U', 0,
        ];
        assert_eq!(find_build_id(&huge), None);
        assert_eq!(read_build_id("/nonexistent"), None);
        assert_eq!(read_build_id("/proc/self/status"), None);
    }
}
