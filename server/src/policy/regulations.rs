//! The organisation's regulations: a TOML file it edits (documented in `server/regulations/README.md`),
//! validated into plain Rust rules. Deny by default: nothing is allowed unless a role grants it.
//! The file's SHA-256 is its version, recorded with every decision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use crate::policy::Operation;
use crate::policy::catalogue::{self, FieldKind};

/// Why a regulations file was refused. The message names the role / field / purpose and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid regulations: {0}")]
pub struct RegulationsError(pub String);

fn err(msg: impl Into<String>) -> RegulationsError {
    RegulationsError(msg.into())
}

/// How much harm a leak does; roles may be granted whole classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Usage statistics that do not identify a person on their own.
    NonIdentifying,
    /// Identifies or contacts a person.
    Personal,
    /// Government identifiers.
    Sensitive,
    /// Payment card data (PCI DSS scope).
    Restricted,
}

/// How a masked value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskRule {
    /// Payment card: at most the first six and last four digits (PCI DSS 3.4.1).
    Pan,
    /// Everything but the last four characters.
    Last4,
    /// First character of the local part, then the domain.
    Email,
    /// First character of each word.
    Initials,
    /// Nothing of the value.
    Redact,
}

/// Whether a purpose needs the data subject's say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentRule {
    /// Allowed on another legal basis; the subject's choices are not consulted.
    None,
    /// Allowed unless the subject opted out (withdrew).
    OptOut,
    /// Allowed only while the subject's consent is granted.
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reveal {
    Full,
    Masked,
}

#[derive(Debug, Clone)]
pub struct FieldRule {
    pub name: String,
    pub kind: FieldKind,
    pub class: Class,
    pub mask: MaskRule,
    pub description: String,
}

#[derive(Debug, Clone)]
pub struct Purpose {
    pub name: String,
    pub description: String,
    pub consent: ConsentRule,
    pub legal_basis: String,
}

/// Fields a grant covers, resolved to names at load time.
#[derive(Debug, Clone)]
pub struct ReadGrant {
    /// `roles.NAME.read[i]`, recorded as the rule that allowed a read.
    pub rule: String,
    pub purposes: BTreeSet<String>,
    pub fields: BTreeSet<String>,
    pub reveal: Reveal,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub description: String,
    pub operations: BTreeSet<Operation>,
    pub reads: Vec<ReadGrant>,
    pub write_fields: BTreeSet<String>,
    /// Roles an identity of this role may create identities with (`assigns`; deny by default).
    pub assigns: BTreeSet<String>,
}

impl Role {
    /// Whether creating an identity of this role needs a second identity's approval (two-person
    /// rule): roles that read, export or read the audit log, and every administrative role
    /// (an administrator who could create another alone would create their own approver).
    pub fn needs_approval(&self) -> bool {
        self.operations.iter().any(|o| {
            matches!(
                o,
                Operation::Read
                    | Operation::Export
                    | Operation::AuditRead
                    | Operation::KeyAdmin
                    | Operation::IdentityAdmin
                    | Operation::RegulationsAdmin
            )
        })
    }
}

/// Validated regulations, immutable once loaded; a reload swaps in a whole new value.
#[derive(Clone)]
pub struct Regulations {
    pub version: String,
    pub organisation: String,
    pub fields: BTreeMap<String, FieldRule>,
    pub purposes: BTreeMap<String, Purpose>,
    pub roles: BTreeMap<String, Role>,
    /// Lawful but worth a look (separation of duties), reported at load.
    pub warnings: Vec<String>,
    /// How long a key-encryption key may stay in use (PCI DSS 3.6.4); `None`: no limit set.
    pub cryptoperiod_days: Option<u32>,
    /// Audit entries younger than this are never archived away (PCI DSS 10.5.1: at least a year).
    pub audit_retention_days: u32,
    /// The file's text, as parsed (`version` is its SHA-256): what a store shared by several
    /// nodes keeps, so each of them decides under the same rules.
    pub text: std::sync::Arc<str>,
}

