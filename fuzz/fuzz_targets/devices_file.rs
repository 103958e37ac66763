//! LVM2's devices file reader: never panics; what parses renders to text
//! that parses to the same entries (and the next version number).
#![no_main]
use devpool_format::devices_file::DevicesFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = DevicesFile::parse(text) {
        let again = DevicesFile::parse(&f.render("fuzz")).expect("re-parse");
        assert_eq!(again.entries, f.entries);
        assert_eq!(again.system_id, f.system_id);
        let next = f.version.map_or(0, |v| v.2).saturating_add(1);
        assert_eq!(again.version.map(|v| v.2), Some(next));
    }
});
