//! `devpool snapshot create|list|delete|merge`: snapshots of pool volumes.

use crate::args::{Global, SnapshotCmd};
use crate::parse_bytes;
use crate::pool_cmds::{ask_to_confirm, confirmed, human_size, json, pool_name, pools};
use anyhow::{Result, anyhow, bail};
use devpool_format::units::SizeArg;
use devpool_pool::snapshots::SnapshotStatus;
use std::io::IsTerminal;

/// One line about a snapshot, for `snapshot list` and `pool status`.
pub fn describe_thin(t: &devpool_pool::pool::ThinSnapshotStatus) -> String {
    format!(
        "thin snapshot {} of {}{}",
        t.name,
        t.origin,
        t.lease
            .as_ref()
            .map_or(String::new(), |l| format!(" (lease {l})"))
    )
}

pub fn describe(s: &SnapshotStatus) -> String {
    let owner = s
        .lease
        .as_ref()
        .map_or("not leased".to_string(), |l| format!("lease {l}"));
    let usage = match (&s.usage, &s.error) {
        (Some(u), _) if !u.valid => "INVALID (its COW store filled up)".to_string(),
        (Some(u), _) => format!(
            "{} of {} chunks used ({}%), chunk {}K",
            u.used_chunks,
            u.capacity_chunks,
            (u.used_chunks * 100)
                .checked_div(u.capacity_chunks)
                .unwrap_or(0),
            u.chunk_bytes / 1024
        ),
        (None, Some(e)) => format!("unreadable: {e}"),
        (None, None) => "unknown".into(),
    };
    format!(
        "snapshot {} of {} ({}, store {}): {usage}",
        s.name,
        s.origin,
        owner,
        human_size(s.size_bytes)
    )
}

pub fn snapshot(g: &Global, cmd: SnapshotCmd) -> Result<()> {
    let name = pool_name(g);
    let p = pools(g)?;
    match cmd {
        SnapshotCmd::Create {
            volume,
            name: snap,
            size,
            chunk_size,
        } => {
            let size = size
                .map(|s| SizeArg::parse(&s).map_err(|e| anyhow!("--size: {e}")))
                .transpose()?;
            if size.as_ref().is_some_and(|s| s.sign.is_some()) {
                bail!("--size: a snapshot takes an absolute size, not a +/- change");
            }
            let chunk = parse_bytes("--chunk-size", &chunk_size)?;
            if p.is_thin_volume(&name, &volume)? {
                if size.is_some() {
                    bail!("--size: a thin snapshot shares the thin pool's space; it takes no size");
                }
                let c = p.thin_snapshot_create(&name, &volume, &snap)?;
                if g.json {
                    return json(&c);
                }
                println!(
                    "thin snapshot {} of {} ({} virtual, blocks shared){}",
                    c.name,
                    c.origin,
                    crate::pool_cmds::human_size(c.virtual_bytes),
                    c.lease
                        .as_ref()
                        .map_or(String::new(), |l| format!(", owned by lease {l}"))
                );
                return Ok(());
            }
            let c = p.snapshot_create(&name, &volume, &snap, size, chunk)?;
            if g.json {
                return json(&c);
            }
            for d in &c.detached {
                println!(
                    "detached {} (a plain loop device would bypass copy-on-write)",
                    d.display()
                );
            }
            println!(
                "snapshot {} of {}: store {} ({} bytes), chunk {}K{}",
                c.name,
                c.origin,
                human_size(c.size_bytes),
                c.size_bytes,
                c.chunk_bytes / 1024,
                c.lease
                    .as_ref()
                    .map_or(String::new(), |l| format!(", owned by lease {l}"))
            );
            println!(
                "serve the volume with copy-on-write: devpool serve {} --block-device (or --nbd, --vhost-user-blk)",
                c.origin
            );
        }
        SnapshotCmd::List => {
            let list = p.snapshots(&name)?;
            if g.json {
                return json(&list);
            }
            let thin = p.thin_snapshots(&name)?;
            if list.is_empty() && thin.is_empty() {
                println!("no snapshots in pool '{name}'");
            }
            for s in &list {
                println!("{}", describe(s));
            }
            for t in &thin {
                println!("{}", describe_thin(t));
            }
        }
        SnapshotCmd::Delete { name: snap } => {
            if p.is_thin_volume(&name, &snap)? {
                let d = p.thin_snapshot_delete(&name, &snap)?;
                if g.json {
                    return json(&d);
                }
                println!("deleted thin snapshot {} of {}", d.name, d.origin);
                return Ok(());
            }
            let d = p.snapshot_delete(&name, &snap)?;
            if g.json {
                return json(&d);
            }
            println!("deleted snapshot {} of {}", d.name, d.origin);
            if let Some(dev) = &d.reattached {
                println!("{} has no snapshots left: {}", d.origin, dev.display());
            }
        }
        SnapshotCmd::Merge { name: snap } if p.is_thin_volume(&name, &snap)? => {
            let r = confirmed(g, |ok| p.thin_snapshot_merge(&name, &snap, ok))?;
            if g.json {
                return json(&r);
            }
            println!(
                "merged thin snapshot {} into {} (device {} -> {})",
                r.name, r.origin, r.old_device_id, r.device_id
            );
        }
        SnapshotCmd::Merge { name: snap } => {
            let s = p
                .snapshots(&name)?
                .into_iter()
                .find(|s| s.name == snap || s.snapshot_lv == snap)
                .ok_or_else(|| anyhow!("no snapshot '{snap}' in pool '{name}'"))?;
            let (what, reasons) = s.merge_plan();
            ask_to_confirm(g, &what, &reasons)?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("merging {bar:40} {pos}/{len} chunks")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            if g.json || !std::io::stderr().is_terminal() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let r = devpool_serve::merge::merge(&p, &name, &snap, &progress)?;
            bar.finish_and_clear();
            if g.json {
                return json(&r);
            }
            println!(
                "merged {} chunk(s) of {} into {}; snapshot deleted",
                r.chunks, r.name, r.origin
            );
            if let Some(dev) = &r.deleted.reattached {
                println!("{} has no snapshots left: {}", r.origin, dev.display());
            }
        }
    }
    Ok(())
}
