//! Which cores this process may run on, in the order PEs should be pinned.
//!
//! # What this module owns
//!
//! * [`CoreId`]: an OS processor number (the id `sched_setaffinity` takes).
//! * [`Topology`]: the ordered list of usable cores and thread pinning.
//! * [`Topology::has_own_slice`]: whether a launcher bound this process to a slice of the host
//!   of its own (`srun --cpu-bind=cores`, `mpirun --bind-to core`), which decides how the
//!   processes of a job sharing a host split its cores.
//!
//! # Invariants
//!
//! * [`Topology::cores`] lists distinct ids, never empty after
//!   [`Topology::detect`] (at worst a single core 0).
//! * Order is pinning preference: with the `hwloc` feature, one processing
//!   unit of every physical core comes first, then the second hardware
//!   thread of every core, and so on; PE `i` goes on `cores()[i]`.
//!   Without hwloc the order is whatever the OS affinity mask lists
//!   (ascending ids), with no knowledge of hyperthreads.
//! * Only cores in the calling thread's affinity mask (its CPU binding:
//!   `taskset`, `srun --cpu-bind`, `mpirun --bind-to`) are listed when the
//!   mask can be read. hwloc on its own lists every processing unit the
//!   cgroup allows; its list is filtered by the binding, keeping hwloc's
//!   order.
//!
//! # Detection sources, in order
//!
//! 1. hwloc, only when built with the non-default `hwloc` cargo feature. It
//!    links the system library (Debian: `libhwloc-dev` and `pkg-config`); the
//!    default build needs no system library.
//! 2. `core_affinity::get_core_ids()` (the OS affinity mask).
//! 3. `std::thread::available_parallelism()`, giving cores `0..n`.

use std::collections::HashSet;

/// An OS processor number, as used by thread affinity calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CoreId(pub usize);

/// The cores available to this process, in pinning order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    cores: Vec<CoreId>,
}

impl Topology {
    /// Detects the usable cores (see the module docs for sources and
    /// order). Never fails: falls back to a single core 0.
    pub fn detect() -> Topology {
        #[cfg(feature = "hwloc")]
        if let Some(cores) = detect_hwloc() {
            return Topology::from_cores(cores);
        }
        if let Some(ids) = core_affinity::get_core_ids() {
            if !ids.is_empty() {
                return Topology::from_cores(ids.into_iter().map(|c| CoreId(c.id)).collect());
            }
        }
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Topology::from_cores((0..n).map(CoreId).collect())
    }

    /// A topology with the given cores in pinning order; duplicates are
    /// dropped, keeping the first occurrence.
    pub fn from_cores(cores: Vec<CoreId>) -> Topology {
        let mut seen = HashSet::with_capacity(cores.len());
        let cores = cores.into_iter().filter(|c| seen.insert(*c)).collect();
        Topology { cores }
    }

    /// The cores, in pinning order.
    pub fn cores(&self) -> &[CoreId] {
        &self.cores
    }

    /// Number of usable cores.
    pub fn num_cores(&self) -> usize {
        self.cores.len()
    }

    /// Whether `pes` PEs fit one per core; the runtime pins only if so
    /// (oversubscribed PEs are left to the OS scheduler).
    pub fn pes_fit(&self, pes: usize) -> bool {
        pes <= self.cores.len()
    }

    /// The core PE `pe` (process-local index) should be pinned to, if the
    /// topology has that many cores.
    pub fn core_for_pe(&self, pe: usize) -> Option<CoreId> {
        self.cores.get(pe).copied()
    }

    /// Whether this topology (the calling thread's binding) is a slice of the
    /// host of this process's own, among `host_procs` processes of its job on
    /// the host: narrower than what its launcher could give it — the parent
    /// process's binding, else its cgroup's CPUs (cpuset), else the online
    /// CPUs — and small enough that every process of the host can have one
    /// as large. `false` for a binding inherited unchanged (`taskset` around
    /// `charmrun`, a container's cpuset), one that several processes must
    /// share (OpenMPI's binding to a socket), or when nothing can be read.
    pub fn has_own_slice(&self, host_procs: usize) -> bool {
        launcher_cpus().is_some_and(|allowed| {
            self.cores.len() < allowed
                && self.cores.len().saturating_mul(host_procs.max(1)) <= allowed
        })
    }

