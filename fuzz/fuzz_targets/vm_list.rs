//! The parsers of what vm-bhyve prints and keeps on disk, which flotilla reads on every
//! listing: `vm list` and `vm datastore list` output, and rc-style configuration files
//! (a guest's `.conf`, rc.conf) with vm-bhyve's reading rules and `sysrc`'s editing rules.
//! None may panic, whatever a guest's owner put in its files.
#![no_main]

use flotilla::backend::vm_bhyve::{parse_datastores, parse_list};
use flotilla::conf::{self, Conf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_list("vm list", &text);
    let _ = parse_datastores("vm datastore list", &text);

    let parsed = Conf::parse_bytes(data);
    let _ = parsed.to_map();
    let _ = parsed.duplicates();
    let _ = parsed.yes("loader");

    // Every key the file assigns, plus the ones flotilla reads and writes.
    let mut keys: Vec<&str> = parsed.entries().iter().map(|(k, _)| k.as_str()).collect();
    keys.extend(["vm_list", "vm_dir", "memory", "cpu", "disk0_size"]);
    keys.truncate(16);
    for key in keys {
        let _ = conf::shell_get(&text, key);
        let _ = conf::sysrc_delete(&text, key);
        if let Ok(edited) = conf::sysrc_set(&text, key, "fuzzed value") {
            // sysrc writes the last assignment, which is what sh reads back.
            if conf::is_var_name(key) {
                let _ = conf::shell_get(&edited, key);
            }
        }
        if let Some(value) = parsed.get(key) {
            let _ = conf::words_add(value, "fuzz");
            let _ = conf::words_remove(value, "fuzz");
        }
    }
});
