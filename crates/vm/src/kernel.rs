//! A kernel image and its module tree. A Debian `linux-image-*.deb` is
//! unpacked once into a cache directory (keyed by the package file name) and
//! `depmod` generates its `modules.dep`; a module tree is used as it is.

use crate::{Result, VmError, io_err};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    /// `lib/modules/<version>` (absent for a kernel without modules).
    pub modules: Option<PathBuf>,
    pub version: String,
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(io_err(what))?;
    if !out.status.success() {
        return Err(VmError::Invalid(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Kernel {
    /// Whether `deb` is already unpacked under `cache` (else `from_deb`
    /// takes a while: unpacking and depmod).
    pub fn deb_is_unpacked(deb: &Path, cache: &Path) -> bool {
        deb.file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".deb").to_string())
            .is_some_and(|stem| cache.join(stem).join(".devpool-unpacked").exists())
    }

    /// Unpack `deb` under `cache` (unless already there) and find its
    /// `vmlinuz` and module tree.
    pub fn from_deb(deb: &Path, cache: &Path) -> Result<Kernel> {
        let stem = deb
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".deb").to_string())
            .ok_or_else(|| VmError::Invalid(format!("{}: not a .deb file", deb.display())))?;
        let root = cache.join(&stem);
        let done = root.join(".devpool-unpacked");
        if !done.exists() {
            let tmp = cache.join(format!("{stem}.partial"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
            run(
                Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp),
                &format!("unpacking {}", deb.display()),
            )?;
            let version = only_version(&tmp.join("lib/modules"))?;
            run(
                Command::new("depmod").arg("-b").arg(&tmp).arg(&version),
                "depmod (apt-get install kmod)",
            )?;
            std::fs::write(tmp.join(".devpool-unpacked"), b"")
                .map_err(io_err("mark unpacked kernel"))?;
            let _ = std::fs::remove_dir_all(&root);
            std::fs::rename(&tmp, &root)
                .map_err(io_err(format!("rename to {}", root.display())))?;
        }
        let version = only_version(&root.join("lib/modules"))?;
        let image = root.join("boot").join(format!("vmlinuz-{version}"));
        if !image.exists() {
            return Err(VmError::Invalid(format!(
                "{}: no boot/vmlinuz-{version} in the package",
                deb.display()
            )));
        }
        Ok(Kernel {
            image,
            modules: Some(root.join("lib/modules").join(&version)),
            version,
        })
    }

    /// A kernel image with an optional module tree: `DIR` may be the
    /// `lib/modules/<version>` directory itself or a root holding one (as
    /// `make modules_install INSTALL_MOD_PATH=DIR` leaves it). Without one,
    /// `/lib/modules/<version>` is used when the image's version is there.
    pub fn from_parts(image: &Path, modules: Option<&Path>) -> Result<Kernel> {
        if !image.is_file() {
            return Err(VmError::Invalid(format!(
                "{}: no such kernel image",
                image.display()
            )));
        }
        let version = bzimage_version(image)?;
        let tree = match modules {
            Some(dir) if dir.join("modules.dep").exists() => Some(dir.to_path_buf()),
            Some(dir) => {
                let under = dir.join("lib/modules").join(&version);
                if !under.join("modules.dep").exists() {
                    return Err(VmError::Invalid(format!(
                        "--modules {}: neither a module tree (no modules.dep) nor a root with lib/modules/{version}",
                        dir.display()
                    )));
                }
                Some(under)
            }
            None => {
                let sys = Path::new("/lib/modules").join(&version);
                sys.join("modules.dep").exists().then_some(sys)
            }
        };
        Ok(Kernel {
            image: image.to_path_buf(),
            modules: tree,
            version,
        })
    }

    /// Module files for `names` and everything they depend on, in load
    /// order (dependencies first); built-in modules need no file.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        self.resolve_with(names, &[])
    }

    /// Like [`resolve`](Self::resolve), plus `optional` modules where the
    /// kernel has them (skipped quietly where it has neither file nor
    /// built-in); `modules.dep` is read once.
    pub fn resolve_with(&self, names: &[&str], optional: &[&str]) -> Result<Vec<PathBuf>> {
        let Some(dir) = &self.modules else {
            return Ok(Vec::new());
        };
        let dep = std::fs::read_to_string(dir.join("modules.dep"))
            .map_err(io_err(format!("read {}/modules.dep", dir.display())))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let deps = ModulesDep::parse(&dep);
        let is_builtin = |key: &str| builtin.lines().any(|l| module_name(l) == key);
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (n, required) in optional
            .iter()
            .map(|n| (n, false))
            .chain(names.iter().map(|n| (n, true)))
        {
            let key = canonical(n);
            if is_builtin(&key) {
                continue;
            }
            match deps.path_of(&key) {
                Some(path) => deps.visit(path, &mut seen, &mut out),
                None if !required => {}
                None => {
                    return Err(VmError::Invalid(format!(
                        "module {n} is neither built into kernel {} nor in its modules.dep",
                        self.version
                    )));
                }
            }
        }
        Ok(out.into_iter().map(|p| dir.join(p)).collect())
    }
}

