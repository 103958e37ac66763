//! # devpool-vm
//!
//! What a guest needs, and QEMU to run it.
//!
//! - [`kernel`]: a kernel and its modules, from a Debian `linux-image` .deb
//!   (unpacked once into a cache) or a module tree; module dependencies
//!   resolved through `modules.dep`
//! - [`initramfs`]: a newc cpio archive built in memory: busybox, modules
//!   (decompressed), host binaries with their shared libraries, an init script
//! - [`guest`]: the guest's `/init`: modules, disks, 9p shares, environment,
//!   the command, and its exit status reported on the console
//! - [`qemu`]: the QEMU command line with each volume attached as a virtio
//!   disk, raw, over NBD or vhost-user-blk, and 9p shares
//! - [`fstests`]: the fstests guest script, `check` output parsed into
//!   per-test results, comparison with a saved run
//! - [`module_test`]: the module test's guest script and its report
//! - [`probe`]: whether KVM can actually boot a guest here (else TCG)
//! - [`runner`]: QEMU run to completion: console streamed, markers found,
//!   time limit and cancellation

pub mod fstests;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod module_test;
pub mod probe;
pub mod qemu;
pub mod runner;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, VmError>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, err: source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cause is in the message, so it is not the source too (a chain
    /// printer would say it twice).
    #[test]
    fn an_io_error_says_its_cause_once() {
        let e = io_err("reading the kernel")(std::io::Error::other("gone"));
        assert_eq!(e.to_string(), "reading the kernel: gone");
        assert!(std::error::Error::source(&e).is_none());
    }
}
