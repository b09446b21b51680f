//! PE threads are pinned to distinct cores when there are enough cores, and left free when the
//! PEs oversubscribe the cores.

mod common;

use charmrs::prelude::*;
use charmrs::Runtime;
use common::run_job_with;
use std::sync::Mutex;

static ALLOWED: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());

/// The CPUs the calling thread may run on, as the kernel lists them.
fn cpus_allowed() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// Reports where its PE thread may run.
struct Where;

#[chare]
impl Where {
    fn new() -> Self {
        Where
    }

    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>) {
        ALLOWED.lock().unwrap().push((ctx.my_pe(), cpus_allowed()));
    }
}

fn allowed_per_pe(pes: usize, pin: bool) -> Vec<(usize, String)> {
    ALLOWED.lock().unwrap().clear();
    run_job_with(Runtime::new(pes).affinity(pin), |_| async {
        Group::<Where>::new(()).ret().report().await;
        charmrs::exit(0);
    })
    .unwrap();
    let mut v = ALLOWED.lock().unwrap().clone();
    v.sort();
    v
}

#[test]
fn pinned_when_the_cores_suffice_free_when_oversubscribed() {
    let process = cpus_allowed();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = allowed_per_pe(cores, true);
    let distinct: std::collections::BTreeSet<&String> = pinned.iter().map(|(_, c)| c).collect();
    assert_eq!(distinct.len(), cores, "one core per PE: {pinned:?}");
    for (_, cpus) in &pinned {
        assert!(
            !cpus.contains(',') && !cpus.contains('-'),
            "a single CPU: {cpus}"
        );
    }
    for (_, cpus) in allowed_per_pe(cores * 2, true) {
        assert_eq!(cpus, process, "oversubscribed PEs are not pinned");
    }
    for (_, cpus) in allowed_per_pe(cores, false) {
        assert_eq!(cpus, process, "+noaffinity leaves threads free");
    }
}
