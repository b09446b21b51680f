//! Tracing (`+trace FILE`, [`Runtime::trace`](crate::Runtime::trace)): each PE's timeline of
//! entry executions, resumptions of suspended entries and idle periods, written at the end of
//! the job as Chrome/Perfetto trace JSON (the role of Charm++'s Projections logs), and a summary
//! printed to standard error: time per PE, time and calls per entry, network messages and bytes.
//!
//! # What this module owns
//!
//! * [`Tracer`]: one PE's record, kept by the PE itself (plain cells, no locks or atomics) and
//!   handed to the process's [`TraceSink`] when the PE stops.
//! * [`TraceSink`]: the records of a process's PEs, written once the job ended.
//!
//! # Invariants
//!
//! * With tracing off nothing is read or recorded: the PE holds no tracer, and each hook is one
//!   test of an `Option`.
//! * A PE keeps at most [`MAX_SPANS`] spans for the timeline; later spans still count in the
//!   summary, and the file records how many were dropped.
//! * Spans are timed with the measurement clock (`measure::ticks`) and written as microseconds
//!   since the UNIX epoch, so the files of different processes share one time axis (as far as
//!   their hosts' clocks agree). A multi-process job writes one file per process: `FILE` with the
//!   process rank before its extension (`trace.json` → `trace.3.json`).

use crate::index::Index;
use crate::measure::ticks;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Spans one PE keeps for the timeline (~48 MB at most); beyond, they are counted only.
pub(crate) const MAX_SPANS: usize = 1 << 20;

