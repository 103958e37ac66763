//! # devpool-engine
//!
//! Owns volume groups on disk. It scans PVs (block devices or image files),
//! picks the newest valid metadata copy of each VG and reports PVs that
//! disagree or are missing; it turns an [`Operation`] into a [`Plan`] (the
//! metadata diff and every write, as data), verifies the plan against the
//! disks under LVM2's own locks, executes it with LVM2's write → precommit →
//! commit protocol, and journals it.
//!
//! - [`engine`]: device sources, operations, planning and execution
//! - [`ops`] and [`alloc`]: pure volume operations and extent allocation
//! - [`scan`], [`vg`]: reading PVs and assembling VGs
//! - [`giveback`]: a release's image-file space given back ahead of its commit, in bounded rounds
//! - [`commit`], [`device`], [`lock`], [`journal`]: the write path
//! - [`devicesfile`], [`lvmconf`]: LVM2's devices file and configuration, followed
//! - [`cowstore`]: a snapshot's COW store, live (load, look up, append, invalidate)
//! - [`thinstore`]: a thin pool's dm-thin metadata, live (devices, mappings, commits)
//! - [`hostfs`]: files on the host's mounts; reads that would wait on a FUSE or network server that does not answer
//! - [`dm`]: device-mapper: the devices the kernel has active for LVs (sysfs), its ioctls and messages
//! - [`report`]: PV/VG/LV/segment rows for tables and JSON

pub mod access;
pub mod alloc;
pub mod commit;
pub mod cowstore;
pub mod device;
pub mod devicesfile;
pub mod dm;
pub mod engine;
pub mod error;
pub mod giveback;
pub mod hostfs;
pub mod journal;
pub mod lock;
pub mod lvmconf;
pub mod ops;
pub mod plan;
pub mod pvlayout;
pub mod report;
pub mod scan;
pub mod thinplan;
pub mod thinstore;
mod uring;
pub mod vg;
pub mod workers;

pub use engine::{DeviceSource, Engine, Executed, NewVolume, Operation, PvOptions};
pub use error::{EngineError, Result};
pub use plan::{Plan, Step};
