//! # devpool-pool
//!
//! Policy on top of the engine: which VG is a pool (`devpool-<NAME>`), who
//! holds which volumes, what is an orphan, which checks a device must pass
//! before it becomes a pool.
//!
//! - [`pool`][mod@pool]: pools (setup, list, status, teardown, the embedded default)
//! - [`lease`]: leases recorded in LV tags in the commit that creates them
//! - [`daemon`]: `devpool daemon`, leases over a Unix socket (protocol, server, client)
//! - [`group`]: group commit of concurrent lease requests in a resident process
//! - [`owner`]: owner identity (PID, its start time, boot id, host) and liveness
//! - [`spec`]: volume lists and profiles (`test:10G,scratch:10G`, `fstests`)
//! - [`safety`] and [`sysblk`]: the checks before setup and the block-device
//!   topology they walk (sysfs holders/slaves, mountinfo, swaps, fstab)
//! - [`loopdev`]: loop devices over a volume's extents
//! - [`activate`]: LVs activated with device-mapper as LVM2 does (linear, striped, snapshot families)
//! - [`dmdev`]: device-mapper devices over a volume's extents (LVM2's names)
//! - [`snapshots`]: snapshots of pool volumes (create, list, delete), owned by their origin's lease
//! - [`thin`]: the thin pool (enable, status), thin leases and thin snapshots
//! - [`servers`]: which processes serve a volume, stopped before its extents are freed
//! - [`hostspace`]: a pool image's written bytes and its filesystem's free space

pub mod activate;
pub mod daemon;
pub mod dmdev;
pub mod error;
pub mod group;
pub mod hostspace;
pub mod lease;
pub mod loopdev;
pub mod owner;
pub mod pool;
pub mod safety;
pub mod servers;
pub mod snapshots;
pub mod spec;
pub mod sysblk;
pub mod thin;
pub mod wipe;

pub use error::{PoolError, Result};
