//! The guest side of a run: an initramfs whose `/init` mounts the basics,
//! loads the modules the run needs, waits for its disks, mounts shared host
//! directories, sets the environment (`TEST_DEV=/dev/vda`, …), runs the
//! command and reports its exit status on the console between markers that
//! the [`runner`](crate::runner) looks for, then powers the VM off.

use crate::initramfs::Initramfs;
use crate::kernel::Kernel;
use crate::{Result, VmError, io_err};
use std::path::{Path, PathBuf};

/// Printed by `/init` just before the command starts.
pub const READY_MARKER: &str = "@@devpool:ready@@";
/// Printed by `/init` with the command's exit status: `@@devpool:exit=N@@`.
pub const EXIT_MARKER: &str = "@@devpool:exit=";

/// A host file or directory copied into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFile {
    pub src: PathBuf,
    pub dst: String,
}

impl AddFile {
    /// `SRC:DST`, or `SRC` alone (same path in the guest).
    pub fn parse(s: &str) -> Result<AddFile> {
        let (src, dst) = match s.split_once(':') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(VmError::Invalid(format!(
                "--add '{s}': expected SRC:DST (or SRC)"
            )));
        }
        if dst == "/init" || dst.starts_with("/etc/devpool/") {
            return Err(VmError::Invalid(format!(
                "--add '{s}': {dst} is devpool's own guest file"
            )));
        }
        if !dst.starts_with('/') {
            return Err(VmError::Invalid(format!(
                "--add '{s}': the guest path '{dst}' must be absolute"
            )));
        }
        Ok(AddFile {
            src: PathBuf::from(src),
            dst: dst.to_string(),
        })
    }
}

/// A host directory the guest mounts over 9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: Kernel,
    pub busybox: PathBuf,
    /// Modules to load at boot (their dependencies are found and loaded first).
    pub modules: Vec<String>,
    /// Modules that are loaded when the kernel has them, and skipped quietly
    /// when it does not (e.g. a kernel with virtio built in and no tree).
    pub optional_modules: Vec<String>,
    pub files: Vec<AddFile>,
    /// Environment of the command.
    pub env: Vec<(String, String)>,
    /// How many virtio disks to wait for.
    pub disks: usize,
    pub shares: Vec<Share>,
    pub command: Vec<String>,
    pub workdir: String,
}

/// Quote for sh: `'it'\''s'`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/dev/vda` for disk 0, … `/dev/vdz`, then `/dev/vdaa`.
pub fn disk_name(i: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    if i < 26 {
        format!("/dev/vd{}", letters[i] as char)
    } else {
        format!(
            "/dev/vd{}{}",
            letters[(i / 26 - 1) % 26] as char,
            letters[i % 26] as char
        )
    }
}

impl GuestSpec {
    /// The module files to load, in order; missing optional ones are skipped.
    fn module_files(&self) -> Result<Vec<PathBuf>> {
        let names: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        let optional: Vec<&str> = self.optional_modules.iter().map(String::as_str).collect();
        self.kernel.resolve_with(&names, &optional)
    }

    pub fn init_script(&self, modules: &[String]) -> String {
        let mut s = String::from(
            "#!/bin/busybox sh\n\
             # devpool guest init: generated for one run.\n\
             export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root TERM=dumb\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             mkdir -p /dev/pts /dev/shm /root; mount -t devpts devpts /dev/pts\n\
             mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /dev/shm\n\
             mkdir -p /run/lock /var; ln -s /run /var/run 2>/dev/null; ln -s /run/lock /var/lock 2>/dev/null\n\
             echo /sbin/modprobe > /proc/sys/kernel/modprobe 2>/dev/null\n",
        );
        for m in modules {
            s.push_str(&format!(
                "insmod {m} 2>/dev/null || grep -q \"^$(basename {m} .ko) \" /proc/modules || echo \"devpool-guest: insmod {m} failed\"\n"
            ));
        }
        if self.disks > 0 {
            let last = disk_name(self.disks - 1);
            s.push_str(&format!(
                "n=0; while [ ! -b {last} ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done\n\
                 [ -b {last} ] || echo \"devpool-guest: {last} did not appear\"\n"
            ));
        }
        for sh in &self.shares {
            let ro = if sh.read_only { ",ro" } else { "" };
            s.push_str(&format!(
                "mkdir -p {g}; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose{ro} {t} {g} || echo \"devpool-guest: mounting {t} on {g} failed\"\n",
                g = sh_quote(&sh.guest),
                t = sh_quote(&sh.tag),
            ));
        }
        s.push_str(". /etc/devpool/env\n");
        s.push_str(&format!("cd {} || cd /\n", sh_quote(&self.workdir)));
        s.push_str(&format!("echo; echo {READY_MARKER}\n"));
        s.push_str("sh /etc/devpool/command </dev/null\nrc=$?\n");
        s.push_str(&format!("sync; echo; echo \"{EXIT_MARKER}$rc@@\"\n"));
        s.push_str("poweroff -f\n");
        s
    }

