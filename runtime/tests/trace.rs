//! `+trace`: the timeline file holds every entry execution, resumption and idle period of every
//! PE, as Chrome trace JSON.

mod common;

use charmrs::prelude::*;
use common::run_job_with;
use serde_json::Value;

struct Worker {
    done: u32,
}

#[chare]
impl Worker {
    fn new() -> Self {
        Worker { done: 0 }
    }

    #[entry]
    fn work(&mut self) {
        self.done += 1;
    }

    #[entry]
    fn count(&mut self) -> u32 {
        self.done
    }

    /// Suspends on a value-returning call to the next element, so it is resumed once.
    #[entry]
    async fn ask(this: Coro<Self>) -> u32 {
        let me: usize = this.ctx().index();
        let next = this.ctx().this_proxy().at((me + 1) % 4);
        next.ret().count().await
    }
}

#[test]
fn the_timeline_holds_every_entry_resumption_and_idle_period() {
    let dir = std::env::temp_dir().join(format!("charmrs-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("trace.json");
    let rt = charmrs::Runtime::new(2).affinity(false).trace(&file);
    run_job_with(rt, |_| async {
        let a = Array::<Worker, usize>::new(4, ());
        for _ in 0..10 {
            a.work();
        }
        for k in 0..4usize {
            assert_eq!(a.at(k).ret().ask().await, 10);
        }
        charmrs::exit(0);
    })
    .unwrap();

    let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let spans = |name: &str, cat: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name && e["cat"] == cat)
            .collect::<Vec<_>>()
    };
    let threads: Vec<_> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(threads, ["PE 0", "PE 1"]);

    let work = spans("Worker::work", "entry");
    assert_eq!(work.len(), 40, "10 broadcasts to 4 elements");
    for k in 0..4 {
        let index = format!("({k},)");
        let of_k = work.iter().filter(|e| e["args"]["index"] == index.as_str());
        assert_eq!(of_k.count(), 10, "element {k}");
    }
    assert_eq!(spans("Worker::count", "entry").len(), 4);
    assert_eq!(
        spans("Worker::new", "entry").len(),
        4,
        "constructors are traced"
    );
    assert_eq!(spans("Worker::ask", "entry").len(), 4);
    // Each `ask` suspended once, on its call to the next element, and ran again.
    assert_eq!(spans("Worker::ask", "resume").len(), 4);
    assert_eq!(spans("main", "entry").len(), 1);
    assert!(!spans("main", "resume").is_empty());
    assert!(!spans("idle", "idle").is_empty());

    // Timestamps are microseconds since the UNIX epoch; spans of one PE do not overlap.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as f64;
    for pe in 0..2 {
        let mut mine: Vec<(f64, f64)> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["tid"] == pe)
            .map(|e| (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap()))
            .collect();
        assert!(!mine.is_empty());
        mine.sort_by(|a, b| a.0.total_cmp(&b.0));
        for &(ts, dur) in &mine {
            assert!(
                dur >= 0.0 && (now_us - ts).abs() < 600e6,
                "ts {ts} dur {dur}"
            );
        }
        // Disjoint or nested (a span that starts inside another ends inside it too).
        for w in mine.windows(2) {
            let (a, b) = (w[0], w[1]);
            let disjoint = a.0 + a.1 <= b.0 + 1.0;
            let nested = b.0 + b.1 <= a.0 + a.1 + 1.0;
            assert!(disjoint || nested, "PE {pe}: {w:?} overlap");
        }
    }
    assert_eq!(json["otherData"]["dropped_spans"], "0");
}

/// A trace file that cannot be written is refused before the job starts, naming it (it used to
/// be found out only after the whole run); `+LBDump` likewise.
#[test]
fn an_unwritable_trace_or_dump_file_is_refused_at_start() {
    let rt = charmrs::Runtime::new(1)
        .affinity(false)
        .trace("/nonexistent-dir-for-charmrs/trace.json");
    let e = run_job_with(rt, |_| async { panic!("the job must not start") })
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("+trace /nonexistent-dir-for-charmrs/trace.json: cannot write there"),
        "{e}"
    );
    let args = ["+p1", "+LBDump", "/nonexistent-dir-for-charmrs/lb"].map(String::from);
    let rt = charmrs::Runtime::from_args(args).unwrap().affinity(false);
    let e = run_job_with(rt, |_| async { panic!("the job must not start") })
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("+LBDump /nonexistent-dir-for-charmrs/lb.probe-"),
        "{e}"
    );
    // A writable place: the job runs, and the check leaves nothing behind.
    let dir = std::env::temp_dir().join(format!("charmrs-trace-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("lb").to_string_lossy().into_owned();
    let rt = charmrs::Runtime::from_args(["+p1".into(), "+LBDump".into(), prefix])
        .unwrap()
        .affinity(false);
    assert_eq!(run_job_with(rt, |_| async { charmrs::exit(3) }).unwrap(), 3);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
