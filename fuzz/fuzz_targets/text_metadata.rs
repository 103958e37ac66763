//! The text metadata parser and VG model: never panic; whatever parses must
//! print and parse back to the same tree and the same VG.
#![no_main]
use devpool_format::config;
use devpool_format::metadata::VgMetadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = config::parse(data) {
        let text = config::print(&tree);
        let back = config::parse(text.as_bytes()).expect("printed text parses");
        assert_eq!(back, tree, "print/parse round trip");
        if let Ok(vg) = VgMetadata::from_config(&tree) {
            let again = VgMetadata::parse(&vg.to_disk_text()).expect("written VG parses");
            assert_eq!(again, vg, "VG round trip");
        }
    }
});
