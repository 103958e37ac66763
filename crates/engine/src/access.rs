//! Which VGs this host may change, by LVM2's rules: not an exported VG
//! (`vgexport`), not a read-only one (no WRITE in its status), not one
//! that belongs to another host (its `system_id` is not this host's), and
//! not a shared VG (`lock_type`: only lvmlockd's locks make changing it
//! safe) nor an old clustered one (clvmd's `CLUSTERED`). Reading any of
//! them is fine. This host's system ID is `lvmconf::local_system_id`.

use devpool_format::config::Value;
use devpool_format::metadata::VgMetadata;

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
}
