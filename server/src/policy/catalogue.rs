//! What each kind of field may hold: validators that canonicalise values, and the names PCI DSS
//! forbids storing. Which fields exist, their class and mask come from the regulations file.

use crate::VaultError;

/// What kind of data a field holds; decides its validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Name,
    Email,
    Address,
    PostalCode,
    Phone,
    Sex,
    Age,
    FreeText,
    CardNumber,
    IpAddress,
    DomainName,
    Timestamp,
    Url,
    ThaiNationalId,
}

use FieldKind as K;

impl FieldKind {
    const ALL: &[(&str, FieldKind)] = &[
        ("name", K::Name),
        ("email", K::Email),
        ("address", K::Address),
        ("postal_code", K::PostalCode),
        ("phone", K::Phone),
        ("sex", K::Sex),
        ("age", K::Age),
        ("free_text", K::FreeText),
        ("card_number", K::CardNumber),
        ("ip_address", K::IpAddress),
        ("domain", K::DomainName),
        ("timestamp", K::Timestamp),
        ("url", K::Url),
        ("thai_national_id", K::ThaiNationalId),
    ];
    /// The names a regulations file may use for `kind`.
    pub const NAMES: &[&str] = &[
        "name",
        "email",
        "address",
        "postal_code",
        "phone",
        "sex",
        "age",
        "free_text",
        "card_number",
        "ip_address",
        "domain",
        "timestamp",
        "url",
        "thai_national_id",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
    }
}

/// Sensitive authentication data that PCI DSS 3.3.1 forbids storing after authorisation, in any form.
const PROHIBITED: &[&str] = &[
    "cvv",
    "cvv2",
    "cvc",
    "cvc2",
    "cid",
    "cav2",
    "csc",
    "cardverificationcode",
    "cardverificationvalue",
    "cardsecuritycode",
    "securitycode",
    "pin",
    "pinblock",
    "pinnumber",
    "trackdata",
    "track1",
    "track2",
    "track1data",
    "track2data",
    "magneticstripe",
    "magstripe",
    "fulltrack",
];

/// Words that mark a name as sensitive authentication data wherever they stand in it
/// (`card_cvv`, `pinCode`, `track2`, `card-verification`): matched by word, so `shipping` is not a
/// PIN and `attracted` is not track data.
const PROHIBITED_WORDS: &[&str] =
    &["cvv", "cvc", "cvn", "cid", "cav", "csc", "pin", "pinblock", "track", "verification", "magstripe"];

/// The words of a field name: split at anything not a letter or digit and where a lower-case
/// letter meets an upper-case one; lower-cased, trailing digits dropped (`cvv2` is `cvv`).
fn words(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        let boundary = !c.is_ascii_alphanumeric() || (prev_lower && c.is_ascii_uppercase());
        if boundary && !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if c.is_ascii_alphanumeric() {
            word.push(c.to_ascii_lowercase());
        }
        prev_lower = c.is_ascii_lowercase();
    }
    if !word.is_empty() {
        out.push(word);
    }
    out.into_iter().map(|w| w.trim_end_matches(|c: char| c.is_ascii_digit()).to_owned()).collect()
}

fn is_prohibited(name: &str) -> bool {
    let folded: String =
        name.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    PROHIBITED.contains(&folded.as_str())
        || words(name).iter().any(|w| PROHIBITED_WORDS.contains(&w.as_str()))
}

/// Refuses card verification codes, PINs and track data by name, in requests and in regulations.
pub fn check_field_name_allowed(name: &str) -> Result<(), String> {
    if is_prohibited(name) {
        return Err(format!(
            "field '{}' is sensitive authentication data (card verification code, PIN or track data), \
             which PCI DSS 3.3.1 forbids storing",
            printable(name)
        ));
    }
    Ok(())
}

/// A caller's string made safe to echo in an error: bounded and without control characters.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn invalid(field: &str, why: &str) -> VaultError {
    VaultError::InvalidArgument(format!("field '{field}': {why}"))
}

