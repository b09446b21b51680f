//! Panic reporting: a panic inside user code on a PE is caught by the dispatcher and turned into a
//! job abort naming chare, index, entry method and PE. This module captures the panic's message and
//! location (through a process-wide hook installed once) so the abort message can quote them.
//!
//! Invariant: on PE threads the hook records instead of printing (the abort message says it all);
//! on every other thread the previously installed hook runs unchanged.

use std::cell::{Cell, RefCell};
use std::sync::Once;

thread_local! {
    static IN_PE: Cell<bool> = const { Cell::new(false) };
    static LAST_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook (once per process).
pub(crate) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_PE.with(Cell::get) {
                let loc = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                LAST_LOCATION.with(|l| *l.borrow_mut() = loc);
            } else {
                previous(info);
            }
        }));
    });
}

/// Marks the calling thread as a PE thread.
pub(crate) fn enter_pe() {
    IN_PE.with(|f| f.set(true));
}

/// Runs `f` (which may panic and catch it: a destructor run after a panic) keeping the location
/// recorded for the panic already being handled.
pub(crate) fn keeping_location<R>(f: impl FnOnce() -> R) -> R {
    let kept = LAST_LOCATION.with(|l| l.borrow_mut().take());
    let r = f();
    LAST_LOCATION.with(|l| *l.borrow_mut() = kept);
    r
}

/// The panic's message and, when known, its source location.
pub(crate) fn describe(payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    };
    match LAST_LOCATION.with(|l| l.borrow_mut().take()) {
        Some(loc) => format!("{msg} (at {loc})"),
        None => msg,
    }
}