/// The shortest audit retention the regulations may set, and the default (PCI DSS 10.5.1).
pub const MIN_AUDIT_RETENTION_DAYS: u32 = 365;

impl fmt::Debug for Regulations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Regulations")
            .field("version", &self.version)
            .field("fields", &self.fields.len())
            .field("purposes", &self.purposes.len())
            .field("roles", &self.roles.len())
            .finish()
    }
}

// ---- the file's shape ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    regulations: RawHeader,
    #[serde(default)]
    fields: BTreeMap<String, RawField>,
    #[serde(default)]
    purposes: BTreeMap<String, RawPurpose>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    keys: Option<RawKeys>,
    #[serde(default)]
    audit: Option<RawAudit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    retention_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    cryptoperiod_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    organisation: String,
    #[serde(default)]
    #[allow(dead_code)] // documentation for the people who edit the file
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    kind: String,
    class: Class,
    mask: MaskRule,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    description: String,
    consent: ConsentRule,
    legal_basis: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[serde(default)]
    description: String,
    operations: Vec<String>,
    #[serde(default)]
    write_fields: Vec<String>,
    #[serde(default)]
    read: Vec<RawReadGrant>,
    #[serde(default)]
    assigns: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadGrant {
    purposes: Vec<String>,
    fields: Vec<String>,
    reveal: Reveal,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl Regulations {
    /// Parses and validates a regulations file. Nothing partial: any error refuses the whole file.
    pub fn parse(text: &str) -> Result<Self, RegulationsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| err(e.to_string().trim().replace('\n', " ")))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let version = hex::encode(digest.as_ref());

        let mut fields = BTreeMap::new();
        for (name, f) in raw.fields {
            catalogue::check_field_name_allowed(&name).map_err(|m| err(format!("fields.{name}: {m}")))?;
            if !is_name(&name) {
                return Err(err(format!("fields.{name}: names are lowercase letters, digits, '_' and '-'")));
            }
            let kind = FieldKind::parse(&f.kind).ok_or_else(|| {
                err(format!(
                    "fields.{name}.kind: unknown kind '{}' (known: {})",
                    f.kind,
                    FieldKind::NAMES.join(", ")
                ))
            })?;
            if kind == FieldKind::CardNumber
                && !matches!(f.mask, MaskRule::Pan | MaskRule::Last4 | MaskRule::Redact)
            {
                return Err(err(format!(
                    "fields.{name}.mask: a card number is masked with pan, last4 or redact"
                )));
            }
            fields.insert(
                name.clone(),
                FieldRule { name, kind, class: f.class, mask: f.mask, description: f.description },
            );
        }
        if fields.is_empty() {
            return Err(err("fields: at least one field is needed"));
        }

        let mut purposes = BTreeMap::new();
        for (name, p) in raw.purposes {
            if !is_name(&name) {
                return Err(err(format!(
                    "purposes.{name}: names are lowercase letters, digits, '_' and '-'"
                )));
            }
            if p.legal_basis.trim().is_empty() {
                return Err(err(format!("purposes.{name}.legal_basis: say on what basis data is used")));
            }
            purposes.insert(
                name.clone(),
                Purpose { name, description: p.description, consent: p.consent, legal_basis: p.legal_basis },
            );
        }

        let select =
            |role: &str, key: &str, selectors: &[String]| -> Result<BTreeSet<String>, RegulationsError> {
                let mut out = BTreeSet::new();
                for sel in selectors {
                    if sel == "*" {
                        out.extend(fields.keys().cloned());
                    } else if let Some(class) = sel.strip_prefix("class:") {
                        let class: Class = toml::Value::String(class.to_owned())
                            .try_into()
                            .map_err(|_| err(format!("roles.{role}.{key}: unknown class '{class}'")))?;
                        out.extend(fields.values().filter(|f| f.class == class).map(|f| f.name.clone()));
                    } else if fields.contains_key(sel) {
                        out.insert(sel.clone());
                    } else {
                        return Err(err(format!("roles.{role}.{key}: unknown field '{sel}'")));
                    }
                }
                Ok(out)
            };

        let mut roles = BTreeMap::new();
        let mut warnings = Vec::new();
        for (name, r) in raw.roles {
            if !is_name(&name) {
                return Err(err(format!("roles.{name}: names are lowercase letters, digits, '_' and '-'")));
            }
            let mut operations = BTreeSet::new();
            for op in &r.operations {
                let parsed = Operation::parse(op).ok_or_else(|| {
                    err(format!(
                        "roles.{name}.operations: unknown operation '{op}' (known: {})",
                        Operation::NAMES.join(", ")
                    ))
                })?;
                operations.insert(parsed);
            }
            let write_fields = select(&name, "write_fields", &r.write_fields)?;
            let writes = operations.contains(&Operation::Write) || operations.contains(&Operation::Update);
            if writes && write_fields.is_empty() {
                return Err(err(format!(
                    "roles.{name}.write_fields: write or update needs the fields it may write"
                )));
            }
            if !writes && !write_fields.is_empty() {
                return Err(err(format!(
                    "roles.{name}.write_fields: given, but the role has neither write nor update"
                )));
            }
            let mut reads = Vec::new();
            for (i, g) in r.read.iter().enumerate() {
                let key = format!("read[{i}]");
                if !operations.contains(&Operation::Read) {
                    return Err(err(format!("roles.{name}.{key}: read grants need the 'read' operation")));
                }
                let mut ps = BTreeSet::new();
                for p in &g.purposes {
                    if !purposes.contains_key(p) {
                        return Err(err(format!("roles.{name}.{key}.purposes: unknown purpose '{p}'")));
                    }
                    ps.insert(p.clone());
                }
                if ps.is_empty() {
                    return Err(err(format!("roles.{name}.{key}.purposes: name at least one purpose")));
                }
                let fs = select(&name, &format!("{key}.fields"), &g.fields)?;
                reads.push(ReadGrant {
                    rule: format!("roles.{name}.{key}"),
                    purposes: ps,
                    fields: fs,
                    reveal: g.reveal,
                });
            }
            if operations.contains(&Operation::Read) && reads.is_empty() {
                return Err(err(format!(
                    "roles.{name}.read: the 'read' operation needs at least one read grant"
                )));
            }
            if !r.assigns.is_empty() && !operations.contains(&Operation::IdentityAdmin) {
                return Err(err(format!(
                    "roles.{name}.assigns: given, but the role does not have the 'identity_admin' operation"
                )));
            }
            let assigns: BTreeSet<String> = r.assigns.iter().cloned().collect();
            roles.insert(
                name.clone(),
                Role { name, description: r.description, operations, reads, write_fields, assigns },
            );
        }
        for role in roles.values() {
            if let Some(unknown) = role.assigns.iter().find(|a| !roles.contains_key(*a)) {
                return Err(err(format!("roles.{}.assigns: unknown role '{unknown}'", role.name)));
            }
        }
        for role in roles.values() {
            warnings.extend(separation_of_duties(role, &roles));
        }
        let cryptoperiod_days = raw.keys.and_then(|k| k.cryptoperiod_days);
        if cryptoperiod_days == Some(0) {
            return Err(err("keys.cryptoperiod_days: must be at least 1"));
        }
        let audit_retention_days =
            raw.audit.and_then(|a| a.retention_days).unwrap_or(MIN_AUDIT_RETENTION_DAYS);
        if audit_retention_days < MIN_AUDIT_RETENTION_DAYS {
            return Err(err(format!(
                "audit.retention_days: {audit_retention_days} is less than {MIN_AUDIT_RETENTION_DAYS} (PCI DSS 10.5.1 keeps a year)"
            )));
        }
        Ok(Self {
            version,
            organisation: raw.regulations.organisation,
            fields,
            purposes,
            roles,
            warnings,
            cryptoperiod_days,
            audit_retention_days,
            text: text.into(),
        })
    }

    pub fn field(&self, name: &str) -> Option<&FieldRule> {
        self.fields.get(name)
    }

    /// The shipped sample for the municipality.
    #[allow(clippy::expect_used)] // the sample is a compile-time constant that a unit test parses
    pub fn sample() -> Self {
        Self::parse(SAMPLE).expect("the embedded sample regulations are valid")
    }
}

