//! LVM2's devices file (`/etc/lvm/devices/system.devices`): where LVM2
//! runs with `devices/use_devicesfile = 1` and the file exists, it uses only
//! the devices listed there, so a PV devpool creates must be listed too (as
//! `pvcreate` lists it), or LVM2 never sees it.
//!
//! The file is line based: `#` comments, `SYSTEMID=…`, `VERSION=M.m.counter`
//! (the counter grows by one at every write; LVM2 refuses to rewrite a file
//! whose version it cannot read or whose major number is newer than its
//! own), and one line per device of space-separated `KEY=VALUE` fields:
//! `IDTYPE` and `IDNAME` (required), `DEVNAME`, `PVID`, `PART`. A `.`
//! stands for "none". Lines without `IDTYPE` and `IDNAME` are dropped, as
//! LVM2 drops them.

use crate::FormatError;

/// The version this writes (LVM2's `DEVICES_FILE_MAJOR`/`MINOR`).
pub const MAJOR: u32 = 1;
pub const MINOR: u32 = 1;

/// One device the file lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// `sys_wwid`, `sys_serial`, `loop_file`, `md_uuid`, `devname`, …
    pub idtype: String,
    pub idname: String,
    /// The device's name when written (`.` if unknown).
    pub devname: String,
    /// The PV uuid without dashes, or `.` for a device that holds no PV.
    pub pvid: String,
    /// The partition number, when the ID is the whole disk's.
    pub part: Option<u32>,
}

impl DeviceEntry {
    fn parse(line: &str) -> Option<DeviceEntry> {
        // An empty value is "none", as `.` is.
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
                .map(|v| if v.is_empty() { "." } else { v })
                .map(str::to_string)
        };
        let idtype = field("IDTYPE")?;
        let idname = field("IDNAME")?;
        Some(DeviceEntry {
            idtype,
            idname,
            devname: field("DEVNAME").unwrap_or_else(|| ".".into()),
            pvid: field("PVID").unwrap_or_else(|| ".".into()),
            part: field("PART")
                .and_then(|p| p.parse().ok())
                .filter(|&p| p > 0),
        })
    }

    fn render(&self) -> String {
        let mut s = format!(
            "IDTYPE={} IDNAME={} DEVNAME={} PVID={}",
            none_if_empty(&self.idtype),
            none_if_empty(&self.idname),
            none_if_empty(&self.devname),
            none_if_empty(&self.pvid)
        );
        if let Some(p) = self.part {
            s += &format!(" PART={p}");
        }
        s
    }

    /// Whether this is the same device as `other` by its ID.
    fn same_id(&self, other: &DeviceEntry) -> bool {
        self.idtype == other.idtype
            && self.idname == other.idname
            && self.idname != "."
            && self.part == other.part
    }
}

fn none_if_empty(s: &str) -> &str {
    if s.is_empty() || s.contains(char::is_whitespace) {
        "."
    } else {
        s
    }
}

