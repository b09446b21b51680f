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

/// Runs `f`, user code the runtime runs outside an entry method's guard (a `Deserialize`, a
/// reducer); a panic in it becomes an error saying what was being done: `"{what} panicked: …"`.
pub(crate) fn catching<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(format!("{what} panicked: {}", describe(payload))))
}

/// Drops `value`; a panic in its `Drop` is caught and described. The location recorded for a
/// panic already being handled is kept (a `Drop` run while a failure is reported).
pub(crate) fn drop_caught<T>(value: T) -> Result<(), String> {
    keeping_location(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(value)))
            .map_err(describe)
    })
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

#[cfg(test)]
mod tests {
    use super::{catching, drop_caught};

    /// A reducer or `Deserialize` that panics outside an entry method becomes an error naming
    /// what was being done and the panic's message; errors and values pass through. A panicking
    /// `Drop` is described the same way.
    #[test]
    fn a_panic_in_user_code_becomes_an_error_naming_it() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("the bomb went off");
            }
        }
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let e = catching::<u32>("combining the partials", || panic!("the reducer exploded"));
        let dropped = drop_caught(Bomb);
        std::panic::set_hook(hook);
        let e = e.unwrap_err();
        assert!(
            e.starts_with("combining the partials panicked: ")
                && e.contains("the reducer exploded"),
            "{e}"
        );
        assert_eq!(catching("x", || Ok(7)), Ok(7));
        assert_eq!(
            catching::<u32>("x", || Err("bad".into())),
            Err("bad".into())
        );
        assert!(dropped.unwrap_err().contains("the bomb went off"));
        assert_eq!(drop_caught(7u32), Ok(()));
    }
}