/// Validates and canonicalises a value. The returned string is what gets stored. Errors say what
/// rule failed, never the value.
pub fn validate(n: &str, kind: FieldKind, value: &str) -> Result<String, VaultError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(invalid(n, "value is empty"));
    }
    let multiline = matches!(kind, K::Address | K::FreeText);
    if v.chars().any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\t'))) {
        return Err(invalid(n, "value contains control characters"));
    }
    if matches!(kind, K::Name | K::Address | K::FreeText | K::Email | K::Url | K::DomainName)
        && let Some(what) = card_data_in(v).or_else(|| auth_data_in(v))
    {
        return Err(invalid(n, what));
    }
    match kind {
        K::Name | K::Address | K::FreeText => Ok(v.to_owned()),
        K::CardNumber => {
            let digits = digits_only(v, &[' ', '-'])
                .ok_or_else(|| invalid(n, "a card number has only digits, spaces and dashes"))?;
            if !(13..=19).contains(&digits.len()) {
                return Err(invalid(n, "a card number has 13 to 19 digits"));
            }
            if !luhn_valid(&digits) {
                return Err(invalid(n, "card number fails the Luhn check"));
            }
            Ok(digits)
        }
        K::ThaiNationalId => {
            let digits = digits_only(v, &[' ', '-'])
                .ok_or_else(|| invalid(n, "a Thai national id has only digits and dashes"))?;
            if digits.len() != 13 {
                return Err(invalid(n, "a Thai national id has 13 digits"));
            }
            if !thai_id_valid(&digits) {
                return Err(invalid(n, "Thai national id fails its check digit"));
            }
            Ok(digits)
        }
        K::Email => {
            if is_email(v) {
                Ok(v.to_owned())
            } else {
                Err(invalid(n, "not a well-formed email address (local@domain.tld)"))
            }
        }
        K::Phone => {
            let rest = v.strip_prefix('+').unwrap_or(v);
            let digits = digits_only(rest, &[' ', '-', '(', ')', '.']).ok_or_else(|| {
                invalid(
                    n,
                    "a phone number has only digits, an optional leading +, spaces, dashes and brackets",
                )
            })?;
            if !(9..=15).contains(&digits.len()) {
                return Err(invalid(n, "a phone number has 9 to 15 digits"));
            }
            Ok(if v.starts_with('+') { format!("+{digits}") } else { digits })
        }
        K::PostalCode => {
            if v.len() == 5 && v.bytes().all(|b| b.is_ascii_digit()) {
                Ok(v.to_owned())
            } else {
                Err(invalid(n, "a Thai postal code has 5 digits"))
            }
        }
        K::Sex => {
            let lower = v.to_ascii_lowercase();
            match lower.as_str() {
                "female" | "male" | "other" | "unspecified" => Ok(lower),
                _ => Err(invalid(n, "expected one of female, male, other, unspecified")),
            }
        }
        K::Age => match v.parse::<u8>() {
            Ok(age) if age <= 150 => Ok(age.to_string()),
            _ => Err(invalid(n, "an age is a whole number from 0 to 150")),
        },
        K::IpAddress => v
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.to_string())
            .map_err(|_| invalid(n, "not an IPv4 or IPv6 address")),
        K::DomainName => {
            if is_domain(v) {
                Ok(v.to_ascii_lowercase())
            } else {
                Err(invalid(n, "not a domain name"))
            }
        }
        K::Timestamp => {
            if is_rfc3339(v) {
                Ok(v.to_owned())
            } else {
                Err(invalid(n, "expected an RFC 3339 time such as 2026-11-29T10:15:00+07:00"))
            }
        }
        K::Url => {
            let rest = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://"));
            match rest {
                Some(r) if !r.is_empty() && !r.chars().any(char::is_whitespace) => Ok(v.to_owned()),
                _ => Err(invalid(n, "expected an http(s) URL without spaces")),
            }
        }
    }
}

fn digits_only(v: &str, separators: &[char]) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_ascii_digit() {
            out.push(c);
        } else if !separators.contains(&c) {
            return None;
        }
    }
    Some(out)
}

