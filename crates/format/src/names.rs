//! LVM2's naming rules for VGs, LVs and tags.

use thiserror::Error;

/// LVM2's NAME_LEN is 128 including the terminating NUL.
pub const MAX_NAME_LEN: usize = 127;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {kind} name '{name}': {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

fn check_common(kind: &'static str, name: &str) -> Result<(), NameError> {
    let err = |r: String| NameError {
        kind,
        name: name.to_string(),
        reason: r,
    };
    if name.is_empty() {
        return Err(err("name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(err(format!("longer than {MAX_NAME_LEN} characters")));
    }
    if name == "." || name == ".." {
        return Err(err("'.' and '..' are reserved".into()));
    }
    if name.starts_with('-') {
        return Err(err("must not start with '-'".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Err(err(format!(
            "character '{c}' is not allowed (only a-z A-Z 0-9 + _ . -)"
        )));
    }
    Ok(())
}

/// A VG name as LVM2 accepts it.
pub fn validate_vg_name(name: &str) -> Result<(), NameError> {
    check_common("VG", name)?;
    if name == "lvm" || name == "mapper" {
        return Err(NameError {
            kind: "VG",
            name: name.into(),
            reason: "reserved by LVM2/device-mapper under /dev".into(),
        });
    }
    Ok(())
}

/// Suffixes LVM2 reserves for its internal sub-LVs.
const RESERVED_LV_PARTS: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mimage", "_mlog", "_pmspare",
    "_rimage", "_rmeta", "_tdata", "_tmeta", "_vorigin", "_vdata", "_iorig", "_imeta",
];

/// An LV name as LVM2 accepts it for a new, visible LV.
pub fn validate_lv_name(name: &str) -> Result<(), NameError> {
    check_common("LV", name)?;
    let err = |r: String| NameError {
        kind: "LV",
        name: name.to_string(),
        reason: r,
    };
    for prefix in ["snapshot", "pvmove"] {
        if name.starts_with(prefix) {
            return Err(err(format!(
                "names starting with '{prefix}' are reserved by LVM2"
            )));
        }
    }
    if let Some(part) = RESERVED_LV_PARTS.iter().find(|p| name.contains(*p)) {
        return Err(err(format!(
            "'{part}' is reserved by LVM2 for internal volumes"
        )));
    }
    Ok(())
}

/// A tag: up to 1024 characters of a-z A-Z 0-9 _ + . - / = ! : # &
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    let err = |r: String| NameError {
        kind: "tag",
        name: tag.to_string(),
        reason: r,
    };
    if tag.is_empty() {
        return Err(err("tag is empty".into()));
    }
    if tag.len() > 1024 {
        return Err(err("longer than 1024 characters".into()));
    }
    if tag.starts_with('-') {
        return Err(err("must not start with '-'".into()));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_+.-/=!:#&".contains(*c)))
    {
        return Err(err(format!("character '{c}' is not allowed in a tag")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["vg0", "devpool-default", "a.b_c+d", "X"] {
            validate_vg_name(n).unwrap();
            validate_lv_name(n).unwrap();
        }
        validate_tag("devpool_owner:1234").unwrap();
    }

    #[test]
    fn rejects_what_lvm2_forbids() {
        for n in ["", ".", "..", "-x", "a/b", "a b", "ä", &"x".repeat(128)] {
            assert!(validate_vg_name(n).is_err(), "{n}");
            assert!(validate_lv_name(n).is_err(), "{n}");
        }
        for n in ["snapshot1", "pvmove0", "x_tdata", "y_rimage_0", "z_mlog"] {
            let e = validate_lv_name(n).unwrap_err();
            assert!(e.to_string().contains("reserved"), "{e}");
        }
        assert!(validate_vg_name("lvm").is_err());
        assert!(validate_tag("a b").is_err());
    }
}
