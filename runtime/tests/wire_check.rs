//! `+wirecheck`: every entry call and creation between PEs is encoded in the inter-process wire
//! format and decoded again; programs behave exactly as with moved arguments.

mod common;

use charmrs::prelude::*;
use charmrs::{Buffer, PodVec, Runtime};
use common::run_job_with;

/// Receives data of every kind and answers.
struct Echo {
    seen: Vec<String>,
}

#[chare]
impl Echo {
    fn new(ctx: &Ctx<Self>, tag: String) -> Self {
        Echo {
            seen: vec![format!("{tag}@{}", ctx.raw_index())],
        }
    }

    #[entry]
    fn take(
        &mut self,
        v: PodVec<f64>,
        b: Buffer,
        peer: ElementProxy<Echo>,
        note: Option<String>,
    ) -> f64 {
        self.seen.push(format!("{} {:?}", b.0.len(), note));
        let _ = peer;
        v.iter().sum()
    }

    #[entry]
    fn seen(&mut self) -> Vec<String> {
        self.seen.clone()
    }

    #[entry(when = "self.seen.len() == n")]
    fn at_len(&mut self, n: usize) -> usize {
        n
    }
}

fn checked(pes: usize) -> Runtime {
    Runtime::new(pes).affinity(false).wire_check(true)
}

#[test]
fn calls_creations_results_and_zero_copy_buffers_survive_the_wire() {
    run_job_with(checked(3), |_| async {
        let a = Array::<Echo, (usize, usize)>::new((2, 3), ("arr".to_string(),));
        let last = a.at((1, 2));
        assert_eq!(last.pe(), 2);
        let v = PodVec::from((0..1000).map(f64::from).collect::<Vec<_>>());
        let b = Buffer(vec![7u8; 1 << 16].into());
        let sum = last.ret().take(v, b, a.at((0, 0)), Some("hi".into())).await;
        assert_eq!(sum, 499_500.0);
        let seen = last.ret().seen().await;
        assert_eq!(
            seen,
            vec!["arr@(1, 2)".to_string(), "65536 Some(\"hi\")".to_string()]
        );
        assert_eq!(last.ret().at_len(2).await, 2);
        let all = a.gather().seen().await;
        assert_eq!(all.len(), 6);
        assert_eq!(all[4][0], "arr@(1, 1)");
        charmrs::exit(0);
    })
    .unwrap();
}

/// A user type whose encoding panics.
#[derive(Clone, serde::Deserialize)]
struct Unsendable;

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("Unsendable cannot be encoded")
    }
}

struct Relay;

#[chare]
impl Relay {
    fn new() -> Self {
        Relay
    }

    #[entry]
    fn relay(&mut self, peer: ElementProxy<Relay>) {
        peer.take(Unsendable);
    }

    #[entry]
    fn take(&mut self, _value: Unsendable) {}
}

/// A send whose argument panics while being encoded (as for another process) fails its entry
/// and sends nothing, and counts nothing: quiescence is still detected. Before, the message
/// was counted as sent first, stayed "in flight" for ever, and `wait_qd` hung.
#[test]
fn a_send_whose_encoding_panics_leaves_no_message_in_flight() {
    run_job_with(checked(2), |_| async {
        let a = Array::<Relay, usize>::new(2, ());
        let failed = a.at(0).ret().relay(a.at(1)).result().await;
        let text = format!("{:?}", failed.expect_err("the relay fails"));
        assert!(text.contains("Unsendable cannot be encoded"), "{text}");
        charmrs::wait_qd().await;
        charmrs::exit(0);
    })
    .unwrap();
}
