//! Which VGs this host may change, by LVM2's rules: not an exported VG
//! (`vgexport`), not a read-only one (no WRITE in its status), not one
//! that belongs to another host (its `system_id` is not this host's), and
//! not a shared VG (`lock_type`: only lvmlockd's locks make changing it
//! safe) nor an old clustered one (clvmd's `CLUSTERED`). Reading any of
//! them is fine.
//!
//! This host's system ID comes from LVM2's own configuration, as LVM2
//! reads it: `global/system_id_source` in `lvm.conf` (or `lvmlocal.conf`)
//! under `$LVM_SYSTEM_DIR` (default `/etc/lvm`), then `local/system_id`,
//! the host name, `/etc/machine-id` or `global/system_id_file`.

use devpool_format::config::{Section, Value, parse};
use devpool_format::metadata::VgMetadata;
use std::path::PathBuf;

/// Why `vg` must not be changed by this host, if it must not.
/// `local_system_id` is asked only for a VG that has a system ID.
pub fn refusal(
    vg: &VgMetadata,
    local_system_id: impl FnOnce() -> Option<String>,
) -> Option<String> {
    let name = &vg.name;
    let has = |list: &[String], flag: &str| list.iter().any(|s| s == flag);
    if has(&vg.status, "EXPORTED") {
        return Some(format!(
            "VG '{name}' is exported (vgexport): run 'vgimport {name}' before changing it"
        ));
    }
    if has(&vg.status, "CLUSTERED") {
        return Some(format!(
            "VG '{name}' is clustered (clvmd's): LVM2 changes it only after 'vgchange --lock-type none {name}'"
        ));
    }
    if let Some(lock) = vg.str_field("lock_type").filter(|l| *l != "none") {
        return Some(format!(
            "VG '{name}' is shared (lock_type \"{lock}\"): changing it takes lvmlockd's locks, which devpool does not take; use lvm with lvmlockd"
        ));
    }
    if let Some(id) = vg.str_field("system_id").filter(|s| !s.is_empty()) {
        let local = local_system_id();
        if local.as_deref() != Some(id) {
            let here = match local {
                Some(l) => format!("this host's is '{l}'"),
                None => "this host has none (global/system_id_source in lvm.conf)".to_string(),
            };
            return Some(format!(
                "VG '{name}' belongs to system ID '{id}' and {here}: LVM2 treats it as foreign, and so does devpool; change it on its own host"
            ));
        }
        // LVM2 writes a system ID'd VG without WRITE, flagged WRITE_LOCKED
        // instead, so that older LVM2 leaves it alone: for its owner, that
        // flag stands for WRITE.
        if has(&vg.flags, "WRITE_LOCKED") {
            return None;
        }
    }
    if !has(&vg.status, "WRITE") {
        return Some(format!(
            "VG '{name}' is read-only (its metadata status has no WRITE); LVM2 will not change it either"
        ));
    }
    None
}

/// Make a new VG this host's, as `vgcreate` does on a host with a system
/// ID: the ID in the metadata, and WRITE replaced by the WRITE_LOCKED flag
/// so that an LVM2 too old to know system IDs does not change it either.
pub fn stamp(vg: &mut VgMetadata, system_id: &str) {
    vg.status.retain(|s| s != "WRITE");
    if !vg.flags.iter().any(|f| f == "WRITE_LOCKED") {
        vg.flags.push("WRITE_LOCKED".into());
    }
    vg.extra.retain(|i| i.key() != "system_id");
    vg.extra.push(devpool_format::config::Item::Assign(
        "system_id".into(),
        Value::Str(system_id.to_string()),
    ));
}

/// This host's LVM2 system ID, if LVM2's configuration gives it one.
pub fn local_system_id() -> Option<String> {
    let c = lvm_config();
    let id = match c.source.as_deref().unwrap_or("none") {
        "lvmlocal" => c.local_id,
        "uname" => Some(crate::engine::hostname()).filter(|h| !h.starts_with("localhost")),
        "machineid" => first_line(&PathBuf::from("/etc/machine-id")),
        "file" => c.id_file.and_then(|f| first_line(&PathBuf::from(f))),
        // "none", and "appmachineid" (a hash this does not compute): no ID,
        // so every VG with one is refused, never wrongly allowed.
        _ => None,
    };
    id.map(|s| sanitized(&s)).filter(|s| !s.is_empty())
}