    /// Pins the calling thread to `core`. Returns `false` if `core` is not in
    /// this topology or the OS refused.
    pub fn pin_current_thread(&self, core: CoreId) -> bool {
        self.cores.contains(&core)
            && core_affinity::set_for_current(core_affinity::CoreId { id: core.0 })
    }
}

/// How many CPUs this process's launcher could have given it: its parent
/// process's binding (`Cpus_allowed_list`), else the effective CPUs of its
/// cpuset (cgroup v2 `cpuset.cpus.effective`, v1 `cpuset.effective_cpus`,
/// under its cgroup's path or, inside a container, at the root), else the
/// online CPUs; `None` if a cpuset exists but cannot be read, or nothing can.
fn launcher_cpus() -> Option<usize> {
    let parent = std::os::unix::process::parent_id();
    if parent > 1 {
        let status = std::fs::read_to_string(format!("/proc/{parent}/status")).ok();
        let listed = status.as_deref().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|list| count_cpu_list(list.trim()))
        });
        if listed.is_some() {
            return listed;
        }
    }
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut cpusets = Vec::new();
    // A cgroup v1 hierarchy with the cpuset controller (without one: the online CPUs).
    let mut v1_cpuset = false;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            cpusets.push(format!("/sys/fs/cgroup/{path}/cpuset.cpus.effective"));
            cpusets.push("/sys/fs/cgroup/cpuset.cpus.effective".to_owned());
        } else if controllers.split(',').any(|c| c == "cpuset") {
            v1_cpuset = true;
            cpusets.push(format!(
                "/sys/fs/cgroup/cpuset/{path}/cpuset.effective_cpus"
            ));
            cpusets.push("/sys/fs/cgroup/cpuset/cpuset.effective_cpus".to_owned());
        }
    }
    let read = |f: &str| count_cpu_list(std::fs::read_to_string(f).ok()?.trim());
    match cpusets.iter().find_map(|f| read(f)) {
        Some(n) => Some(n),
        None if v1_cpuset => None,
        None => read("/sys/devices/system/cpu/online"),
    }
}

/// The number of CPUs in a kernel CPU list (`0-3,8,10-11`); `None` if it is
/// empty or malformed.
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (
                lo.trim().parse::<usize>().ok()?,
                hi.trim().parse::<usize>().ok()?,
            ),
            None => {
                let one = part.trim().parse::<usize>().ok()?;
                (one, one)
            }
        };
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