/// What a span of a PE's time was spent on.
#[derive(Clone, Copy)]
enum What {
    /// An entry method called by a message (its synchronous part, and the first poll of a
    /// suspendable entry).
    Entry { name: &'static str, index: Index },
    /// A suspended entry (or the entry point) running again after what it awaited arrived.
    Resume { name: &'static str },
    /// Waiting for messages.
    Idle,
}

#[derive(Clone, Copy)]
struct Span {
    what: What,
    start: u64,
    end: u64,
}

/// Calls and time of one entry on one PE.
#[derive(Clone, Copy, Default)]
struct EntryStat {
    calls: u64,
    resumes: u64,
    ticks: u64,
    max_ticks: u64,
}

/// Messages and bytes that crossed the machine layer.
#[derive(Clone, Copy, Default)]
struct NetCounts {
    sent: u64,
    sent_bytes: u64,
    received: u64,
    received_bytes: u64,
}

/// One PE's trace record (see the module docs).
pub(crate) struct Tracer {
    pe: usize,
    spans: RefCell<Vec<Span>>,
    dropped: Cell<u64>,
    stats: RefCell<FxHashMap<&'static str, EntryStat>>,
    idle_ticks: Cell<u64>,
    net: Cell<NetCounts>,
    /// A tick count and the UNIX time it stands for, in microseconds.
    anchor: (u64, f64),
    secs_per_tick: f64,
}

impl Tracer {
    pub(crate) fn new(pe: usize, secs_per_tick: f64) -> Tracer {
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        Tracer {
            pe,
            spans: RefCell::new(Vec::with_capacity(4096)),
            dropped: Cell::new(0),
            stats: RefCell::new(FxHashMap::default()),
            idle_ticks: Cell::new(0),
            net: Cell::new(NetCounts::default()),
            anchor: (ticks(), unix_us),
            secs_per_tick,
        }
    }

    /// A timestamp for [`entry`](Self::entry) and friends.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        ticks()
    }

    fn keep(&self, span: Span) {
        let mut spans = self.spans.borrow_mut();
        if spans.len() < MAX_SPANS {
            spans.push(span);
        } else {
            self.dropped.set(self.dropped.get() + 1);
        }
    }

    fn count(&self, name: &'static str, took: u64, resumed: bool) {
        let mut stats = self.stats.borrow_mut();
        let s = stats.entry(name).or_default();
        if resumed {
            s.resumes += 1;
        } else {
            s.calls += 1;
        }
        s.ticks += took;
        s.max_ticks = s.max_ticks.max(took);
    }

    /// Entry method `name` (`Chare::entry`) of element `index` ran from `start` to now.
    pub(crate) fn entry(&self, name: &'static str, index: Index, start: u64) {
        let end = ticks();
        self.count(name, end.saturating_sub(start), false);
        self.keep(Span {
            what: What::Entry { name, index },
            start,
            end,
        });
    }

    /// Suspended task `name` (an entry method, or the entry point) ran again from `start` to
    /// now.
    pub(crate) fn resumed(&self, name: &'static str, start: u64) {
        let end = ticks();
        self.count(name, end.saturating_sub(start), true);
        self.keep(Span {
            what: What::Resume { name },
            start,
            end,
        });
    }

    /// The PE waited for messages from `start` to `end`.
    pub(crate) fn idle(&self, start: u64, end: u64) {
        self.idle_ticks
            .set(self.idle_ticks.get() + end.saturating_sub(start));
        self.keep(Span {
            what: What::Idle,
            start,
            end,
        });
    }

    /// A message of `bytes` bytes left through the machine layer.
    pub(crate) fn sent(&self, bytes: usize) {
        let mut n = self.net.get();
        n.sent += 1;
        n.sent_bytes += bytes as u64;
        self.net.set(n);
    }

    /// A message of `bytes` bytes arrived through the machine layer (counted by the PE that
    /// polls it, for the whole process).
    pub(crate) fn received(&self, bytes: usize) {
        let mut n = self.net.get();
        n.received += 1;
        n.received_bytes += bytes as u64;
        self.net.set(n);
    }

    /// What this record holds so far, moved out (the PE is stopping).
    pub(crate) fn take(&self) -> Tracer {
        Tracer {
            pe: self.pe,
            spans: RefCell::new(self.spans.take()),
            dropped: Cell::new(self.dropped.get()),
            stats: RefCell::new(self.stats.take()),
            idle_ticks: Cell::new(self.idle_ticks.get()),
            net: Cell::new(self.net.get()),
            anchor: self.anchor,
            secs_per_tick: self.secs_per_tick,
        }
    }

    /// Microseconds since the UNIX epoch at tick `t`.
    fn unix_us(&self, t: u64) -> f64 {
        let (t0, us0) = self.anchor;
        us0 + (t as f64 - t0 as f64) * self.secs_per_tick * 1e6
    }

    fn micros(&self, ticks: u64) -> f64 {
        ticks as f64 * self.secs_per_tick * 1e6
    }
}

/// The records of this process's PEs, written when the job ends.
pub(crate) struct TraceSink {
    path: PathBuf,
    records: Mutex<Vec<(Tracer, f64)>>,
}

impl TraceSink {
    pub(crate) fn new(path: impl Into<PathBuf>) -> TraceSink {
        TraceSink {
            path: path.into(),
            records: Mutex::new(Vec::new()),
        }
    }

    /// A PE stopped after `wall` seconds: its record joins the process's.
    pub(crate) fn hand_in(&self, tracer: Tracer, wall: f64) {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((tracer, wall));
    }

    /// The file this process writes: the path itself for a single process, else the path with
    /// `.rank` before its extension.
    pub(crate) fn file_for(&self, rank: u32, size: u32) -> PathBuf {
        if size <= 1 {
            return self.path.clone();
        }
        let stem = self
            .path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
        let name = match self.path.extension() {
            Some(ext) => format!("{stem}.{rank}.{}", ext.to_string_lossy()),
            None => format!("{stem}.{rank}"),
        };
        self.path.with_file_name(name)
    }

