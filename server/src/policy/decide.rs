//! The decide step: role × operation × fields × purpose × the subject's consent → allow (each field
//! revealed or masked) or deny (with the reason and the rule). Deny by default: only what a role in
//! the regulations grants is allowed. Pure: no I/O.

use super::Identity;
use super::Operation;
use super::regulations::{ConsentRule, MaskRule, Regulations, Reveal};

/// The data subject's recorded choice for one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentState {
    Granted,
    Withdrawn,
    /// Never recorded.
    Unknown,
}

/// What the vault asks the regulations.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub op: Operation,
    pub fields: &'a [&'a str],
    pub purpose: Option<&'a str>,
    /// The subject's consent for `purpose`, when the purpose consults it.
    pub consent: Option<ConsentState>,
}

/// An allowed request: how to show each asked field (same order), and the rule that allowed it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub rule: String,
    pub reveal: Vec<Reveal>,
}

/// A refused request, with the reason the caller sees and the rule recorded in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: String,
    pub reason: String,
}

fn deny(rule: impl Into<String>, reason: impl Into<String>) -> Denial {
    Denial { rule: rule.into(), reason: reason.into() }
}

/// Whether reading for `purpose` consults the subject's consent.
pub fn consults_consent(regs: &Regulations, purpose: &str) -> bool {
    regs.purposes.get(purpose).is_some_and(|p| p.consent != ConsentRule::None)
}