/// Separation-of-duties warnings for `role`, which holds its own powers and every power of the
/// roles it can assign alone. A role whose assignment needs a second identity's approval is not
/// held alone, so its powers are not counted: two people must agree to them. (A role that itself
/// assigns administers identities and so needs approval: no chain of `assigns` is held alone.)
fn separation_of_duties(role: &Role, roles: &BTreeMap<String, Role>) -> Vec<String> {
    let mut held: BTreeSet<Operation> = role.operations.clone();
    let mut via: BTreeSet<&str> = BTreeSet::new();
    for r in role.assigns.iter().filter_map(|a| roles.get(a)) {
        if !r.needs_approval() && r.name != role.name {
            held.extend(r.operations.iter().copied());
            via.insert(r.name.as_str());
        }
    }
    let through = if via.is_empty() {
        String::new()
    } else {
        format!(
            " (through the roles it may assign alone: {})",
            via.into_iter().collect::<Vec<_>>().join(", ")
        )
    };
    let name = &role.name;
    let has = |ops: &[Operation]| ops.iter().any(|o| held.contains(o));
    let admin = has(&[Operation::KeyAdmin, Operation::IdentityAdmin]);
    let mut out = Vec::new();
    if admin && has(&[Operation::Read, Operation::Export]) {
        out.push(format!(
            "separation of duties: role '{name}' has key or identity administration and also reads personal data{through}"
        ));
    }
    if admin && has(&[Operation::Write, Operation::Update, Operation::Delete, Operation::Erase]) {
        out.push(format!(
            "separation of duties: role '{name}' has key or identity administration and also changes personal data{through}"
        ));
    }
    if held.contains(&Operation::AuditRead) && has(&[Operation::Read, Operation::Export]) {
        out.push(format!(
            "separation of duties: role '{name}' reads the audit log and personal data{through}"
        ));
    }
    out
}

