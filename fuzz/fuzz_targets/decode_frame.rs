//! Fuzz target: any bytes, decoded as a frame from the network and then as an entry call or a
//! creation, must give an error or a message — never a panic or undefined behaviour.
//! Run with `cargo +nightly fuzz run decode_frame` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = charmrs::__private::decode_untrusted_frame(data);
});