/// The Luhn (mod 10) check that every payment card number passes.
/// Card data in a value that is not a card field (PCI DSS 3.5.1: a PAN is stored only where it is
/// protected as one; 3.3.1: track data never): a run of 13 to 19 digits (single spaces or dashes
/// between them) that passes the Luhn check, or such a run followed by track data's separators
/// (`=YYMM` of track 2, `^` of track 1) whatever its check digit. Says what, never the value.
pub fn card_data_in(value: &str) -> Option<&'static str> {
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut digits = String::new();
        let mut j = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits.push(char::from(bytes[j]));
                j += 1;
            } else if matches!(bytes[j], b' ' | b'-') && bytes.get(j + 1).is_some_and(u8::is_ascii_digit) {
                j += 1;
            } else {
                break;
            }
        }
        if (13..=19).contains(&digits.len()) {
            let rest = &bytes[j..];
            let track2 =
                rest.first() == Some(&b'=') && rest.len() >= 5 && rest[1..5].iter().all(u8::is_ascii_digit);
            if track2 || rest.first() == Some(&b'^') {
                return Some(
                    "holds what looks like magnetic-stripe track data, which PCI DSS 3.3.1 forbids storing",
                );
            }
            if luhn_valid(&digits) {
                return Some(
                    "holds what looks like a card number (PAN); store card numbers only in card fields (PCI DSS 3.5.1)",
                );
            }
        }
        i = j.max(i + 1);
    }
    None
}

/// Words that name sensitive authentication data (PCI DSS 3.3.1): a card's verification code
/// or a PIN. Followed by what looks like its value, they are refused in any text.
const AUTH_DATA_WORDS: &[(&str, usize)] = &[
    ("cvv2", 3),
    ("cvv", 3),
    ("cvc2", 3),
    ("cvc", 3),
    ("cav2", 3),
    ("cvn", 3),
    ("csc", 3),
    ("cid", 3),
    ("pin", 4),
    ("pincode", 4),
    ("security code", 3),
    ("verification code", 3),
    ("รหัสหลังบัตร", 3),
    ("รหัส pin", 4),
    ("รหัสเอทีเอ็ม", 4),
];

/// The fewest digits any of [`AUTH_DATA_WORDS`] needs (a test holds it equal to theirs).
const AUTH_DATA_MIN_DIGITS: usize = 3;
/// Words that may stand between such a word and its value (`CVV code: 123`, `pin no. 1234`).
const AUTH_DATA_FILLERS: &[&str] = &["is", "no", "number", "code", "คือ"];

/// Sensitive authentication data typed into a text (`pin 1234`, `cvv 123`, `CVV2: 123`): one of
/// [`AUTH_DATA_WORDS`] standing as a word, then (past separators and filler words) a run of
/// digits of at least its length. Says what, never the value.
pub fn auth_data_in(value: &str) -> Option<&'static str> {
    // A finding needs a run of ASCII digits at least as long as the shortest word's: most values
    // (names, addresses) have none, and need no search (measured: the search was 3.9% of a bulk put).
    let longest_run = value
        .bytes()
        .fold((0usize, 0usize), |(best, run), b| {
            let run = if b.is_ascii_digit() { run + 1 } else { 0 };
            (best.max(run), run)
        })
        .0;
    if longest_run < AUTH_DATA_MIN_DIGITS {
        return None;
    }
    let lower = value.to_lowercase();
    for (word, min_digits) in AUTH_DATA_WORDS {
        let mut from = 0;
        while let Some(at) = lower[from..].find(word).map(|i| i + from) {
            from = at + word.len();
            let before = lower[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() && word.is_ascii()) {
                continue;
            }
            let mut rest = &lower[from..];
            if rest.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            loop {
                let trimmed = rest.trim_start_matches([' ', ':', '=', '#', '-', '.', '\t']);
                let filler = AUTH_DATA_FILLERS.iter().find(|f| {
                    trimmed.starts_with(**f)
                        && !trimmed[f.len()..].chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                });
                match filler {
                    Some(f) => rest = &trimmed[f.len()..],
                    None => {
                        rest = trimmed;
                        break;
                    }
                }
            }
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            if digits >= *min_digits && digits <= 12 {
                return Some(
                    "holds what looks like a card verification code or PIN, which PCI DSS 3.3.1 forbids storing",
                );
            }
        }
    }
    None
}

pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// Thai national id: the 13th digit is (11 − Σ dᵢ·(13−i) mod 11) mod 10 over the first 12.
pub fn thai_id_valid(digits: &str) -> bool {
    let d: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
    if d.len() != 13 {
        return false;
    }
    let sum: u32 = d[..12].iter().enumerate().map(|(i, x)| x * (13 - i as u32)).sum();
    (11 - sum % 11) % 10 == d[12]
}

fn is_domain(v: &str) -> bool {
    v.len() <= 253
        && v.contains('.')
        && v.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn is_email(v: &str) -> bool {
    let Some((local, domain)) = v.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && v.len() <= 254
        && !local.contains('@')
        && local.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && is_domain(domain)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with ranges checked.
fn is_rfc3339(v: &str) -> bool {
    let b = v.as_bytes();
    let num = |s: &[u8]| -> Option<u32> {
        if s.iter().all(u8::is_ascii_digit) { std::str::from_utf8(s).ok()?.parse().ok() } else { None }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let (Some(_y), Some(mo), Some(d), Some(h), Some(mi), Some(s)) =
        (num(&b[0..4]), num(&b[5..7]), num(&b[8..10]), num(&b[11..13]), num(&b[14..16]), num(&b[17..19]))
    else {
        return false;
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            matches!((num(&[*h1, *h2]), num(&[*m1, *m2])), (Some(h), Some(m)) if h <= 23 && m <= 59)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digit-run pre-check skips no value a word could match.
    #[test]
    fn the_pre_check_needs_no_more_digits_than_any_word() {
        assert_eq!(AUTH_DATA_WORDS.iter().map(|(_, d)| *d).min(), Some(AUTH_DATA_MIN_DIGITS));
        assert!(auth_data_in("cvv 123").is_some() && auth_data_in("cvv 12").is_none());
        assert!(auth_data_in("บ้านเลขที่ 99/1 หมู่ 4").is_none());
    }

    fn check(name: &str, v: &str) -> Result<String, VaultError> {
        let kind = match name {
            "card_number" => K::CardNumber,
            "national_id" => K::ThaiNationalId,
            "email" => K::Email,
            "phone" => K::Phone,
            "postal_code" => K::PostalCode,
            "age" => K::Age,
            "sex" => K::Sex,
            "ip_address" => K::IpAddress,
            "access_time" => K::Timestamp,
            "referrer" => K::Url,
            "name" => K::Name,
            "home_address" => K::Address,
            _ => unreachable!("{name}"),
        };
        validate(name, kind, v)
    }

    #[test]
    fn card_numbers() {
        assert_eq!(check("card_number", "4111 1111 1111 1111").unwrap(), "4111111111111111");
        assert!(check("card_number", "4111111111111112").is_err());
        assert!(check("card_number", "411111111111").is_err(), "12 digits");
        assert!(check("card_number", "4111x11111111111").is_err());
        let e = check("card_number", "4111111111111112").unwrap_err().to_string();
        assert!(!e.contains("4111"), "error must not echo the value: {e}");
    }

    #[test]
    fn thai_ids() {
        assert!(thai_id_valid("1101700203450"));
        assert_eq!(check("national_id", "1-1017-00203-45-0").unwrap(), "1101700203450");
        assert!(check("national_id", "1101700203451").is_err());
        assert!(check("national_id", "110170020345").is_err());
    }

    #[test]
    fn other_kinds() {
        assert!(check("email", "somchai@example.go.th").is_ok());
        for bad in ["no-at", "a@b", "a@@b.com", "a b@c.com", "@x.com", ".a@x.com"] {
            assert!(check("email", bad).is_err(), "{bad}");
        }
        assert_eq!(check("phone", "+66 81 234 5678").unwrap(), "+66812345678");
        assert!(check("phone", "12345").is_err());
        assert!(check("postal_code", "80000").is_ok());
        assert!(check("postal_code", "8000").is_err());
        assert!(check("age", "151").is_err());
        assert_eq!(check("sex", "Female").unwrap(), "female");
        assert!(check("ip_address", "10.0.0.300").is_err());
        assert!(check("access_time", "2026-11-29T10:15:00+07:00").is_ok());
        assert!(check("access_time", "2026-13-29T10:15:00Z").is_err());
        assert!(check("referrer", "https://www.nakhoncity.org/").is_ok());
        assert!(check("referrer", "javascript:alert(1)").is_err());
        assert!(check("name", "สมชาย\u{0007}").is_err());
        assert!(check("home_address", "  ").is_err());
    }

    #[test]
    fn card_data_outside_card_fields_is_refused() {
        for v in [
            "my card is 4111 1111 1111 1111, expires 12/27, cvv 123",
            "4111-1111-1111-1111",
            "pay with 378282246310005 please",
            ";4111111111111112=27121010000000000000?",
            "%B4111111111111112^SOMCHAI/J^2712101",
        ] {
            let e = check("name", v).unwrap_err().to_string();
            assert!(e.contains("PCI DSS") && !e.contains("4111") && !e.contains("3782"), "{v}: {e}");
            assert!(check("home_address", v).is_err(), "{v}");
        }
        // Numbers that are not card data stay: a phone, an id, a Luhn-failing run, a short one.
        for v in
            ["call 081 234 5678", "ref 4111111111111112", "order 123456789012", "1 2 3 4 5 6 7 8 9 0 1 2 3"]
        {
            assert!(check("home_address", v).is_ok(), "{v}");
        }
        // A card field still takes a card number.
        assert_eq!(check("card_number", "4111 1111 1111 1111").unwrap(), "4111111111111111");
    }

    #[test]
    fn authentication_data_in_text_is_refused() {
        for v in [
            "pin 1234",
            "cvv 123",
            "CVV2: 123",
            "my PIN is 987654",
            "card cvc=4321 thanks",
            "Security code - 123",
            "cvv no. 999",
            "รหัสหลังบัตร 123",
            "รหัส PIN คือ 5555",
        ] {
            let e = check("home_address", v).unwrap_err().to_string();
            assert!(e.contains("PCI DSS 3.3.1") && !e.contains("123") && !e.contains("1234"), "{v}: {e}");
            assert!(check("name", v).is_err(), "{v}");
        }
        // Words that merely contain one, a PIN too short to be one, and numbers without the word stay.
        for v in [
            "pinned 1234 times",
            "spin 1234",
            "Pin 12 on the map",
            "lucid 123",
            "room 1234",
            "pincushion 4444",
        ] {
            assert!(check("home_address", v).is_ok(), "{v}");
        }
    }

    #[test]
    fn prohibited_names() {
        for name in ["cvv", "CVV2", "card_verification_code", "pin", "track-2", "Track_Data"] {
            let e = check_field_name_allowed(name).unwrap_err();
            assert!(e.contains("PCI DSS 3.3.1"), "{name}: {e}");
        }
        assert!(check_field_name_allowed("card_number").is_ok());
        // By word, wherever it stands, in any case or spelling a regulations file might use.
        for name in
            ["card_cvv", "pin_code", "card_verification", "cvn", "track", "cardCvc2", "security-pin", "CID"]
        {
            assert!(check_field_name_allowed(name).is_err(), "{name}");
        }
        for name in
            ["shipping_address", "attracted_by", "pinned_note", "acid_test", "card_number", "national_id"]
        {
            assert!(check_field_name_allowed(name).is_ok(), "{name}");
        }
        for name in FieldKind::NAMES {
            assert!(FieldKind::parse(name).is_some());
        }
    }
}