/// The municipality's regulations, shipped with the product and loaded by `khlangd dev`.
pub const SAMPLE: &str = include_str!("../../regulations/nakhon-si-thammarat.toml");

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
[regulations]
organisation = "Test"
[fields.name]
kind = "name"
class = "personal"
mask = "initials"
[purposes.contact]
description = "x"
consent = "none"
legal_basis = "public task"
[roles.reader]
operations = ["read"]
[[roles.reader.read]]
purposes = ["contact"]
fields = ["name"]
reveal = "full"
"#;

    #[test]
    fn sample_loads_without_warnings() {
        let r = Regulations::parse(SAMPLE).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.version.len(), 64);
        for role in [
            "registration-app",
            "billing-clerk",
            "postal-contractor",
            "statistics-contractor",
            "marketing-officer",
            "security-officer",
            "key-admin",
            "data-protection-officer",
        ] {
            assert!(r.roles.contains_key(role), "{role}");
        }
    }

    #[test]
    fn errors_name_the_place() {
        let cases = [
            (
                MINI.replace("purposes = [\"contact\"]", "purposes = [\"contcat\"]"),
                "roles.reader.read[0].purposes: unknown purpose 'contcat'",
            ),
            (
                MINI.replace("fields = [\"name\"]", "fields = [\"nmae\"]"),
                "roles.reader.read[0].fields: unknown field 'nmae'",
            ),
            (
                MINI.replace("operations = [\"read\"]", "operations = [\"read\", \"fly\"]"),
                "roles.reader.operations: unknown operation 'fly'",
            ),
            (MINI.replace("kind = \"name\"", "kind = \"shoe\""), "fields.name.kind: unknown kind 'shoe'"),
            (
                MINI.replace("[fields.name]", "[fields.cvv]").replace("[\"name\"]", "[\"cvv\"]"),
                "fields.cvv: ",
            ),
            (MINI.replace("reveal = \"full\"", "reveal = \"sometimes\""), "unknown variant `sometimes`"),
            (
                MINI.replace("legal_basis = \"public task\"", "legal_basis = \" \""),
                "purposes.contact.legal_basis",
            ),
            (MINI.replace("[regulations]", "[regulation]"), "unknown field `regulation`"),
        ];
        for (text, needle) in cases {
            let e = Regulations::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "expected '{needle}' in: {e}");
        }
    }

    #[test]
    fn separation_of_duties_is_warned() {
        let text = MINI.replace("operations = [\"read\"]", "operations = [\"read\", \"key_admin\"]");
        let r = Regulations::parse(&text).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("role 'reader'"));
    }

    /// A helpdesk that may assign a writer alone holds the writer's power to change data; one
    /// that assigns only a reader (which needs a second identity's approval) does not read alone.
    #[test]
    fn assigned_roles_count_as_held_powers_unless_they_need_approval() {
        let base = format!(
            "{MINI}
[roles.writer]
operations = [\"write\"]
write_fields = [\"name\"]
[roles.helpdesk]
operations = [\"identity_admin\"]
"
        );
        let alone = Regulations::parse(&format!("{base}assigns = [\"writer\"]\n")).unwrap();
        assert_eq!(alone.warnings.len(), 1, "{:?}", alone.warnings);
        assert!(alone.warnings[0].contains("role 'helpdesk'"), "{:?}", alone.warnings);
        assert!(alone.warnings[0].contains("changes personal data"), "{:?}", alone.warnings);
        assert!(
            alone.warnings[0].contains("through the roles it may assign alone: writer"),
            "{:?}",
            alone.warnings
        );
        assert!(!alone.roles["writer"].needs_approval());

        let approved = Regulations::parse(&format!("{base}assigns = [\"reader\"]\n")).unwrap();
        assert!(approved.warnings.is_empty(), "{:?}", approved.warnings);
        assert!(approved.roles["reader"].needs_approval());
        assert!(approved.roles["helpdesk"].needs_approval(), "administrators need approval too");
    }

    #[test]
    fn assigns_names_known_roles_and_needs_identity_admin() {
        let unknown =
            format!("{MINI}[roles.helpdesk]\noperations = [\"identity_admin\"]\nassigns = [\"nobody\"]\n");
        let e = Regulations::parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("roles.helpdesk.assigns: unknown role 'nobody'"), "{e}");
        let no_admin =
            MINI.replace("operations = [\"read\"]", "operations = [\"read\"]\nassigns = [\"reader\"]");
        let e = Regulations::parse(&no_admin).unwrap_err().to_string();
        assert!(
            e.contains("roles.reader.assigns: given, but the role does not have the 'identity_admin'"),
            "{e}"
        );
    }

    #[test]
    fn version_is_the_file_hash() {
        let a = Regulations::parse(MINI).unwrap();
        let b = Regulations::parse(&format!("{MINI}\n# a comment\n")).unwrap();
        assert_ne!(a.version, b.version);
        assert_eq!(a.version, hex::encode(ring::digest::digest(&ring::digest::SHA256, MINI.as_bytes())));
    }

    #[test]
    fn audit_retention_defaults_to_a_year_and_cannot_be_shorter() {
        assert_eq!(Regulations::sample().audit_retention_days, 365);
        let short = SAMPLE.replace("retention_days = 365", "retention_days = 90");
        let err = Regulations::parse(&short).unwrap_err().to_string();
        assert!(err.contains("audit.retention_days: 90 is less than 365"), "{err}");
        let long = SAMPLE.replace("retention_days = 365", "retention_days = 3650");
        assert_eq!(Regulations::parse(&long).unwrap().audit_retention_days, 3650);
    }
}
