//! A ring over an N-d chare array in row-major order: each element says hi, with its index and
//! PE, and passes the greeting on to the next element; the last one ends the program.
//!
//! `cargo run --release --bin array_hello -- +p2 [d1 d2 ...]` (default dimensions `2 2 2`) prints
//! `Hi[17] from element (0, 0, 0) on PE 0` … then `All done`.

use charmrs::prelude::*;

/// One array element.
struct Hello;

#[chare]
impl Hello {
    fn new() -> Self {
        Hello
    }

    /// Greets, then passes `hello_num + 1` to the next element in row-major order.
    #[entry]
    fn say_hi(&mut self, ctx: &Ctx<Self>, hello_num: u64) {
        let me: Index = ctx.index();
        println!("Hi[{hello_num}] from element {me} on PE {}", ctx.my_pe());
        let array = ctx.this_array::<Index>();
        let dims = array.dims();
        let next = me.linear(&dims) + 1;
        if next == dims.volume() {
            println!("All done");
            charmrs::exit(0);
        } else {
            array
                .at(Index::from_linear(next, &dims))
                .say_hi(hello_num + 1);
        }
    }
}

/// Parses the array dimensions from the program arguments (default `2 2 2`).
fn dims_from_args(args: &[String]) -> Result<Index, String> {
    let extents: Vec<usize> = if args.len() <= 1 {
        vec![2, 2, 2]
    } else {
        args[1..]
            .iter()
            .map(|a| match a.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!(
                    "array_hello: `{a}` is not a dimension (a number >= 1)"
                )),
                Ok(n) => Ok(n),
            })
            .collect::<Result<_, _>>()?
    };
    Index::new(&extents).map_err(|e| format!("array_hello: {e}"))
}

fn main() {
    charmrs::start(|args| async move {
        let dims = match dims_from_args(&args) {
            Ok(d) => d,
            Err(e) => charmrs::abort(&e),
        };
        let array = Array::<Hello, Index>::new(dims, ());
        array.at(Index::from_linear(0, &dims)).say_hi(17);
    })
}
