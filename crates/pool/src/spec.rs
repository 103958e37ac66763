//! What a lease asks for: `--volumes test:10G,scratch:10G` or a profile
//! (`fstests`: test, pool1..pool5, logwrites), and the fstests variables
//! derived from the roles.

use crate::{PoolError, Result};
use devpool_format::units::{Amount, SizeArg};

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSpec {
    pub role: String,
    pub size: SizeArg,
}

pub const FSTESTS_ROLES: &[&str] = &[
    "test",
    "pool1",
    "pool2",
    "pool3",
    "pool4",
    "pool5",
    "logwrites",
];
/// Default size of each fstests volume (7 of them fit the 64 GiB default pool).
pub const FSTESTS_DEFAULT_SIZE: &str = "8G";

/// Roles name LVs and environment variables: lower-case letters, digits, `_`.
pub fn validate_role(role: &str) -> Result<()> {
    if role.is_empty()
        || role.len() > 32
        || !role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(PoolError::Invalid(format!(
            "role '{role}': use 1 to 32 lower-case letters, digits or '_'"
        )));
    }
    Ok(())
}

fn parse_size(role: &str, s: &str) -> Result<SizeArg> {
    let size =
        SizeArg::parse(s).map_err(|e| PoolError::Invalid(format!("size of role '{role}': {e}")))?;
    if size.sign.is_some() || !matches!(size.amount, Amount::Bytes(_)) {
        return Err(PoolError::Invalid(format!(
            "size of role '{role}': '{s}' is relative; give a size in bytes with a unit, such as 10G"
        )));
    }
    Ok(size)
}

/// `role:size,role:size,…`.
pub fn parse_volumes(s: &str) -> Result<Vec<VolumeSpec>> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (role, size) = part.split_once(':').ok_or_else(|| {
            PoolError::Invalid(format!(
                "--volumes: '{part}' is not ROLE:SIZE (for example test:10G)"
            ))
        })?;
        validate_role(role)?;
        if out.iter().any(|v| v.role == role) {
            return Err(PoolError::Invalid(format!(
                "--volumes: role '{role}' given twice"
            )));
        }
        out.push(VolumeSpec {
            role: role.to_string(),
            size: parse_size(role, size)?,
        });
    }
    if out.is_empty() {
        return Err(PoolError::Invalid("--volumes: no volumes given".into()));
    }
    check_fstests_roles(&out)?;
    Ok(out)
}

/// A named profile; `size` overrides every volume's size.
pub fn profile(name: &str, size: Option<&str>) -> Result<Vec<VolumeSpec>> {
    match name {
        "fstests" => FSTESTS_ROLES
            .iter()
            .map(|r| {
                Ok(VolumeSpec {
                    role: r.to_string(),
                    size: parse_size(r, size.unwrap_or(FSTESTS_DEFAULT_SIZE))?,
                })
            })
            .collect(),
        other => Err(PoolError::Invalid(format!(
            "unknown profile '{other}' (known: fstests)"
        ))),
    }
}

/// fstests refuses `SCRATCH_DEV` together with `SCRATCH_DEV_POOL`.
fn check_fstests_roles(v: &[VolumeSpec]) -> Result<()> {
    let scratch = v.iter().any(|s| s.role == "scratch");
    let pool = v.iter().any(|s| is_pool_role(&s.role));
    if scratch && pool {
        return Err(PoolError::Invalid(
            "roles 'scratch' and 'poolN' together: fstests refuses SCRATCH_DEV with SCRATCH_DEV_POOL; use one or the other".into(),
        ));
    }
    Ok(())
}

fn is_pool_role(r: &str) -> bool {
    r.strip_prefix("pool")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Environment for a test run: `TEST_DEV`, `SCRATCH_DEV` or
/// `SCRATCH_DEV_POOL` (never both), `LOGWRITES_DEV`, and `DEVPOOL_<ROLE>`.
pub fn environment(devices: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let mut pool: Vec<(u32, &str)> = Vec::new();
    for (role, dev) in devices {
        env.push((
            format!("DEVPOOL_{}", role.to_ascii_uppercase()),
            dev.clone(),
        ));
        match role.as_str() {
            "test" => env.push(("TEST_DEV".into(), dev.clone())),
            "scratch" => env.push(("SCRATCH_DEV".into(), dev.clone())),
            "logwrites" => env.push(("LOGWRITES_DEV".into(), dev.clone())),
            r if is_pool_role(r) => pool.push((r[4..].parse().unwrap_or(u32::MAX), dev)),
            _ => {}
        }
    }
    if !pool.is_empty() {
        pool.sort();
        let list: Vec<&str> = pool.iter().map(|(_, d)| *d).collect();
        env.push(("SCRATCH_DEV_POOL".into(), list.join(" ")));
    }
    env
}

/// An fstests `local.config` for a lease's devices.
pub fn fstests_config(devices: &[(String, String)], mounts: &str) -> String {
    let mut s = String::from("# Written by devpool for one lease.\n");
    for (k, v) in environment(devices) {
        if k.starts_with("DEVPOOL_") {
            continue;
        }
        s.push_str(&format!("export {k}=\"{v}\"\n"));
    }
    s.push_str(&format!("export TEST_DIR=\"{mounts}/test\"\n"));
    s.push_str(&format!("export SCRATCH_MNT=\"{mounts}/scratch\"\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse_and_refuse_bad_input() {
        let v = parse_volumes("test:10G, scratch:512M").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].role, "scratch");
        for (bad, why) in [
            ("test", "ROLE:SIZE"),
            ("test:10", "size of role 'test'"),
            ("Test:1G", "lower-case"),
            ("test:1G,test:2G", "twice"),
            ("scratch:1G,pool1:1G", "SCRATCH_DEV_POOL"),
            ("test:+1G", "relative"),
            ("", "no volumes"),
        ] {
            let e = parse_volumes(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn fstests_environment_uses_pool_or_scratch_never_both() {
        let devs: Vec<(String, String)> = ["test", "pool2", "pool1", "logwrites"]
            .iter()
            .enumerate()
            .map(|(i, r)| (r.to_string(), format!("/dev/loop{i}")))
            .collect();
        let env = environment(&devs);
        let get = |k: &str| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TEST_DEV"), Some("/dev/loop0"));
        assert_eq!(get("SCRATCH_DEV_POOL"), Some("/dev/loop2 /dev/loop1"));
        assert_eq!(get("SCRATCH_DEV"), None);
        assert_eq!(get("LOGWRITES_DEV"), Some("/dev/loop3"));
        assert_eq!(get("DEVPOOL_POOL2"), Some("/dev/loop1"));
        assert_eq!(profile("fstests", None).unwrap().len(), 7);
    }
}
