//! Names in the tree: ClientIDs, file names, archive timestamps.

use crate::error::{Error, Kind, Result};

/// A ClientID that satisfies Acra's rule: 5 to 256 characters of `[A-Za-z0-9_ -]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// Parse, refusing anything outside the rule.
    pub fn parse(s: &[u8]) -> Result<Self> {
        let ok_chars = s
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b' ' || *c == b'-');
        if !(5..=256).contains(&s.len()) || !ok_chars {
            return Err(Error::new(
                Kind::Invalid,
                format!(
                    "invalid ClientID {:?}: a ClientID is 5 to 256 characters of letters, digits, '_', '-' and space",
                    String::from_utf8_lossy(s)
                ),
            ));
        }
        Ok(ClientId(
            String::from_utf8(s.to_vec()).expect("ASCII checked"),
        ))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Validate one path component: not empty, not `.`/`..`, no `/` or NUL, at most 255 bytes.
pub fn validate_component(name: &[u8]) -> Result<()> {
    if name.len() > 255 {
        return Err(Error::new(
            Kind::NameTooLong,
            format!(
                "name of {} bytes is longer than 255 bytes; choose a shorter name",
                name.len()
            ),
        ));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::new(
            Kind::Invalid,
            format!(
                "invalid name {:?}: names may not be empty, '.', '..', or contain '/' or NUL",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    Ok(())
}

/// Suffix of history directories.
pub const OLD_SUFFIX: &[u8] = b".old";

/// If `name` is `<key>.old`, the key's name.
pub fn history_of(name: &[u8]) -> Option<&[u8]> {
    if name.len() > OLD_SUFFIX.len() && name.ends_with(OLD_SUFFIX) {
        Some(&name[..name.len() - OLD_SUFFIX.len()])
    } else {
        None
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format nanoseconds since the epoch as RFC 3339 UTC with nine fractional digits.
pub fn format_ts(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86400));
    let sod = secs.rem_euclid(86400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{frac:09}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Parse the exact form [`format_ts`] writes (the name of an archived version).
pub fn parse_ts(s: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?;
    let b = s.as_bytes();
    if b.len() != 30
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[29] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &s[r];
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se, f) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..29)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if civil_from_days(days) != (y, mo, d) {
        return None; // e.g. February 30
    }
    // Instants outside the i64 nanosecond range (before 1677, after 2262) are not names.
    let ns = (days * 86400 + h * 3600 + mi * 60 + se) as i128 * 1_000_000_000 + f as i128;
    i64::try_from(ns).ok()
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(ClientId::parse(b"alice").is_ok());
        assert!(ClientId::parse(b"a b-c_9").is_ok());
        assert!(ClientId::parse(&[b'x'; 256]).is_ok());
        for bad in [
            &b"abcd"[..],
            b"alice/x",
            b"al.ice",
            b"",
            &[b'x'; 257],
            "émile".as_bytes(),
        ] {
            let e = ClientId::parse(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::Invalid);
            assert!(e.message().contains("5 to 256"));
        }
    }

    #[test]
    fn components() {
        assert!(validate_component(b"ok").is_ok());
        assert_eq!(
            validate_component(&[b'a'; 256]).unwrap_err().kind(),
            Kind::NameTooLong
        );
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(validate_component(bad).unwrap_err().kind(), Kind::Invalid);
        }
        assert_eq!(history_of(b"storage.old"), Some(&b"storage"[..]));
        assert_eq!(history_of(b".old"), None);
        assert_eq!(history_of(b"storage"), None);
    }

    #[test]
    fn timestamps() {
        let s = "2026-11-28T21:40:05.123456789Z";
        let ns = parse_ts(s.as_bytes()).unwrap();
        assert_eq!(format_ts(ns), s);
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            parse_ts(b"2024-02-29T00:00:00.000000000Z")
                .map(format_ts)
                .unwrap(),
            "2024-02-29T00:00:00.000000000Z"
        );
        for bad in [
            "2026-02-30T00:00:00.000000000Z",
            "2026-11-28T21:40:05Z",
            "2026-11-28T24:00:00.000000000Z",
            "2026-11-28 21:40:05.123456789Z",
            "x",
        ] {
            assert!(parse_ts(bad.as_bytes()).is_none(), "{bad}");
        }
        let now = now_ns();
        assert_eq!(parse_ts(format_ts(now).as_bytes()), Some(now));
    }
}
