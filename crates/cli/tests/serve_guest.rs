//! A QEMU guest (Debian's 6.12 kernel, TCG) sees a served volume as
//! `/dev/vda` over NBD and over vhost-user-blk, makes ext4 on it and writes
//! files; the host then checks the file system with `e2fsck -fn` and reads
//! the files back with `debugfs`. The neighbours' sentinels stay intact.

mod common;
use common::guest::*;
use common::serving::*;
use devpool_vm::qemu::Disk;
use std::process::Command;
use std::time::Duration;

const SCRIPT: &str = "\
if mkfs.ext4 -q -F /dev/vda && mount -t ext4 /dev/vda /mnt; then \
  mkdir -p /mnt/dir && echo hello-from-the-guest > /mnt/dir/hello.txt && \
  dd if=/dev/urandom of=/mnt/big bs=1M count=6 2>/dev/null && \
  echo \"BIGSUM $(sha256sum /mnt/big)\" && \
  umount /mnt && echo DEVPOOL-GUEST-OK; \
else echo DEVPOOL-GUEST-FAILED; fi";

fn guest_writes_ext4(test: &str, pool: &str, vhost: bool) {
    if need_tools(test, &["e2fsck", "debugfs"]) {
        return;
    }
    let Some(kernel) = guest_or_skip(test) else {
        return;
    };
    let b = Bench::new(pool, 64);
    let initrd = b.lab.path("initrd.cpio");
    initramfs(
        &kernel,
        &["virtio_blk", "crc32c_generic", "ext4"],
        &["/sbin/mke2fs"],
        SCRIPT,
        &initrd,
    );
    // mkfs.ext4 is mke2fs under another name.
    let sock = b.lab.path("vol.sock");
    let lv = b.lv(1);
    let (flag, arg, disk) = if vhost {
        (
            "--vhost-user-blk",
            sock.display().to_string(),
            Disk::VhostUserBlk {
                socket: sock.clone(),
                queues: 2,
            },
        )
    } else {
        (
            "--nbd",
            format!("unix:{}", sock.display()),
            Disk::Nbd {
                socket: sock.clone(),
            },
        )
    };
    let srv = Server::start(&b.lab, pool, &[&lv, flag, &arg]);
    let console = boot(&kernel, &initrd, vec![disk], Duration::from_secs(300));
    assert!(
        console.contains("DEVPOOL-GUEST-OK"),
        "guest failed:\n{console}"
    );
    assert!(!console.contains("DEVPOOL-INSMOD-FAILED"), "{console}");
    let guest_sum = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("BIGSUM "))
        .and_then(|l| l.split_whitespace().next())
        .expect("checksum line")
        .to_string();
    drop(srv);
    // The host reads the volume straight from the pool image.
    let (off, size) = b.windows[1];
    let copy = b.lab.path("vol.img");
    let mut data = vec![0u8; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&b.image).unwrap(),
        &mut data,
        off,
    )
    .unwrap();
    std::fs::write(&copy, &data).unwrap();
    let c = copy.display().to_string();
    run_ok(Command::new("e2fsck").args(["-fn", &c]));
    let hello = run_ok(Command::new("debugfs").args(["-R", "cat /dir/hello.txt", &c]));
    assert_eq!(hello.trim(), "hello-from-the-guest");
    let big = b.lab.path("big.out");
    run_ok(Command::new("debugfs").args(["-R", &format!("dump /big {}", big.display()), &c]));
    let host_sum = run_ok(Command::new("sha256sum").arg(&big));
    assert_eq!(host_sum.split_whitespace().next(), Some(guest_sum.as_str()));
    b.assert_neighbours_intact();
}

#[test]
fn guest_makes_ext4_over_nbd_and_the_host_checks_it() {
    guest_writes_ext4("guest over NBD", "gnbd", false);
}

#[test]
fn guest_makes_ext4_over_vhost_user_blk_and_the_host_checks_it() {
    guest_writes_ext4("guest over vhost-user-blk", "gvhost", true);
}
