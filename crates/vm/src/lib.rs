//! # devpool-vm
//!
//! What a guest needs, and QEMU to run it.
//!
//! - [`kernel`]: a kernel and its modules, from a Debian `linux-image` .deb
//!   (unpacked once into a cache) or a module tree; module dependencies
//!   resolved through `modules.dep`
//! - [`initramfs`]: a newc cpio archive built in memory: busybox, modules
//!   (decompressed), host binaries with their shared libraries, an init script
//! - [`qemu`]: the QEMU command line (KVM when it can boot a guest, else TCG)
//!   with each volume attached as a virtio disk, raw, over NBD or vhost-user-blk

pub mod initramfs;
pub mod kernel;
pub mod qemu;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, VmError>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}
