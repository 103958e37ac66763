//! LVM2's own configuration, as far as devpool follows it: `lvm.conf`
//! and `lvmlocal.conf` (the latter wins) under `$LVM_SYSTEM_DIR` (default
//! `/etc/lvm`). This host's system ID comes from `global/system_id_source`:
//! `local/system_id`, the host name, `/etc/machine-id` or
//! `global/system_id_file`; `devices/use_devicesfile` says whether LVM2
//! sees only the devices its devices file lists.

use devpool_format::config::{Section, Value, parse};
use std::path::{Path, PathBuf};

/// This host's LVM2 system ID, if LVM2's configuration gives it one.
pub fn local_system_id() -> Option<String> {
    let c = lvm_config();
    let id = match c.source.as_deref().unwrap_or("none") {
        "lvmlocal" => c.local_id,
        "uname" => Some(crate::engine::hostname()).filter(|h| !h.starts_with("localhost")),
        "machineid" => first_line(Path::new("/etc/machine-id")),
        "file" => c.id_file.and_then(|f| first_line(Path::new(&f))),
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
    /// `devices/issue_discards`.
    issue_discards: Option<i64>,
}

/// Whether LVM2 here discards the extents an LV gives up
/// (`devices/issue_discards = 1`; LVM2's default is 0).
pub fn issue_discards() -> bool {
    lvm_config().issue_discards == Some(1)
}

/// LVM2's devices file, when LVM2 here uses one (`devices/use_devicesfile
/// = 1` and the file exists; without the file LVM2 uses every device):
/// LVM2 then sees a new PV only once the file lists it
/// ([`crate::devicesfile`]).
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
        issue_discards: match value("devices", "issue_discards") {
            Some(Value::Int(i)) => Some(i),
            _ => None,
        },
    }
}

fn first_line(path: &Path) -> Option<String> {
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

    #[test]
    fn settings_come_from_lvm_conf_with_lvmlocal_conf_winning() {
        let dir = std::env::temp_dir().join(format!("devpool-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (conf, local) = (dir.join("lvm.conf"), dir.join("lvmlocal.conf"));
        std::fs::write(
            &conf,
            "# comment\ndevices {\n\tuse_devicesfile = 1\n\tissue_discards = 1\n}\nglobal {\n\tsystem_id_source = \"uname\"\n}\n",
        )
        .unwrap();
        std::fs::write(
            &local,
            "global { system_id_source = \"lvmlocal\" }\nlocal { system_id = \"h1\" }\n",
        )
        .unwrap();
        let c = config_of(&[conf.clone(), local]);
        assert_eq!(c.use_devices_file, Some(1));
        assert_eq!(c.issue_discards, Some(1));
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
