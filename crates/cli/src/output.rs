//! Tables and JSON for people and scripts.

use crate::args::Global;
use anyhow::{Context, Result};
use devpool_engine::engine::Scan;
use devpool_engine::plan::Plan;
use devpool_engine::{Executed, report};
use devpool_format::units::{Bytes, format_bytes};
use serde_json::json;

fn human(b: u64) -> String {
    format_bytes(Bytes(b))
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A plain left-aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn problems(scan: &Scan) {
    for p in scan.unreadable.iter().chain(&scan.assembly.problems) {
        eprintln!("devpool: warning: {p}");
    }
}

pub fn pvs(g: &Global, scan: &Scan) -> Result<()> {
    let rows = report::pv_rows(scan);
    if g.json {
        return print_json(
            &json!({ "pvs": rows, "problems": scan.assembly.problems, "unreadable": scan.unreadable }),
        );
    }
    problems(scan);
    table(
        &[
            "PV", "VG", "SIZE", "FREE", "PE", "ALLOC", "MDAS", "MDA SIZE",
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.pv_name.clone(),
                    r.vg_name.clone(),
                    human(r.pv_size),
                    human(r.pv_free),
                    r.pv_pe_count.to_string(),
                    r.pv_pe_alloc_count.to_string(),
                    r.pv_mda_count.to_string(),
                    human(r.pv_mda_size),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn vgs(g: &Global, scan: &Scan, only: Option<&str>) -> Result<()> {
    if let Some(n) = only {
        scan.vg(n)?;
    }
    let rows: Vec<report::VgRow> = scan
        .assembly
        .vgs
        .iter()
        .filter(|v| only.is_none_or(|n| v.meta.name == n))
        .map(report::vg_row)
        .collect();
    if g.json {
        return print_json(
            &json!({ "vgs": rows, "problems": scan.assembly.problems, "unreadable": scan.unreadable }),
        );
    }
    problems(scan);
    table(
        &[
            "VG", "PVS", "LVS", "SIZE", "FREE", "EXTENT", "SEQNO", "HEALTH",
        ],
        rows.iter()
            .map(|r| {
                let health = if r.missing_pvs.is_empty() && r.disagreeing.is_empty() {
                    "ok".to_string()
                } else {
                    format!(
                        "{} missing PV(s), {} disagreeing metadata area(s)",
                        r.missing_pvs.len(),
                        r.disagreeing.len()
                    )
                };
                vec![
                    r.vg_name.clone(),
                    r.pv_count.to_string(),
                    r.lv_count.to_string(),
                    human(r.vg_size),
                    human(r.vg_free),
                    human(r.vg_extent_size),
                    r.vg_seqno.to_string(),
                    health,
                ]
            })
            .collect(),
    );
    for r in &rows {
        for m in &r.missing_pvs {
            eprintln!("devpool: warning: VG {}: missing PV {m}", r.vg_name);
        }
        for d in &r.disagreeing {
            eprintln!("devpool: warning: VG {}: {d}", r.vg_name);
        }
    }
    Ok(())
}

pub fn lvs(g: &Global, scan: &Scan, only: Option<&str>, segments: bool) -> Result<()> {
    let vgs: Vec<_> = scan
        .assembly
        .vgs
        .iter()
        .filter(|v| only.is_none_or(|n| v.meta.name == n))
        .collect();
    // Active as LVM2 counts it: a device-mapper device with the LV's uuid.
    let dm: Vec<String> = devpool_pool::dmdev::list()
        .into_iter()
        .map(|d| d.uuid)
        .collect();
    let mut rows: Vec<report::LvRow> = Vec::new();
    for v in vgs {
        for mut r in report::lv_rows(v) {
            let uuid = v.meta.lv(&r.lv_name).map(|l| l.id.raw_str().to_string());
            if uuid.is_some_and(|u| dm.contains(&devpool_format::dm::uuid(v.meta.id.raw_str(), &u)))
            {
                r.lv_active = "active".into();
            }
            rows.push(r);
        }
    }
    if g.json {
        return print_json(&json!({ "lvs": rows, "problems": scan.assembly.problems }));
    }
    problems(scan);
    if segments {
        let mut out = Vec::new();
        for r in &rows {
            for s in &r.segments {
                let areas: Vec<String> = s
                    .areas
                    .iter()
                    .map(|a| {
                        format!(
                            "{}:{}-{}",
                            a.pv_name,
                            a.pv_start_pe,
                            a.pv_start_pe + a.pv_pe_count - 1
                        )
                    })
                    .collect();
                out.push(vec![
                    format!("{}/{}", r.vg_name, r.lv_name),
                    s.segtype.clone(),
                    s.seg_start_pe.to_string(),
                    s.seg_size_pe.to_string(),
                    human(s.seg_size),
                    areas.join(" "),
                ]);
            }
        }
        table(
            &["LV", "TYPE", "START", "EXTENTS", "SIZE", "PV EXTENTS"],
            out,
        );
        return Ok(());
    }
    table(
        &["LV", "SIZE", "TYPE", "SEGS", "ACTIVE", "TAGS"],
        rows.iter()
            .map(|r| {
                let name = if r.hidden {
                    format!("[{}/{}]", r.vg_name, r.lv_name)
                } else {
                    format!("{}/{}", r.vg_name, r.lv_name)
                };
                let ty = r
                    .segments
                    .first()
                    .map(|s| s.segtype.clone())
                    .unwrap_or_default();
                vec![
                    name,
                    human(r.lv_size),
                    ty,
                    r.segments.len().to_string(),
                    if r.lv_active.is_empty() { "-" } else { "yes" }.into(),
                    r.lv_tags.join(","),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn plan(g: &Global, plan: &Plan, dry_run: bool) -> Result<()> {
    if g.json {
        let mut v = serde_json::to_value(plan)?;
        v["metadata_diff"] = json!(plan.metadata_diff());
        v["dry_run"] = json!(dry_run);
        return print_json(&v);
    }
    let text = plan.render();
    if dry_run {
        print!("{text}");
        println!("(dry run: nothing was changed)");
    } else {
        eprint!("{text}");
    }
    Ok(())
}

pub fn executed(g: &Global, plan: &Plan, done: &Executed) -> Result<()> {
    if g.json {
        return print_json(&json!({ "executed": done, "plan": plan }));
    }
    for n in &plan.notes {
        println!("note: {n}");
    }
    match (plan.seqno_before, done.seqno_after) {
        (Some(b), Some(a)) => println!(
            "{}: done (seqno {b} -> {a}, transaction {})",
            done.operation, done.transaction
        ),
        _ => println!(
            "{}: done (transaction {})",
            done.operation, done.transaction
        ),
    }
    Ok(())
}

pub fn journal(g: &Global, last: usize) -> Result<()> {
    let path = g.state_dir.join("journal.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(last)..];
    let entries: Vec<serde_json::Value> = tail
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if g.json {
        return print_json(&json!({ "journal": entries }));
    }
    for e in entries {
        println!(
            "{}  {}  {}  seqno {} -> {}  {}",
            e["finished"].as_str().unwrap_or("?"),
            e["transaction"].as_str().unwrap_or("?"),
            e["operation"].as_str().unwrap_or("?"),
            e["seqno_before"],
            e["seqno_after"],
            e["outcome"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
