//! Time the phases of reading VG metadata text: `parse_timing FILE`.
use devpool_format::config;
use devpool_format::metadata::VgMetadata;
use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |p| p * 4)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: parse_timing FILE")?;
    let text = std::fs::read(path)?;
    println!("text {} bytes, rss {} KiB", text.len(), rss_kib());
    let t = Instant::now();
    let tree = config::parse(&text)?;
    println!("config::parse {:?}, rss {} KiB", t.elapsed(), rss_kib());
    drop(tree);
    let t = Instant::now();
    let vg = VgMetadata::parse(&text)?;
    println!("VgMetadata::parse {:?}, rss {} KiB", t.elapsed(), rss_kib());
    let t = Instant::now();
    let out = vg.to_disk_text();
    println!("to_disk_text {:?} ({} bytes)", t.elapsed(), out.len());
    let t = Instant::now();
    let crc = devpool_format::crc::lvm_crc(&out);
    println!("crc {:?} ({crc:08x})", t.elapsed());
    Ok(())
}