    /// The whole initramfs, ready for `-initrd`.
    pub fn initramfs(&self) -> Result<Vec<u8>> {
        self.initramfs_with(&[])
    }

    /// The initramfs plus files given as contents: (guest path, bytes, mode).
    pub fn initramfs_with(&self, contents: &[(String, Vec<u8>, u32)]) -> Result<Vec<u8>> {
        let mut i = Initramfs::new();
        for (path, data, mode) in contents {
            i.bytes(path, data, *mode)?;
        }
        i.busybox(&self.busybox)?;
        let files = self.module_files()?;
        let guest_mods = i.modules(&files)?;
        for f in &self.files {
            add_path(&mut i, &f.src, &f.dst, true)?;
        }
        let mut env = String::new();
        for (k, v) in &self.env {
            env.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
        i.bytes("etc/devpool/env", env.as_bytes(), 0o644)?;
        let cmd: Vec<String> = self.command.iter().map(|a| sh_quote(a)).collect();
        i.bytes(
            "etc/devpool/command",
            format!("{}\n", cmd.join(" ")).as_bytes(),
            0o644,
        )?;
        i.bytes("init", self.init_script(&guest_mods).as_bytes(), 0o755)?;
        i.finish()
    }
}

fn is_dynamic_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    let elf = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"\x7fELF";
    elf && std::process::Command::new("ldd")
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A host file (programs with their libraries), symlink or directory tree.
/// A symlink named on the command line is followed (`/sbin/mkfs.ext4` is a
/// link to `mke2fs`); symlinks inside a directory tree stay links.
fn add_path(i: &mut Initramfs, src: &Path, dst: &str, follow: bool) -> Result<()> {
    let meta = if follow {
        std::fs::metadata(src)
    } else {
        std::fs::symlink_metadata(src)
    }
    .map_err(io_err(format!("--add {}", src.display())))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(io_err(format!("read {}", src.display())))?;
        i.symlink(dst, &target.to_string_lossy());
        return Ok(());
    }
    if meta.is_dir() {
        i.dir(dst);
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .map_err(io_err(format!("read {}", src.display())))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            add_path(
                i,
                &e.path(),
                &format!("{}/{name}", dst.trim_end_matches('/')),
                false,
            )?;
        }
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o111 != 0 && is_dynamic_elf(src) {
        i.host_binary_as(src, dst)
    } else {
        i.file(src, dst, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        for s in [
            "plain",
            "two words",
            "it's",
            "$HOME",
            "a\"b",
            "",
            "x;rm -rf /",
        ] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {}", sh_quote(s))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn disks_are_named_like_the_guest_names_them() {
        assert_eq!(disk_name(0), "/dev/vda");
        assert_eq!(disk_name(25), "/dev/vdz");
        assert_eq!(disk_name(26), "/dev/vdaa");
        assert_eq!(disk_name(27), "/dev/vdab");
        assert_eq!(disk_name(52), "/dev/vdba");
    }

    #[test]
    fn add_takes_src_dst_or_one_path() {
        assert_eq!(
            AddFile::parse("/a/b:/c").unwrap(),
            AddFile {
                src: "/a/b".into(),
                dst: "/c".into()
            }
        );
        assert_eq!(AddFile::parse("/x").unwrap().dst, "/x");
        assert!(AddFile::parse("/a:rel").is_err());
        assert!(AddFile::parse(":/x").is_err());
    }
}
