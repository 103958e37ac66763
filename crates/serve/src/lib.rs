//! # devpool-serve
//!
//! The data plane: volumes become block devices through devpool itself. One
//! block-I/O core and thin protocol frontends over it.
//!
//! - [`map`] (from devpool-format): a volume's logical bytes → (device,
//!   offset); refuses everything outside the volume
//! - [`device`]: the PVs under a volume, opened direct and buffered
//! - [`batch`]: many transfers in flight, waited for together (copy-out work)
//! - [`buffer`]: aligned I/O buffers
//! - [`copier`]: copy-out for origin writes on a helper thread
//! - [`deferred`]: origin writes answered before their copy-out, and what
//!   other requests wait for because of them
//! - [`queue`]: the io_uring core (read, write, flush, discard, write-zeroes, FUA)
//! - [`snapshot`]: copy-on-write for origins and snapshots (dm-snapshot's store)
//! - [`thin`]: thin volumes (lookups, provisioning, discard) on a dm-thin pool
//! - [`merge`]: `snapshot merge`, rolling an origin back to a snapshot
//! - [`nbd`]: the NBD server (fixed newstyle handshake, transmission)
//! - [`vhost`]: the vhost-user-blk server for QEMU (rust-vmm's vhost-user-backend)
//! - [`ublk`]: a volume as the kernel's ublk device (`/dev/ublkbN`), served by the core
//! - [`fuse`]: a volume as one file in a FUSE mount
//! - [`hostdev`]: a host block device for any layout (loop, device-mapper, ublk, kernel NBD, or FUSE + loop)
//! - [`export`]: serving a leased volume, watched so it ends with its lease
//! - [`open`]: a leased volume from a pool, ready to serve
//! - [`lifetime`]: stop signals, and the watch that stops serving when the lease ends

pub mod batch;
pub mod buffer;
pub mod copier;
pub mod deferred;
pub mod device;
pub mod export;
pub mod fuse;
pub mod hostdev;
pub mod lifetime;
pub mod merge;
pub mod nbd;
pub mod open;
pub mod queue;
pub mod snapshot;
pub mod thin;
pub mod ublk;
pub mod vhost;

/// Volume maps live with the format (pure), so the pool can read COW stores too.
pub use devpool_format::map;

pub use device::Volume;
pub use lifetime::Stopper;
