//! Leases live in LV tags, written in the same commit that creates the
//! volumes, so a crash can never leave a volume without its owner record:
//! `devpool.lease=SESSION`, `devpool.role=ROLE`, `devpool.pid=PID`,
//! `devpool.start=TICKS`, `devpool.boot=BOOT_ID`, `devpool.host=HOST` and,
//! for kept leases, `devpool.kept`.

use crate::owner::{Liveness, Owner};
use devpool_format::metadata::{LvMeta, VgMetadata};
use serde::Serialize;

const LEASE: &str = "devpool.lease=";
const ROLE: &str = "devpool.role=";
const PID: &str = "devpool.pid=";
const START: &str = "devpool.start=";
const BOOT: &str = "devpool.boot=";
const HOST: &str = "devpool.host=";
pub const KEPT: &str = "devpool.kept";

use crate::owner::tag_safe;

/// The tags of one leased volume.
pub fn tags(session: &str, role: &str, owner: &Owner, kept: bool) -> Vec<String> {
    let mut t = vec![
        format!("{LEASE}{session}"),
        format!("{ROLE}{role}"),
        format!("{PID}{}", owner.pid),
        format!("{START}{}", owner.start_ticks),
        format!("{BOOT}{}", tag_safe(&owner.boot_id)),
        format!("{HOST}{}", tag_safe(&owner.host)),
    ];
    if kept {
        t.push(KEPT.to_string());
    }
    t
}

#[derive(Debug, Clone, Serialize)]
pub struct LeasedVolume {
    pub lv: String,
    pub role: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub session: String,
    /// None when the owner tags are missing or unreadable (treated as dead).
    pub owner: Option<Owner>,
    pub kept: bool,
    pub liveness: Liveness,
    pub volumes: Vec<LeasedVolume>,
}

fn tag_value<'a>(lv: &'a LvMeta, prefix: &str) -> Option<&'a str> {
    lv.tags.iter().find_map(|t| t.strip_prefix(prefix))
}

fn owner_of(lv: &LvMeta) -> Option<Owner> {
    Some(Owner {
        pid: tag_value(lv, PID)?.parse().ok()?,
        start_ticks: tag_value(lv, START)?.parse().ok()?,
        boot_id: tag_value(lv, BOOT)?.to_string(),
        host: tag_value(lv, HOST)?.to_string(),
    })
}

/// The session an LV belongs to, if it is a leased volume.
pub fn session_of(lv: &LvMeta) -> Option<&str> {
    tag_value(lv, LEASE)
}

/// Every lease in a pool's VG, in LV order, with its owner's liveness.
pub fn leases(vg: &VgMetadata) -> Vec<Lease> {
    let mut out: Vec<Lease> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let (host, boot) = (devpool_engine::engine::hostname(), crate::owner::boot_id());
    for lv in &vg.lvs {
        let Some(session) = session_of(lv) else {
            continue;
        };
        let i = *index.entry(session.to_string()).or_insert_with(|| {
            let owner = owner_of(lv);
            let liveness = match &owner {
                Some(o) => o.liveness_on(&host, &boot),
                None => Liveness::Dead("owner tags missing or unreadable".into()),
            };
            out.push(Lease {
                session: session.to_string(),
                owner,
                kept: false,
                liveness,
                volumes: vec![],
            });
            out.len() - 1
        });
        let lease = &mut out[i];
        lease.kept |= lv.tags.iter().any(|t| t == KEPT);
        lease.volumes.push(LeasedVolume {
            lv: lv.name.clone(),
            role: tag_value(lv, ROLE).unwrap_or("").to_string(),
            size_bytes: lv.extent_count() * vg.extent_size.bytes().0,
        });
    }
    out
}

/// How many leases a VG holds (without asking whether their owners live).
pub fn count(vg: &VgMetadata) -> usize {
    vg.lvs
        .iter()
        .filter_map(session_of)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// A new session id: UTC `YYYYmmddHHMMSS-xxxxxx` (6 random hex digits).
pub fn new_session_id(unix_secs: u64, random: u32) -> String {
    format!("{}-{:06x}", utc_stamp(unix_secs), random & 0xff_ffff)
}

/// `YYYYmmddHHMMSS` in UTC (civil-from-days, valid for any u64 seconds that
/// fit a 4-digit year).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101000000");
        assert_eq!(utc_stamp(951_782_400), "20000229000000");
        assert_eq!(utc_stamp(1_795_240_893), "20261121060133");
        assert_eq!(new_session_id(0, 0xabcdef12), "19700101000000-cdef12");
    }

    proptest! {
        #[test]
        fn stamps_agree_with_humantime(secs in 0u64..253_402_300_799) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let h = humantime::format_rfc3339_seconds(t).to_string();
            let digits: String = h.chars().filter(|c| c.is_ascii_digit()).collect();
            prop_assert_eq!(utc_stamp(secs), digits);
        }
    }

    #[test]
    fn tags_are_valid_lvm2_tags_and_read_back() {
        let o = Owner {
            pid: 42,
            start_ticks: 7,
            boot_id: "b00t-id".into(),
            host: "my host".into(),
        };
        for t in tags("s1", "test", &o, true) {
            devpool_format::names::validate_tag(&t).unwrap();
        }
    }
}
