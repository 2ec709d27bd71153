//! Name parsers: ClientId::parse, validate_component, history_of, parse_ts.
//! Invariants: never panic; an accepted ClientID is the input; history_of
//! strips exactly ".old"; parse_ts(s) = Some(ns) implies format_ts(ns) == s.
#![no_main]
use keyfs::inventory::names::{format_ts, history_of, parse_ts, validate_component, ClientId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = ClientId::parse(data) {
        assert_eq!(c.as_str().as_bytes(), data);
    }
    let _ = validate_component(data);
    if let Some(base) = history_of(data) {
        assert!(!base.is_empty());
        assert_eq!([base, &b".old"[..]].concat(), data);
    }
    if let Some(ns) = parse_ts(data) {
        assert_eq!(
            format_ts(ns).as_bytes(),
            data,
            "parse_ts/format_ts disagree (ns = {ns})"
        );
    }
});