    /// Writes this process's timeline and prints its summary to standard error; a file that
    /// cannot be written is reported there too (the job's outcome stands).
    pub(crate) fn finish(&self, rank: u32, size: u32) {
        let mut records = std::mem::take(
            &mut *self
                .records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        records.sort_by_key(|(t, _)| t.pe);
        let file = self.file_for(rank, size);
        let written = write_timeline(&file, rank, &records);
        eprint!(
            "{}",
            summary(rank, size, &file, written.as_ref().err(), &records)
        );
    }
}

/// Writes `records` as Chrome trace JSON (process = `pid`, PE = `tid`).
fn write_timeline(file: &Path, rank: u32, records: &[(Tracer, f64)]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    writeln!(out, "{{\"traceEvents\":[")?;
    write!(
        out,
        "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{rank},\"args\":{{\"name\":\"process {rank}\"}}}}"
    )?;
    let mut line = String::new();
    let mut dropped = 0;
    for (t, _) in records {
        dropped += t.dropped.get();
        write!(
            out,
            ",\n{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{rank},\"tid\":{pe},\"args\":{{\"name\":\"PE {pe}\"}}}}",
            pe = t.pe
        )?;
        for span in t.spans.borrow().iter() {
            line.clear();
            let (name, cat) = match span.what {
                What::Entry { name, .. } => (name, "entry"),
                What::Resume { name } => (name, "resume"),
                What::Idle => ("idle", "idle"),
            };
            let _ = write!(
                line,
                ",\n{{\"name\":{},\"cat\":\"{cat}\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":{rank},\"tid\":{}",
                json_string(name),
                t.unix_us(span.start),
                t.micros(span.end.saturating_sub(span.start)),
                t.pe
            );
            if let What::Entry { index, .. } = span.what {
                let _ = write!(
                    line,
                    ",\"args\":{{\"index\":{}}}",
                    json_string(&index.to_string())
                );
            }
            line.push('}');
            out.write_all(line.as_bytes())?;
        }
    }
    writeln!(
        out,
        "\n],\"displayTimeUnit\":\"ns\",\"otherData\":{{\"dropped_spans\":\"{dropped}\"}}}}"
    )?;
    out.flush()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The summary table of this process (see the module docs).
fn summary(
    rank: u32,
    processes: u32,
    file: &Path,
    error: Option<&std::io::Error>,
    records: &[(Tracer, f64)],
) -> String {
    let mut s = String::new();
    let pes = match (records.first(), records.last()) {
        (Some((a, _)), Some((b, _))) if a.pe == b.pe => format!("PE {}", a.pe),
        (Some((a, _)), Some((b, _))) => format!("PEs {}-{}", a.pe, b.pe),
        _ => "no PEs".to_string(),
    };
    let spans: usize = records.iter().map(|(t, _)| t.spans.borrow().len()).sum();
    let dropped: u64 = records.iter().map(|(t, _)| t.dropped.get()).sum();
    match error {
        None => {
            let _ = write!(
                s,
                "charmrs trace: process {rank} ({pes}): {spans} spans written to {}",
                file.display()
            );
            if dropped > 0 {
                let _ = write!(s, " ({dropped} more dropped: {MAX_SPANS} per PE at most)");
            }
            s.push('\n');
        }
        Some(e) => {
            let _ = writeln!(
                s,
                "charmrs trace: process {rank} ({pes}): could not write {}: {e}",
                file.display()
            );
        }
    }
    let _ = writeln!(
        s,
        "  {:>5} {:>10} {:>10} {:>10} {:>10}",
        "PE", "wall s", "entries s", "idle s", "other s"
    );
    let mut by_entry: FxHashMap<&str, EntryStat> = FxHashMap::default();
    let mut net = NetCounts::default();
    let mut secs_per_tick = 0.0;
    for (t, wall) in records {
        secs_per_tick = t.secs_per_tick;
        let mut busy = 0;
        for (key, st) in t.stats.borrow().iter() {
            busy += st.ticks;
            let e = by_entry.entry(*key).or_default();
            e.calls += st.calls;
            e.resumes += st.resumes;
            e.ticks += st.ticks;
            e.max_ticks = e.max_ticks.max(st.max_ticks);
        }
        let n = t.net.get();
        net.sent += n.sent;
        net.sent_bytes += n.sent_bytes;
        net.received += n.received;
        net.received_bytes += n.received_bytes;
        let entries = busy as f64 * t.secs_per_tick;
        let idle = t.idle_ticks.get() as f64 * t.secs_per_tick;
        let _ = writeln!(
            s,
            "  {:>5} {:>10.4} {:>10.4} {:>10.4} {:>10.4}",
            t.pe,
            wall,
            entries,
            idle,
            (wall - entries - idle).max(0.0)
        );
    }
    let mut entries: Vec<_> = by_entry.into_iter().collect();
    entries.sort_by(|a, b| b.1.ticks.cmp(&a.1.ticks).then(a.0.cmp(b.0)));
    let _ = writeln!(
        s,
        "  {:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "entry", "calls", "resumes", "total s", "mean µs", "max µs"
    );
    for (name, st) in entries {
        let runs = (st.calls + st.resumes).max(1);
        let _ = writeln!(
            s,
            "  {:<40} {:>10} {:>10} {:>10.4} {:>10.2} {:>10.2}",
            name,
            st.calls,
            st.resumes,
            st.ticks as f64 * secs_per_tick,
            st.ticks as f64 * secs_per_tick * 1e6 / runs as f64,
            st.max_ticks as f64 * secs_per_tick * 1e6
        );
    }
    if processes > 1 {
        let _ = writeln!(
            s,
            "  network: {} messages ({} bytes) sent, {} messages ({} bytes) received",
            net.sent, net.sent_bytes, net.received, net.received_bytes
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_carry_the_rank_of_multi_process_jobs() {
        let sink = TraceSink::new("/tmp/run/trace.json");
        assert_eq!(sink.file_for(0, 1), PathBuf::from("/tmp/run/trace.json"));
        assert_eq!(sink.file_for(3, 4), PathBuf::from("/tmp/run/trace.3.json"));
        let bare = TraceSink::new("out");
        assert_eq!(bare.file_for(1, 2), PathBuf::from("out.1"));
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_string("x\ny"), r#""x\u000ay""#);
    }

    #[test]
    fn the_summary_adds_up_entries_and_names_the_network_only_across_processes() {
        crate::measure::init_clock();
        let t = Tracer::new(4, 1e-6);
        t.entry("Cell::step", Index::SCALAR, t.now().saturating_sub(3));
        t.resumed("Cell::step", t.now().saturating_sub(5));
        t.idle(0, 10);
        t.sent(100);
        t.received(40);
        let records = vec![(t.take(), 1.0)];
        let one = summary(0, 1, Path::new("x.json"), None, &records);
        assert!(
            one.contains("process 0 (PE 4): 3 spans written to x.json"),
            "{one}"
        );
        assert!(!one.contains("network"), "{one}");
        let line = one.lines().find(|l| l.contains("Cell::step")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..3], ["Cell::step", "1", "1"], "{one}");
        let two = summary(1, 2, Path::new("x.1.json"), None, &records);
        assert!(
            two.contains("network: 1 messages (100 bytes) sent, 1 messages (40 bytes) received"),
            "{two}"
        );
    }

    #[test]
    fn spans_beyond_the_cap_are_counted_not_kept() {
        crate::measure::init_clock();
        let t = Tracer::new(0, 1e-9);
        for _ in 0..MAX_SPANS + 5 {
            t.idle(0, 1);
        }
        assert_eq!(t.spans.borrow().len(), MAX_SPANS);
        assert_eq!(t.dropped.get(), 5);
        assert_eq!(t.idle_ticks.get(), (MAX_SPANS + 5) as u64);
    }
}