/// The settings of LVM2's configuration devpool follows.
#[derive(Clone, Default)]
struct LvmConfig {
    /// `global/system_id_source`, `local/system_id`, `global/system_id_file`.
    source: Option<String>,
    local_id: Option<String>,
    id_file: Option<String>,
    /// `devices/use_devicesfile`, `devices/devicesfile`.
    use_devices_file: Option<i64>,
    devices_file: Option<String>,
}

/// LVM2's devices file, when LVM2 here uses one (`devices/use_devicesfile
/// = 1` and the file exists; without the file LVM2 uses every device):
/// LVM2 then sees a new PV only once `lvmdevices --adddev` lists it.
pub fn lvm_devices_file() -> Option<PathBuf> {
    let c = lvm_config();
    if c.use_devices_file != Some(1) {
        return None;
    }
    let name = c.devices_file.unwrap_or_else(|| "system.devices".into());
    let file = lvm_system_dir().join("devices").join(name);
    file.exists().then_some(file)
}

fn lvm_system_dir() -> PathBuf {
    std::env::var_os("LVM_SYSTEM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/lvm"))
}

/// The settings of `lvm.conf` and `lvmlocal.conf`, parsed again only when
/// either file changes (a VG with a system ID asks at every commit, and
/// lvm.conf is 100 KiB of comments).
fn lvm_config() -> LvmConfig {
    type Stamp = Vec<Option<(i64, i64, u64, u64)>>;
    static CACHE: std::sync::Mutex<Option<(PathBuf, Stamp, LvmConfig)>> =
        std::sync::Mutex::new(None);
    use std::os::unix::fs::MetadataExt;
    let dir = lvm_system_dir();
    // lvmlocal.conf is read after lvm.conf and wins.
    let files = [dir.join("lvm.conf"), dir.join("lvmlocal.conf")];
    let stamp: Stamp = files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.mtime(), m.mtime_nsec(), m.ino(), m.len()))
        })
        .collect();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((d, s, c)) = cache.as_ref()
        && *d == dir
        && *s == stamp
    {
        return c.clone();
    }
    let c = config_of(&files);
    *cache = Some((dir, stamp, c.clone()));
    c
}

/// The settings in `files`, a later file's winning.
fn config_of(files: &[PathBuf]) -> LvmConfig {
    let configs: Vec<Section> = files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|text| parse(&text).ok())
        .collect();
    let value = |section: &str, key: &str| {
        configs
            .iter()
            .rev()
            .find_map(|c| c.section(section)?.get(key).cloned())
    };
    let text = |section: &str, key: &str| match value(section, key) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    };
    LvmConfig {
        source: text("global", "system_id_source"),
        local_id: text("local", "system_id"),
        id_file: text("global", "system_id_file"),
        use_devices_file: match value("devices", "use_devicesfile") {
            Some(Value::Int(i)) => Some(i),
            _ => None,
        },
        devices_file: text("devices", "devicesfile"),
    }
}

fn first_line(path: &PathBuf) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().next()?.trim().to_string())
}

