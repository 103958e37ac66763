//! # devpool-format
//!
//! The LVM2 on-disk format (and the device-mapper formats LVM2 volumes
//! carry), and nothing else: bytes in, bytes out, no I/O.
//!
//! - [`label`]: the `LABELONE` label and PV header (data/metadata area lists, v2 extension)
//! - [`mda`]: the metadata area header, its `raw_locn` slots, and the circular text buffer
//! - [`crc`]: LVM2's CRC-32 variant
//! - [`config`]: the text metadata grammar (parser and printer)
//! - [`metadata`]: the VG model (PVs, LVs, segments) over the grammar, keeping what it does not understand
//! - [`units`], [`names`], [`uuid`]: checked size units, LVM2's naming rules, LVM2 identifiers
//! - [`map`]: an LV's logical bytes → (PV, offset) through its linear and striped segments
//! - [`cow`]: dm-snapshot's persistent exception store (the COW volume of a snapshot)
//! - [`thin`]: dm-thin's metadata (superblock, B-trees, space maps, checksums)
//! - [`signature`]: recognising what else a device may hold (filesystems, partition tables…)
//! - [`dm`]: device-mapper tables and LVM2's names for activated LVs
//! - [`devices_file`]: LVM2's devices file (the devices LVM2 uses when it keeps one)
//!
//! This crate is where fuzzing and property tests concentrate: every parser
//! returns an error for bad input, never panics.

pub mod config;
pub mod cow;
pub mod crc;
pub mod devices_file;
pub mod dm;
pub mod error;
pub mod label;
pub mod map;
pub mod mda;
pub mod metadata;
pub mod names;
pub mod signature;
pub mod thin;
pub mod units;
pub mod uuid;

pub use error::FormatError;