/// Lists processing units with hwloc: the first PU of each physical core,
/// then the second of each, and so on; only those in the calling thread's
/// CPU binding. `None` if hwloc is unusable or lists none of the bound
/// PUs.
#[cfg(feature = "hwloc")]
fn detect_hwloc() -> Option<Vec<CoreId>> {
    use hwloc2::{CpuBindFlags, ObjectType, TopologyObject};
    use std::collections::HashMap;

    fn core_of(pu: &TopologyObject) -> Option<u32> {
        let mut obj = pu.parent();
        while let Some(o) = obj {
            if matches!(o.object_type(), ObjectType::Core) {
                return Some(o.logical_index());
            }
            obj = o.parent();
        }
        None
    }

    let topo = hwloc2::Topology::new()?;
    // The thread's binding (hwloc's view of sched_getaffinity), else the OS
    // mask as core_affinity reads it; neither readable: no filter. (The
    // bitmap is asked about each PU rather than listed: hwloc bitmaps may
    // be infinite.)
    let binding = topo.get_cpubind(CpuBindFlags::CPUBIND_THREAD);
    let mask: Option<HashSet<usize>> = match binding {
        Some(_) => None,
        None => core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect()),
    };
    let bound = |os_index: u32| match (&binding, &mask) {
        (Some(set), _) => set.is_set(os_index),
        (None, Some(ids)) => ids.contains(&(os_index as usize)),
        (None, None) => true,
    };
    let pus: Vec<&TopologyObject> = topo
        .objects_with_type(&ObjectType::PU)
        .ok()?
        .into_iter()
        .filter(|pu| bound(pu.os_index()))
        .collect();
    // (hardware-thread rank within its core, PU logical order, OS index)
    let mut ranked = Vec::with_capacity(pus.len());
    let mut per_core: HashMap<u32, usize> = HashMap::new();
    for (order, pu) in pus.iter().enumerate() {
        let smt_rank = match core_of(pu) {
            Some(core) => {
                let n = per_core.entry(core).or_insert(0);
                *n += 1;
                *n - 1
            }
            None => 0,
        };
        ranked.push((smt_rank, order, CoreId(pu.os_index() as usize)));
    }
    ranked.sort_unstable();
    let cores: Vec<CoreId> = ranked.into_iter().map(|(_, _, id)| id).collect();
    (!cores.is_empty()).then_some(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_finds_at_least_one_core() {
        let t = Topology::detect();
        assert!(t.num_cores() >= 1);
        assert!(t.pes_fit(1));
        assert!(t.pes_fit(t.num_cores()));
        assert!(!t.pes_fit(t.num_cores() + 1));
        let unique: HashSet<_> = t.cores().iter().collect();
        assert_eq!(unique.len(), t.num_cores());
    }

    #[test]
    fn cpu_lists_are_counted_and_bad_ones_refused() {
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("5"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a-b"), None);
    }

    #[test]
    fn a_thread_bound_to_one_of_several_cores_has_a_slice_of_its_own() {
        let allowed = Topology::detect();
        if allowed.num_cores() < 2 {
            eprintln!("note: one usable core: no narrower binding to try");
            return;
        }
        let whole = launcher_cpus().expect("the parent's binding is readable");
        assert!(whole >= allowed.num_cores());
        let first = allowed.cores()[0];
        let (own, shared_by_too_many) = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core_affinity::CoreId {
                id: first.0
            }));
            let t = Topology::detect();
            (t.has_own_slice(1), t.has_own_slice(whole + 1))
        })
        .join()
        .unwrap();
        assert!(own, "one core of {whole}: a slice of its own");
        assert!(
            !shared_by_too_many,
            "more processes than cores: not a slice each"
        );
        // This thread's binding is what the parent (the test runner) has: inherited.
        if allowed.num_cores() == whole {
            assert!(!allowed.has_own_slice(1));
        }
    }

    #[test]
    fn from_cores_dedups_and_maps_pes() {
        let t = Topology::from_cores(vec![CoreId(2), CoreId(0), CoreId(2), CoreId(1)]);
        assert_eq!(t.cores(), &[CoreId(2), CoreId(0), CoreId(1)]);
        assert_eq!(t.core_for_pe(0), Some(CoreId(2)));
        assert_eq!(t.core_for_pe(3), None);
    }

    #[test]
    fn pinning_to_a_detected_core_succeeds() {
        let t = Topology::detect();
        let core = t.cores()[0];
        // Pin a scratch thread so the test runner's threads are unaffected.
        let ok = std::thread::spawn(move || Topology::detect().pin_current_thread(core))
            .join()
            .unwrap();
        assert!(ok, "could not pin to {core:?}");
        assert!(!t.pin_current_thread(CoreId(usize::MAX)));
    }

    /// A thread bound to one core sees only that core (with hwloc too, which
    /// on its own lists every core the cgroup allows).
    #[test]
    fn detect_lists_only_the_cores_of_the_threads_binding() {
        let allowed = Topology::detect();
        if allowed.num_cores() < 2 {
            eprintln!("note: one usable core: the binding cannot narrow the list");
        }
        let first = *allowed.cores().iter().min().expect("a core");
        // A scratch thread, so no other test's thread is bound (its binding
        // ends with it).
        let seen = std::thread::spawn(move || {
            assert!(
                core_affinity::set_for_current(core_affinity::CoreId { id: first.0 }),
                "cannot bind to {first:?}"
            );
            Topology::detect()
        })
        .join()
        .unwrap();
        assert_eq!(seen.cores(), &[first]);
        // This thread's binding is unchanged.
        assert_eq!(Topology::detect(), allowed);
    }
}
