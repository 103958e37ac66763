//! The QEMU command line: a direct kernel boot with an initramfs, the serial
//! console on standard output, and one virtio disk per volume in the order
//! given (the guest sees `/dev/vda`, `/dev/vdb`, … in that order because each
//! disk sits in a fixed PCI slot).

use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A range of an image file or device, straight to QEMU's raw driver.
    Raw {
        path: PathBuf,
        offset: u64,
        size: u64,
    },
    /// devpool's NBD server on a Unix socket.
    Nbd { socket: PathBuf },
    /// devpool's vhost-user-blk server.
    VhostUserBlk { socket: PathBuf, queues: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub mem_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub disks: Vec<Disk>,
    /// Host directories shared over 9p.
    pub shares: Vec<crate::guest::Share>,
}

/// First PCI slot used for disks (1 and 2 hold the host bridge and ISA).
const FIRST_SLOT: usize = 4;
/// 9p shares sit after the last slot disks may use.
const FIRST_SHARE_SLOT: usize = 0x1a;
/// Disks that fit between the two.
pub const MAX_DISKS: usize = FIRST_SHARE_SLOT - FIRST_SLOT;

impl Machine {
    pub fn command(&self) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        c.args(["-machine", &format!("q35,accel={accel}")])
            .args([
                "-cpu",
                if self.accel == Accel::Kvm {
                    "host"
                } else {
                    "max"
                },
            ])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &format!("{}M", self.mem_mib)])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .args(["-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.append]);
        if self
            .disks
            .iter()
            .any(|d| matches!(d, Disk::VhostUserBlk { .. }))
        {
            // vhost-user needs guest memory the server can map.
            c.args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.mem_mib
                ),
                "-numa",
                "node,memdev=mem",
            ]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let slot = format!("addr=0x{:x}", FIRST_SLOT + i);
            match d {
                Disk::Raw { path, offset, size } => {
                    // QEMU's `file` driver refuses block devices.
                    use std::os::unix::fs::FileTypeExt;
                    let driver =
                        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
                            "host_device"
                        } else {
                            "file"
                        };
                    // devpool's lease makes the range exclusive; QEMU's
                    // image locks would stop two VMs sharing one pool image.
                    let direct = if takes_direct_io(path) { "on" } else { "off" };
                    c.arg("-blockdev").arg(format!(
                        "driver=raw,node-name=d{i},offset={offset},size={size},file.driver={driver},file.filename={},file.aio=io_uring,file.locking=off,cache.direct={direct}",
                        path.display()
                    ));
                    c.arg("-device")
                        .arg(format!("virtio-blk-pci,drive=d{i},{slot}"));
                }
                Disk::Nbd { socket } => {
                    c.arg("-blockdev").arg(format!(
                        "driver=nbd,node-name=d{i},server.type=unix,server.path={}",
                        socket.display()
                    ));
                    c.arg("-device")
                        .arg(format!("virtio-blk-pci,drive=d{i},{slot}"));
                }
                Disk::VhostUserBlk { socket, queues } => {
                    c.arg("-chardev")
                        .arg(format!("socket,id=c{i},path={}", socket.display()));
                    c.arg("-device").arg(format!(
                        "vhost-user-blk-pci,chardev=c{i},num-queues={queues},{slot}"
                    ));
                }
            }
        }
        for (i, sh) in self.shares.iter().enumerate() {
            let ro = if sh.read_only { ",readonly=on" } else { "" };
            c.arg("-fsdev").arg(format!(
                "local,id=fs{i},path={},security_model=none{ro}",
                sh.host.display()
            ));
            c.arg("-device").arg(format!(
                "virtio-9p-pci,fsdev=fs{i},mount_tag={},addr=0x{:x}",
                sh.tag,
                FIRST_SHARE_SLOT + i
            ));
        }
        c
    }
}

/// Whether `path` opens with O_DIRECT (tmpfs and some FUSE files do not).
fn takes_direct_io(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_get_fixed_slots_in_order_and_vhost_gets_shared_memory() {
        let m = Machine {
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            mem_mib: 512,
            cpus: 2,
            accel: Accel::Tcg,
            disks: vec![
                Disk::Nbd {
                    socket: "/s0".into(),
                },
                Disk::VhostUserBlk {
                    socket: "/s1".into(),
                    queues: 2,
                },
            ],
            shares: vec![crate::guest::Share {
                tag: "t".into(),
                host: "/h".into(),
                guest: "/g".into(),
                read_only: true,
            }],
        };
        let args: Vec<String> = m
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("server.path=/s0"));
        assert!(joined.contains("virtio-blk-pci,drive=d0,addr=0x4"));
        assert!(joined.contains("vhost-user-blk-pci,chardev=c1,num-queues=2,addr=0x5"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("accel=tcg"));
        assert!(joined.contains("local,id=fs0,path=/h,security_model=none,readonly=on"));
        assert!(joined.contains("virtio-9p-pci,fsdev=fs0,mount_tag=t,addr=0x1a"));
    }
}