/// A device ID as LVM2 stores it: whitespace and control characters become
/// `_` (a field ends at the first space).
pub fn sanitize_id(raw: &str) -> String {
    raw.trim()
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicesFile {
    pub system_id: Option<String>,
    /// (major, minor, counter) as read.
    pub version: Option<(u32, u32, u32)>,
    pub entries: Vec<DeviceEntry>,
}

impl DevicesFile {
    pub fn parse(text: &str) -> Result<DevicesFile, FormatError> {
        let mut f = DevicesFile::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some(v) = line.strip_prefix("SYSTEMID=") {
                f.system_id = Some(v.trim().to_string()).filter(|s| !s.is_empty());
            } else if let Some(v) = line.strip_prefix("VERSION=") {
                f.version = Some(parse_version(v.trim()).ok_or_else(|| {
                    FormatError::new(
                        "devices file",
                        n as u64 + 1,
                        format!("unreadable VERSION={} (line {})", v.trim(), n + 1),
                    )
                })?);
            } else if let Some(e) = DeviceEntry::parse(line) {
                f.entries.push(e);
            }
        }
        Ok(f)
    }

    /// Why the file must not be rewritten here, if it must not: written by
    /// an LVM2 with a newer major version.
    pub fn refuse_rewrite(&self) -> Option<String> {
        match self.version {
            Some((major, _, _)) if major > MAJOR => Some(format!(
                "its VERSION major {major} is newer than the {MAJOR} devpool writes"
            )),
            _ => None,
        }
    }

    /// List `entry`, replacing any entry for the same device (by ID) or the
    /// same PV.
    pub fn add(&mut self, entry: DeviceEntry) {
        let pvid = entry.pvid.clone();
        self.entries
            .retain(|e| !e.same_id(&entry) && (pvid == "." || e.pvid != pvid));
        self.entries.push(entry);
    }

    /// The PV `pvid` is gone: its entry stays, with no PVID (as `pvremove`
    /// leaves it). Whether an entry had it.
    pub fn forget_pvid(&mut self, pvid: &str) -> bool {
        let mut found = false;
        for e in self.entries.iter_mut().filter(|e| e.pvid == pvid) {
            e.pvid = ".".into();
            found = true;
        }
        found
    }

    /// The file's text for the next write: `creator` names the writer in the
    /// header comment, the version counter is one more than read.
    pub fn render(&self, creator: &str) -> String {
        let counter = self.version.map_or(0, |v| v.2).saturating_add(1);
        let mut s = String::from("# LVM uses devices listed in this file.\n");
        s += &format!("# Created by {creator}\n");
        if let Some(id) = &self.system_id {
            s += &format!("SYSTEMID={id}\n");
        }
        s += &format!("VERSION={MAJOR}.{MINOR}.{counter}\n");
        for e in &self.entries {
            s += &e.render();
            s.push('\n');
        }
        s
    }
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|x| x.parse::<u32>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LVM2_WROTE: &str = "# LVM uses devices listed in this file.\n\
# Created by LVM command pvcreate pid 12757 at Sun Nov 22 03:39:05 2026\n\
VERSION=1.1.1\n\
IDTYPE=loop_file IDNAME=/var/tmp/df.img DEVNAME=/dev/loop1 PVID=2a3JKlQxstzflGMe3fK4Ky3CyIRF31a8\n\
IDTYPE=sys_wwid IDNAME=naa.5000c500a1b2c3d4 DEVNAME=/dev/sdb1 PVID=. PART=1\n";

    #[test]
    fn reads_what_lvm2_writes_and_writes_the_next_version() {
        let f = DevicesFile::parse(LVM2_WROTE).unwrap();
        assert_eq!(f.version, Some((1, 1, 1)));
        assert_eq!(f.entries.len(), 2);
        assert_eq!(f.entries[0].idtype, "loop_file");
        assert_eq!(f.entries[0].pvid, "2a3JKlQxstzflGMe3fK4Ky3CyIRF31a8");
        assert_eq!(f.entries[1].part, Some(1));
        let text = f.render("devpool pv create");
        assert!(text.contains("\nVERSION=1.1.2\n"), "{text}");
        assert!(text.contains(
            "IDTYPE=sys_wwid IDNAME=naa.5000c500a1b2c3d4 DEVNAME=/dev/sdb1 PVID=. PART=1\n"
        ));
        let again = DevicesFile::parse(&text).unwrap();
        assert_eq!(again.entries, f.entries);
    }

    #[test]
    fn adding_replaces_the_same_device_or_pv_and_removing_keeps_the_device() {
        let mut f = DevicesFile::parse(LVM2_WROTE).unwrap();
        f.add(DeviceEntry {
            idtype: "loop_file".into(),
            idname: "/var/tmp/df.img".into(),
            devname: "/dev/loop3".into(),
            pvid: "N3wPv".into(),
            part: None,
        });
        assert_eq!(f.entries.len(), 2);
        assert_eq!(f.entries[1].devname, "/dev/loop3");
        assert!(f.forget_pvid("N3wPv"));
        assert_eq!(f.entries[1].pvid, ".");
        assert!(!f.forget_pvid("N3wPv"));
    }

    #[test]
    fn refuses_what_it_cannot_read_or_a_newer_major() {
        assert!(DevicesFile::parse("VERSION=1.x.3\n").is_err());
        let f = DevicesFile::parse("VERSION=2.0.7\n").unwrap();
        assert!(f.refuse_rewrite().is_some());
        let f = DevicesFile::parse("SYSTEMID=host1\nVERSION=1.1.9\ngarbage\n").unwrap();
        assert!(f.refuse_rewrite().is_none());
        assert!(f.entries.is_empty());
        assert!(f.render("x").contains("SYSTEMID=host1\nVERSION=1.1.10\n"));
    }

    #[test]
    fn empty_values_are_none_and_the_counter_does_not_overflow() {
        let f =
            DevicesFile::parse("VERSION=1.1.4294967295\nIDTYPE= IDNAME=x PART=0 PVID=\n").unwrap();
        assert_eq!(f.entries[0].idtype, ".");
        assert_eq!(f.entries[0].pvid, ".");
        assert_eq!(f.entries[0].part, None);
        let again = DevicesFile::parse(&f.render("x")).unwrap();
        assert_eq!(again.entries, f.entries);
        assert_eq!(again.version, Some((1, 1, u32::MAX)));
    }

    #[test]
    fn ids_lose_their_spaces() {
        assert_eq!(sanitize_id(" t10.ATA  disk 1\n"), "t10.ATA__disk_1");
    }
}