pub fn decide(regs: &Regulations, identity: &Identity, ask: Ask<'_>) -> Result<Decision, Denial> {
    let Some(role) = regs.roles.get(&identity.role) else {
        return Err(deny("deny-by-default", format!("role '{}' is not in the regulations", identity.role)));
    };
    let op = ask.op.as_str();
    if !role.operations.contains(&ask.op) {
        return Err(deny("deny-by-default", format!("role '{}' may not {op}", role.name)));
    }
    match ask.op {
        Operation::Read => {
            let Some(purpose_name) = ask.purpose else {
                return Err(deny("deny-by-default", "a read must state its purpose"));
            };
            let Some(purpose) = regs.purposes.get(purpose_name) else {
                return Err(deny("deny-by-default", format!("unknown purpose '{purpose_name}'")));
            };
            let mut reveal = Vec::with_capacity(ask.fields.len());
            let mut rules: Vec<&str> = Vec::new();
            for field in ask.fields {
                let mut best: Option<(Reveal, &str)> = None;
                for g in role
                    .reads
                    .iter()
                    .filter(|g| g.purposes.contains(purpose_name) && g.fields.contains(*field))
                {
                    if best.is_none() || g.reveal == Reveal::Full {
                        best = Some((g.reveal, &g.rule));
                    }
                }
                let Some((r, rule)) = best else {
                    return Err(deny(
                        "deny-by-default",
                        format!(
                            "role '{}' may not read field '{field}' for purpose '{purpose_name}'",
                            role.name
                        ),
                    ));
                };
                reveal.push(r);
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            if rules.is_empty() {
                // A read of no fields (e.g. a record with none the caller asked for) still needs a grant.
                match role.reads.iter().find(|g| g.purposes.contains(purpose_name)) {
                    Some(g) => rules.push(&g.rule),
                    None => {
                        return Err(deny(
                            "deny-by-default",
                            format!("role '{}' may not read for purpose '{purpose_name}'", role.name),
                        ));
                    }
                }
            }
            let consent_rule = format!("purposes.{purpose_name}.consent");
            match (purpose.consent, ask.consent.unwrap_or(ConsentState::Unknown)) {
                (ConsentRule::Required, ConsentState::Granted) => {}
                (ConsentRule::Required, _) => {
                    return Err(deny(
                        consent_rule,
                        format!(
                            "purpose '{purpose_name}' needs the data subject's consent, which is not granted"
                        ),
                    ));
                }
                (ConsentRule::OptOut, ConsentState::Withdrawn) => {
                    return Err(deny(
                        consent_rule,
                        format!("the data subject opted out of '{purpose_name}'"),
                    ));
                }
                _ => {}
            }
            Ok(Decision { rule: rules.join(" "), reveal })
        }
        Operation::Write | Operation::Update => {
            if let Some(field) = ask.fields.iter().find(|f| !role.write_fields.contains(**f)) {
                return Err(deny(
                    format!("roles.{}.write_fields", role.name),
                    format!("role '{}' may not {op} field '{field}'", role.name),
                ));
            }
            Ok(Decision { rule: format!("roles.{}.write_fields", role.name), reveal: Vec::new() })
        }
        _ => Ok(Decision { rule: format!("roles.{}.operations", role.name), reveal: Vec::new() }),
    }
}

/// A masked rendering of a value. Never longer in information than the rule allows.
pub fn mask(rule: MaskRule, value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    match rule {
        MaskRule::Pan => {
            let digits: Vec<char> = chars.iter().copied().filter(char::is_ascii_digit).collect();
            if digits.len() < 13 {
                return "*".repeat(digits.len().max(4));
            }
            let n = digits.len();
            let mut out: String = digits[..6].iter().collect();
            out.push_str(&"*".repeat(n - 10));
            out.extend(&digits[n - 4..]);
            out
        }
        MaskRule::Last4 => {
            let n = chars.len();
            if n <= 4 {
                return "*".repeat(n);
            }
            let mut out = "*".repeat(n - 4);
            out.extend(&chars[n - 4..]);
            out
        }
        MaskRule::Email => match value.rsplit_once('@') {
            Some((local, domain)) => {
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            None => "***".to_owned(),
        },
        MaskRule::Initials => value
            .split_whitespace()
            .map(|w| {
                let mut s: String = w.chars().take(1).collect();
                s.push_str("***");
                s
            })
            .collect::<Vec<_>>()
            .join(" "),
        MaskRule::Redact => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask(MaskRule::Pan, "4111111111111111"), "411111******1111");
        assert_eq!(mask(MaskRule::Pan, "4222222222222"), "422222***2222");
        assert_eq!(mask(MaskRule::Last4, "1101700203450"), "*********3450");
        assert_eq!(mask(MaskRule::Email, "somchai@example.go.th"), "s***@example.go.th");
        assert_eq!(mask(MaskRule::Initials, "สมชาย ใจดี"), "ส*** ใ***");
        assert_eq!(mask(MaskRule::Redact, "anything"), "***");
    }

    fn regs() -> Regulations {
        Regulations::parse(
            r#"
[regulations]
organisation = "T"
[fields.name]
kind = "name"
class = "personal"
mask = "initials"
[purposes.news]
description = "n"
consent = "opt_out"
legal_basis = "legitimate interest"
[purposes.marketing]
description = "m"
consent = "required"
legal_basis = "consent"
[purposes.billing]
description = "b"
consent = "none"
legal_basis = "contract"
[roles.r]
operations = ["read"]
[[roles.r.read]]
purposes = ["news", "marketing", "billing"]
fields = ["name"]
reveal = "masked"
[[roles.r.read]]
purposes = ["billing"]
fields = ["name"]
reveal = "full"
"#,
        )
        .unwrap()
    }

    fn ask(purpose: &str, consent: ConsentState) -> Result<Decision, Denial> {
        let id = Identity { name: "i".into(), role: "r".into() };
        decide(
            &regs(),
            &id,
            Ask { op: Operation::Read, fields: &["name"], purpose: Some(purpose), consent: Some(consent) },
        )
    }

    #[test]
    fn consent_rules() {
        use ConsentState::*;
        // opt_out: allowed unless withdrawn.
        assert!(ask("news", Unknown).is_ok());
        assert!(ask("news", Granted).is_ok());
        assert_eq!(ask("news", Withdrawn).unwrap_err().rule, "purposes.news.consent");
        // required: only when granted.
        assert!(ask("marketing", Granted).is_ok());
        assert!(ask("marketing", Unknown).is_err());
        assert!(ask("marketing", Withdrawn).is_err());
        // none: never consulted.
        assert!(ask("billing", Withdrawn).is_ok());
    }

    #[test]
    fn the_most_revealing_grant_wins_and_is_named() {
        let d = ask("billing", ConsentState::Unknown).unwrap();
        assert_eq!(d.reveal, [Reveal::Full]);
        assert_eq!(d.rule, "roles.r.read[1]");
        assert_eq!(ask("news", ConsentState::Unknown).unwrap().reveal, [Reveal::Masked]);
    }

    #[test]
    fn unknown_roles_and_operations_are_denied() {
        let r = regs();
        let nobody = Identity { name: "n".into(), role: "ghost".into() };
        let write = Ask { op: Operation::Write, fields: &["name"], purpose: None, consent: None };
        assert!(decide(&r, &nobody, write).unwrap_err().reason.contains("not in the regulations"));
        let reader = Identity { name: "i".into(), role: "r".into() };
        assert!(decide(&r, &reader, write).unwrap_err().reason.contains("may not write"));
    }

    #[test]
    fn operation_names_round_trip() {
        for name in Operation::NAMES {
            assert_eq!(Operation::parse(name).unwrap().as_str(), *name);
        }
        assert_eq!(Operation::ALL.len(), Operation::NAMES.len());
    }
}
