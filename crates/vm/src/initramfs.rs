//! An initramfs (newc cpio, uncompressed: the kernel takes it as is) built in
//! memory: directories, files, symlinks, busybox with its applets, kernel
//! modules (decompressed here, so the guest's insmod needs no xz), and host
//! binaries with the shared libraries `ldd` lists.

use crate::{Result, VmError, io_err};
use cpio::newc::{Builder as Entry, ModeFileType};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Default)]
pub struct Initramfs {
    out: Vec<u8>,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
    ino: u32,
}

fn rel(p: &str) -> String {
    p.trim_start_matches('/').to_string()
}

impl Initramfs {
    pub fn new() -> Initramfs {
        let mut i = Initramfs::default();
        for d in [
            "dev", "proc", "sys", "tmp", "mnt", "bin", "sbin", "etc", "lib", "lib64", "run",
        ] {
            i.dir(d);
        }
        i
    }

    fn next_ino(&mut self) -> u32 {
        self.ino += 1;
        self.ino
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let p = rel(path);
        let mut cur = String::new();
        for part in p.split('/').filter(|s| !s.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if self.dirs.insert(cur.clone()) {
                let ino = self.next_ino();
                let w = Entry::new(&cur)
                    .ino(ino)
                    .mode(0o755)
                    .nlink(2)
                    .set_mode_file_type(ModeFileType::Directory)
                    .write(&mut self.out, 0);
                let _ = w.finish();
            }
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((dir, _)) = rel(path).rsplit_once('/') {
            self.dir(dir);
        }
    }

    pub fn bytes(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let p = rel(path);
        if !self.files.insert(p.clone()) {
            return Ok(());
        }
        self.parent(&p);
        let len = u32::try_from(data.len())
            .map_err(|_| VmError::Invalid(format!("{path}: too large for an initramfs")))?;
        let ino = self.next_ino();
        let mut w = Entry::new(&p)
            .ino(ino)
            .mode(mode)
            .nlink(1)
            .set_mode_file_type(ModeFileType::Regular)
            .write(&mut self.out, len);
        w.write_all(data)
            .map_err(io_err(format!("archive {path}")))?;
        w.finish().map_err(io_err(format!("archive {path}")))?;
        Ok(())
    }

    pub fn file(&mut self, src: &Path, dst: &str, mode: u32) -> Result<()> {
        let data = std::fs::read(src).map_err(io_err(format!("read {}", src.display())))?;
        self.bytes(dst, &data, mode)
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let p = rel(path);
        if !self.files.insert(p.clone()) {
            return;
        }
        self.parent(&p);
        let ino = self.next_ino();
        let mut w = Entry::new(&p)
            .ino(ino)
            .mode(0o777)
            .nlink(1)
            .set_mode_file_type(ModeFileType::Symlink)
            .write(&mut self.out, target.len() as u32);
        let _ = w.write_all(target.as_bytes());
        let _ = w.finish();
    }

    /// Static busybox as /bin/busybox with a link per applet in /bin.
    pub fn busybox(&mut self, busybox: &Path) -> Result<()> {
        self.file(busybox, "bin/busybox", 0o755)?;
        let out = Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(io_err(format!("run {} --list", busybox.display())))?;
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            let a = applet.trim();
            if !a.is_empty() && a != "busybox" {
                self.symlink(&format!("bin/{a}"), "busybox");
            }
        }
        self.symlink("sbin/init", "../init");
        Ok(())
    }

    /// Kernel modules, decompressed, as `/lib/modules/<name>.ko` in the given
    /// (load) order; returns the guest paths in that order.
    pub fn modules(&mut self, files: &[PathBuf]) -> Result<Vec<String>> {
        let mut guest = Vec::new();
        for f in files {
            let name = crate::kernel::module_name(&f.to_string_lossy());
            let data = decompress(f)?;
            let dst = format!("lib/modules/{name}.ko");
            self.bytes(&dst, &data, 0o644)?;
            guest.push(format!("/{dst}"));
        }
        Ok(guest)
    }

    /// A dynamically linked host program and the libraries it needs, at the
    /// same paths as on the host.
    pub fn host_binary(&mut self, path: &Path) -> Result<()> {
        self.host_binary_as(path, &path.to_string_lossy())
    }

    /// A host program placed at `dst`, with its libraries at their host paths.
    pub fn host_binary_as(&mut self, path: &Path, dst: &str) -> Result<()> {
        self.file(path, dst, 0o755)?;
        let out = Command::new("ldd")
            .arg(path)
            .output()
            .map_err(io_err(format!("ldd {}", path.display())))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let lib = match line.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|s| s.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                let real = std::fs::canonicalize(lib).map_err(io_err(format!("resolve {lib}")))?;
                self.file(&real, lib, 0o755)?;
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Vec<u8>> {
        cpio::newc::trailer(&mut self.out).map_err(io_err("archive trailer"))?;
        Ok(self.out)
    }
}

fn decompress(f: &Path) -> Result<Vec<u8>> {
    let name = f.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(f).map_err(io_err(format!("read {name}")));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(f)
        .output()
        .map_err(io_err(format!("{tool} -dc {name}")))?;
    if !out.status.success() {
        return Err(VmError::Invalid(format!(
            "{tool} -dc {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_lists_parents_before_children_and_ends_with_the_trailer() {
        let mut i = Initramfs::new();
        i.bytes("/etc/x/y.conf", b"hello", 0o644).unwrap();
        i.symlink("bin/sh", "busybox");
        let a = i.finish().unwrap();
        let mut names = Vec::new();
        let mut r = std::io::Cursor::new(a);
        loop {
            let e = cpio::newc::Reader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            names.push(e.entry().name().to_string());
            r = e.finish().unwrap();
        }
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("etc") < pos("etc/x"));
        assert!(pos("etc/x") < pos("etc/x/y.conf"));
        assert!(names.contains(&"bin/sh".to_string()));
    }
}