/// LVM2 keeps only these characters of a system ID.
fn sanitized(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-+".contains(*c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devpool_format::config::Item;
    use devpool_format::units::ExtentSize;
    use devpool_format::uuid::LvmUuid;

    fn vg() -> VgMetadata {
        let mut v = VgMetadata::new_empty(
            "vg0",
            LvmUuid::from_random([7; 32]),
            ExtentSize::from_metadata(devpool_format::units::Sectors(8192)).unwrap(),
        );
        v.status = vec!["RESIZEABLE".into(), "READ".into(), "WRITE".into()];
        v
    }

    fn with(mut v: VgMetadata, key: &str, value: &str) -> VgMetadata {
        v.extra
            .push(Item::Assign(key.into(), Value::Str(value.into())));
        v
    }

    #[test]
    fn exported_shared_foreign_and_read_only_vgs_are_refused() {
        assert_eq!(refusal(&vg(), || None), None);

        let mut exported = vg();
        exported.status.push("EXPORTED".into());
        assert!(
            refusal(&exported, || None)
                .unwrap()
                .contains("vgimport vg0")
        );

        let mut clustered = vg();
        clustered.status.push("CLUSTERED".into());
        assert!(refusal(&clustered, || None).unwrap().contains("clustered"));

        let shared = with(vg(), "lock_type", "sanlock");
        assert!(refusal(&shared, || None).unwrap().contains("lvmlockd"));
        assert_eq!(refusal(&with(vg(), "lock_type", "none"), || None), None);

        // As LVM2 writes a VG with a system ID: no WRITE, WRITE_LOCKED.
        let mut owned = with(vg(), "system_id", "hostA");
        owned.status = vec!["RESIZEABLE".into(), "READ".into()];
        owned.flags = vec!["WRITE_LOCKED".into()];
        assert_eq!(refusal(&owned, || Some("hostA".into())), None);
        let r = refusal(&owned, || Some("hostB".into())).unwrap();
        assert!(r.contains("'hostA'") && r.contains("'hostB'"), "{r}");
        assert!(refusal(&owned, || None).unwrap().contains("has none"));

        let mut read_only = vg();
        read_only.status = vec!["RESIZEABLE".into(), "READ".into()];
        assert!(
            refusal(&read_only, || None)
                .unwrap()
                .contains("is read-only")
        );
    }

    #[test]
    fn a_stamped_vg_is_its_hosts_alone() {
        let mut v = vg();
        stamp(&mut v, "hostA");
        assert_eq!(v.str_field("system_id"), Some("hostA"));
        assert!(!v.status.iter().any(|s| s == "WRITE"));
        assert_eq!(refusal(&v, || Some("hostA".into())), None);
        assert!(refusal(&v, || Some("hostB".into())).is_some());
        assert!(refusal(&v, || None).is_some());
        // The text LVM2 reads back says the same.
        let back = VgMetadata::parse(&v.to_disk_text()).unwrap();
        assert_eq!(back.str_field("system_id"), Some("hostA"));
        assert_eq!(back.flags, vec!["WRITE_LOCKED".to_string()]);
    }

    #[test]
    fn settings_come_from_lvm_conf_with_lvmlocal_conf_winning() {
        let dir = std::env::temp_dir().join(format!("devpool-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (conf, local) = (dir.join("lvm.conf"), dir.join("lvmlocal.conf"));
        std::fs::write(
            &conf,
            "# comment\ndevices {\n\tuse_devicesfile = 1\n}\nglobal {\n\tsystem_id_source = \"uname\"\n}\n",
        )
        .unwrap();
        std::fs::write(
            &local,
            "global { system_id_source = \"lvmlocal\" }\nlocal { system_id = \"h1\" }\n",
        )
        .unwrap();
        let c = config_of(&[conf.clone(), local]);
        assert_eq!(c.use_devices_file, Some(1));
        assert_eq!(c.source.as_deref(), Some("lvmlocal"));
        assert_eq!(c.local_id.as_deref(), Some("h1"));
        let c = config_of(&[conf, dir.join("missing.conf")]);
        assert_eq!(c.source.as_deref(), Some("uname"));
        assert_eq!(c.local_id, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lvm2s_own_configuration_files_parse() {
        for f in ["/etc/lvm/lvm.conf", "/etc/lvm/lvmlocal.conf"] {
            if let Ok(text) = std::fs::read(f) {
                assert!(parse(&text).is_ok(), "{f}: {:?}", parse(&text).err());
            }
        }
    }

    #[test]
    fn system_ids_keep_lvm2s_characters_only() {
        assert_eq!(sanitized("host a/b:c_d-e.f+g"), "hostabc_d-e.f+g");
    }
}
