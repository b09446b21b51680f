//! Idle PEs sleep: a job whose PEs have nothing to do burns (almost) no CPU, and a sleeping PE
//! wakes up when a message arrives. Alone in its test binary so other tests' CPU use does not count.

mod common;

use charmrs::prelude::*;
use common::run_job;
use std::time::Duration;

/// Process CPU time (user + system), from /proc/self/stat, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Wakes on a message after its PE slept.
struct Sleeper;

#[chare]
impl Sleeper {
    fn new() -> Self {
        Sleeper
    }

    #[entry]
    fn measure(&mut self, ctx: &Ctx<Self>) {
        // This PE (3) is busy sleeping; PEs 0..2 have nothing to do and must park.
        assert_eq!(ctx.my_pe(), 3);
        let before = cpu_ticks();
        std::thread::sleep(Duration::from_millis(600));
        let used = cpu_ticks() - before;
        // 3 idle PEs spinning would use ~180 ticks (100 Hz) here; parked PEs use ~0.
        assert!(
            used < 15,
            "idle PEs used {used} ticks of CPU in 0.6 s: they do not park"
        );
        ctx.this_group().at(1).wake_up();
    }

    #[entry]
    fn wake_up(&mut self) {
        charmrs::exit(0);
    }
}

#[test]
fn idle_pes_park_and_wake_on_a_message() {
    run_job(4, |_| async {
        Group::<Sleeper>::new(()).at(3).measure();
    })
    .unwrap();
}
