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
//! * Spans of one PE are disjoint or nested (a constructor that finishes delivers the calls
//!   that waited for it from inside its own span); the summary charges each span its own time
//!   only, without that of the spans inside it, so no time is counted twice.
//! * Spans are timed with the measurement clock (`measure::ticks`) and written as microseconds
//!   since the UNIX epoch — interpolated between a (ticks, UNIX time) pair taken when the PE
//!   starts and one taken when it stops — so the files of different processes share one time
//!   axis (as far as their hosts' clocks agree; a double resolves ~0.25 µs at today's epoch
//!   times, durations are exact to the clock). A multi-process job writes one file per process:
//!   `FILE` with the process rank before its extension (`trace.json` → `trace.3.json`).
//! * A PE that does not stop in time at the end of the job (see `Runtime::run`'s grace period)
//!   is missing from the file; the summary names it.

use crate::index::Index;
use crate::measure::ticks;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Spans one PE keeps for the timeline (64 bytes each: 64 MiB); beyond, they are counted only.
pub(crate) const MAX_SPANS: usize = 1 << 20;

/// Spans per chunk of a PE's record (4 MiB): a full chunk is followed by a new one, so a growing
/// record is never copied (the recording PE would stall for the copy).
const CHUNK: usize = 1 << 16;

/// What a span of a PE's time was spent on.
#[derive(Clone, Copy)]
enum What {
    /// An entry method called by a message (its synchronous part, and the first poll of a
    /// suspendable entry).
    Entry { name: &'static str, index: Index },
    /// A suspended entry (or the entry point) running again after what it awaited arrived.
    Resume { name: &'static str },
    /// A task of the pool (`#[charmrs::task]`), the items of one message.
    Task { name: &'static str },
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
    /// In chunks of [`CHUNK`] spans, oldest first.
    spans: RefCell<Vec<Vec<Span>>>,
    kept: Cell<usize>,
    dropped: Cell<u64>,
    stats: RefCell<FxHashMap<&'static str, EntryStat>>,
    idle_ticks: Cell<u64>,
    net: Cell<NetCounts>,
    /// Time of the spans inside each open span (innermost last): subtracted from its own.
    open: RefCell<Vec<u64>>,
    /// Tick counts and the UNIX times they stand for, in microseconds: when the PE started, and
    /// (once it stopped) when it stopped.
    anchor: (u64, f64),
    end_anchor: Option<(u64, f64)>,
    secs_per_tick: f64,
}

fn unix_now_us() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

impl Tracer {
    pub(crate) fn new(pe: usize, secs_per_tick: f64) -> Tracer {
        let unix_us = unix_now_us();
        Tracer {
            pe,
            spans: RefCell::new(Vec::new()),
            kept: Cell::new(0),
            dropped: Cell::new(0),
            stats: RefCell::new(FxHashMap::default()),
            idle_ticks: Cell::new(0),
            net: Cell::new(NetCounts::default()),
            open: RefCell::new(Vec::new()),
            anchor: (ticks(), unix_us),
            end_anchor: None,
            secs_per_tick,
        }
    }

    /// Opens a span: returns its start, to hand to [`entry`](Self::entry),
    /// [`resumed`](Self::resumed) or [`task`](Self::task), which close it (spans close in the
    /// reverse order they open).
    pub(crate) fn begin(&self) -> u64 {
        self.open.borrow_mut().push(0);
        ticks()
    }

    /// Closes the innermost open span without recording it (nothing ran in it).
    pub(crate) fn abandon(&self) {
        self.open.borrow_mut().pop();
    }

    /// Closes the innermost open span, begun at `start`: its own time (without the spans inside
    /// it), which is also charged to the span around it as inner time.
    fn close(&self, start: u64, end: u64) -> u64 {
        let took = end.saturating_sub(start);
        let mut open = self.open.borrow_mut();
        let inner = open.pop().unwrap_or(0);
        if let Some(outer) = open.last_mut() {
            *outer += took;
        }
        took.saturating_sub(inner)
    }

    fn keep(&self, span: Span) {
        if self.kept.get() < MAX_SPANS {
            let mut chunks = self.spans.borrow_mut();
            match chunks.last_mut() {
                Some(chunk) if chunk.len() < CHUNK => chunk.push(span),
                _ => {
                    let mut chunk = Vec::with_capacity(CHUNK);
                    chunk.push(span);
                    chunks.push(chunk);
                }
            }
            self.kept.set(self.kept.get() + 1);
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

    /// Closes the innermost open span, begun at `start`, as `what` run by `name`: counted as
    /// a call or (`resumed`) a resumption, and kept for the timeline.
    fn end_span(&self, what: What, name: &'static str, resumed: bool, start: u64) {
        let end = ticks();
        let own = self.close(start, end);
        self.count(name, own, resumed);
        self.keep(Span { what, start, end });
    }

    /// Entry method `name` (`Chare::entry`, or `Chare::new`) of element `index` ran from
    /// `start` to now.
    pub(crate) fn entry(&self, name: &'static str, index: Index, start: u64) {
        self.end_span(What::Entry { name, index }, name, false, start);
    }

    /// Suspended task `name` (an entry method, or the entry point) ran again from `start` to
    /// now.
    pub(crate) fn resumed(&self, name: &'static str, start: u64) {
        self.end_span(What::Resume { name }, name, true, start);
    }

    /// Pool task `name` ran from `start` to now (the items of one message).
    pub(crate) fn task(&self, name: &'static str, start: u64) {
        self.end_span(What::Task { name }, name, false, start);
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
            kept: Cell::new(self.kept.get()),
            dropped: Cell::new(self.dropped.get()),
            stats: RefCell::new(self.stats.take()),
            idle_ticks: Cell::new(self.idle_ticks.get()),
            net: Cell::new(self.net.get()),
            open: RefCell::new(Vec::new()),
            anchor: self.anchor,
            end_anchor: Some((ticks(), unix_now_us())),
            secs_per_tick: self.secs_per_tick,
        }
    }

    /// Microseconds since the UNIX epoch at tick `t`: on the line through the two anchors (the
    /// clock's rate as measured over the PE's whole run, not the 5 ms calibration), or at the
    /// calibrated rate from the first.
    fn unix_us(&self, t: u64) -> f64 {
        let (t0, us0) = self.anchor;
        let us_per_tick = match self.end_anchor {
            Some((t1, us1)) if t1 > t0 + 1_000_000 && us1 > us0 => (us1 - us0) / (t1 - t0) as f64,
            _ => self.secs_per_tick * 1e6,
        };
        us0 + (t as f64 - t0 as f64) * us_per_tick
    }

    fn micros(&self, ticks: u64) -> f64 {
        ticks as f64 * self.secs_per_tick * 1e6
    }
}

/// The records of this process's PEs, written when the job ends.
pub(crate) struct TraceSink {
    path: PathBuf,
    /// This process's PEs.
    pes: std::ops::Range<usize>,
    records: Mutex<Vec<(Tracer, f64)>>,
}

impl TraceSink {
    pub(crate) fn new(path: PathBuf, pes: std::ops::Range<usize>) -> TraceSink {
        TraceSink {
            path,
            pes,
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
        let missing: Vec<usize> = self
            .pes
            .clone()
            .filter(|pe| !records.iter().any(|(t, _)| t.pe == *pe))
            .collect();
        let mut text = summary(rank, size, &file, written.as_ref().err(), &records);
        if !missing.is_empty() {
            text.push_str(&format!(
                "  not traced: PE {missing:?} did not stop in time at the end of the job\n"
            ));
        }
        eprint!("{text}");
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
        for span in t.spans.borrow().iter().flatten() {
            line.clear();
            let (name, cat) = match span.what {
                What::Entry { name, .. } => (name, "entry"),
                What::Resume { name } => (name, "resume"),
                What::Task { name } => (name, "task"),
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
        "\n],\"otherData\":{{\"dropped_spans\":\"{dropped}\"}}}}"
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
    let spans: usize = records.iter().map(|(t, _)| t.kept.get()).sum();
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
        let sink = TraceSink::new("/tmp/run/trace.json".into(), 0..2);
        assert_eq!(sink.file_for(0, 1), PathBuf::from("/tmp/run/trace.json"));
        assert_eq!(sink.file_for(3, 4), PathBuf::from("/tmp/run/trace.3.json"));
        let bare = TraceSink::new("out".into(), 0..2);
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
        let start = t.begin();
        t.entry("Cell::step", Index::SCALAR, start);
        let start = t.begin();
        t.resumed("Cell::step", start);
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
    fn a_span_inside_another_is_not_counted_twice() {
        crate::measure::init_clock();
        let t = Tracer::new(0, 1e-9);
        let spin = || {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(2);
            while std::time::Instant::now() < until {}
        };
        let outer = t.begin();
        spin();
        let inner = t.begin();
        spin();
        t.entry("Cell::step", Index::SCALAR, inner);
        t.resumed("Cell::new", outer);
        let spans = t.spans.borrow();
        let (inner_span, outer_span) = (spans[0][0], spans[0][1]);
        assert!(outer_span.start <= inner_span.start && inner_span.end <= outer_span.end);
        let stats = t.stats.borrow();
        let (own_inner, own_outer) = (stats["Cell::step"].ticks, stats["Cell::new"].ticks);
        assert_eq!(own_inner, inner_span.end - inner_span.start);
        assert_eq!(
            own_outer + own_inner,
            outer_span.end - outer_span.start,
            "the outer span's own time excludes the inner one"
        );
        assert!(t.open.borrow().is_empty());
    }

    #[test]
    fn spans_beyond_the_cap_are_counted_not_kept() {
        crate::measure::init_clock();
        let t = Tracer::new(0, 1e-9);
        for _ in 0..MAX_SPANS + 5 {
            t.idle(0, 1);
        }
        assert_eq!(t.kept.get(), MAX_SPANS);
        assert_eq!(t.spans.borrow().len(), MAX_SPANS / CHUNK);
        assert!(t.spans.borrow().iter().all(|c| c.len() == CHUNK));
        assert_eq!(t.dropped.get(), 5);
        assert_eq!(t.idle_ticks.get(), (MAX_SPANS + 5) as u64);
    }
}
