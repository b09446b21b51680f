//! Which machine layer this process uses: the TCP layer when the process was started by the
//! `charmrun` launcher or (with the `pmix` feature) by `mpirun`/`srun` through PMIx — their
//! environments say so — otherwise a one-process job on the local layer.

use crate::error::{Error, Result};
use charmrs_local::LocalLayer;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::MachineLayer;

/// The machine layer of this process (`local_only`: ignore any launcher environment).
pub(crate) fn select(local_only: bool) -> Result<Box<dyn MachineLayer>> {
    if local_only {
        return Ok(Box::new(LocalLayer::new()));
    }
    #[cfg(feature = "pmix")]
    if charmrs_pmix::launched_by_pmix() {
        return match charmrs_pmix::tcp_layer_from_env(TcpConfig::default()) {
            Ok(Some(layer)) => Ok(Box::new(layer)),
            Ok(None) => Ok(Box::new(LocalLayer::new())),
            Err(e) => Err(Error::Options(format!(
                "cannot join the job through PMIx: {e}"
            ))),
        };
    }
    match TcpLayer::from_env(TcpConfig::default()) {
        Ok(Some(layer)) => Ok(Box::new(layer)),
        Ok(None) => Ok(Box::new(LocalLayer::new())),
        Err(e) => Err(Error::Options(format!(
            "cannot join the job started by charmrun: {e}"
        ))),
    }
}