/// The release string of an x86 bzImage (`6.12.95+deb12-amd64`), from the
/// setup header's `kernel_version` pointer.
pub fn bzimage_version(image: &Path) -> Result<String> {
    use std::io::Read;
    let mut head = vec![0u8; 0x8000];
    let mut f = std::fs::File::open(image).map_err(io_err(format!("open {}", image.display())))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(io_err(format!("read {}", image.display()))(e)),
        }
    }
    head.truncate(n);
    parse_bzimage_version(&head).ok_or_else(|| {
        VmError::Invalid(format!(
            "{}: not an x86 bzImage (no setup header with a version string)",
            image.display()
        ))
    })
}

fn parse_bzimage_version(head: &[u8]) -> Option<String> {
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]) as usize;
    let at = ptr.checked_add(0x200)?;
    let text = head.get(at..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let v = std::str::from_utf8(&text[..end]).ok()?;
    (!v.is_empty()).then(|| v.to_string())
}

fn only_version(modules: &Path) -> Result<String> {
    let mut v: Vec<String> = std::fs::read_dir(modules)
        .map_err(io_err(format!("read {}", modules.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v.pop()
        .ok_or_else(|| VmError::Invalid(format!("{}: no module tree", modules.display())))
}

/// `ext4` for `kernel/fs/ext4/ext4.ko.xz`; `-` and `_` are the same.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    canonical(base)
}

fn canonical(n: &str) -> String {
    n.replace('-', "_")
}

/// `modules.dep`: each module's path and its dependencies' paths.
pub struct ModulesDep {
    entries: Vec<(String, Vec<String>)>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> ModulesDep {
        ModulesDep {
            entries: text
                .lines()
                .filter_map(|l| {
                    let (m, deps) = l.split_once(':')?;
                    Some((
                        m.trim().to_string(),
                        deps.split_whitespace().map(str::to_string).collect(),
                    ))
                })
                .collect(),
        }
    }
    fn path_of(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(p, _)| module_name(p) == name)
            .map(|(p, _)| p.as_str())
    }
    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        if let Some((_, deps)) = self.entries.iter().find(|(p, _)| p == path) {
            // modules.dep lists the full closure, nearest first: load the
            // farthest first by visiting them in reverse.
            for d in deps.iter().rev() {
                self.visit(d, seen, out);
            }
        }
        out.push(path.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_versions_come_from_the_setup_header() {
        let mut h = vec![0u8; 0x1000];
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.12.95+deb12-amd64 (debian-kernel@lists.debian.org) #1\0";
        h[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(
            parse_bzimage_version(&h).as_deref(),
            Some("6.12.95+deb12-amd64")
        );
        assert_eq!(parse_bzimage_version(&h[..0x300]), None);
        h[0x202] = b'X';
        assert_eq!(parse_bzimage_version(&h), None);
        assert_eq!(parse_bzimage_version(&[]), None);
    }

    #[test]
    fn dependencies_come_before_the_modules_that_need_them() {
        let d = ModulesDep::parse(
            "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
             kernel/lib/crc16.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/fs/jbd2/jbd2.ko.xz:\n\
             kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz\n\
             kernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz\nkernel/drivers/md/dm-mod.ko.xz:\n",
        );
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        d.visit(d.path_of("dm_snapshot").unwrap(), &mut seen, &mut out);
        d.visit(
            d.path_of(&canonical("dm-mod")).unwrap(),
            &mut seen,
            &mut out,
        );
        assert_eq!(
            out,
            [
                "kernel/drivers/md/dm-mod.ko.xz",
                "kernel/drivers/md/dm-bufio.ko.xz",
                "kernel/drivers/md/dm-snapshot.ko.xz"
            ]
        );
        let mut out = Vec::new();
        d.visit(d.path_of("ext4").unwrap(), &mut BTreeSet::new(), &mut out);
        assert_eq!(out.last().unwrap(), "kernel/fs/ext4/ext4.ko.xz");
        assert_eq!(out.len(), 4);
    }
}
