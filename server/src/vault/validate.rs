//! The validate step: subject ids, field names and values, limits, purposes.

use super::*;

impl Vault {
    // ---- validate -------------------------------------------------------------------------

    /// A subject id is compared byte for byte (its blind index is an HMAC of the bytes), so two
    /// spellings of one person would be two people, and an erasure of one would miss the other.
    /// The rule: no leading or trailing whitespace; no whitespace but single ASCII spaces; no
    /// control characters; no invisible formatting characters (zero-width, bidi controls, BOM,
    /// soft hyphen); no fullwidth forms of ASCII characters.
    pub(crate) fn check_subject(&self, subject: &str) -> Result<(), VaultError> {
        if subject.trim().is_empty() {
            return Err(VaultError::InvalidArgument("subject_id is empty".into()));
        }
        if subject.len() > self.limits.max_subject_bytes {
            return Err(VaultError::LimitExceeded(format!(
                "subject_id is longer than {} bytes",
                self.limits.max_subject_bytes
            )));
        }
        let refuse = |why: &str| Err(VaultError::InvalidArgument(format!("subject_id {why}")));
        if subject.chars().any(char::is_control) {
            return refuse("contains control characters");
        }
        if subject.trim() != subject {
            return refuse("starts or ends with whitespace");
        }
        if subject.contains("  ") || subject.chars().any(|c| c.is_whitespace() && c != ' ') {
            return refuse("holds whitespace other than single spaces");
        }
        if subject.chars().any(is_invisible) {
            return refuse("holds an invisible formatting character (zero-width, bidi control, BOM)");
        }
        if subject.chars().any(|c| ('\u{ff01}'..='\u{ff5e}').contains(&c)) {
            return refuse("holds fullwidth forms of ASCII characters; use the ASCII ones");
        }
        Ok(())
    }

    pub(crate) fn check_record_id(record_id: &str) -> Result<(), VaultError> {
        uuid::Uuid::parse_str(record_id)
            .map(|_| ())
            .map_err(|_| VaultError::InvalidArgument("record_id is not a record id (a UUID)".into()))
    }

    pub(crate) fn check_field_name<'r>(regs: &'r Regulations, name: &str) -> Result<&'r str, VaultError> {
        catalogue::check_field_name_allowed(name).map_err(VaultError::InvalidArgument)?;
        regs.fields.get_key_value(name).map(|(k, _)| k.as_str()).ok_or_else(|| {
            VaultError::InvalidArgument(format!(
                "unknown field '{}': not in the regulations' field catalogue",
                catalogue::printable(name)
            ))
        })
    }

    pub(crate) fn check_purpose<'r>(
        regs: &'r Regulations,
        purpose: Option<&str>,
    ) -> Result<&'r str, VaultError> {
        let Some(purpose) = purpose.filter(|p| !p.is_empty()) else {
            return Err(VaultError::InvalidArgument(
                "a read must state its purpose (e.g. purpose = billing)".into(),
            ));
        };
        regs.purposes.get_key_value(purpose).map(|(k, _)| k.as_str()).ok_or_else(|| {
            let known: Vec<&str> = regs.purposes.keys().map(String::as_str).collect();
            VaultError::InvalidArgument(format!(
                "unknown purpose '{}' (known: {})",
                catalogue::printable(purpose),
                known.join(", ")
            ))
        })
    }

    /// Validates field names and values; returns canonical values, sorted by name.
    pub(crate) fn check_fields(
        &self,
        regs: &Regulations,
        fields: &[FieldValue],
    ) -> Result<Vec<FieldValue>, VaultError> {
        if fields.len() > self.limits.max_fields_per_record {
            return Err(VaultError::LimitExceeded(format!(
                "{} fields given; a record holds at most {}",
                fields.len(),
                self.limits.max_fields_per_record
            )));
        }
        let mut out = Vec::with_capacity(fields.len());
        for field in fields {
            if field.name == SUBJECT_FIELD {
                return Err(VaultError::InvalidArgument(
                    "subject_id is the record's subject, given as such, not as a field".into(),
                ));
            }
            let name = Self::check_field_name(regs, &field.name)?;
            if field.value.len() > self.limits.max_field_bytes {
                return Err(VaultError::LimitExceeded(format!(
                    "field '{name}' is larger than {} bytes",
                    self.limits.max_field_bytes
                )));
            }
            let text = std::str::from_utf8(field.value.expose_secret())
                .map_err(|_| VaultError::InvalidArgument(format!("field '{name}' is not UTF-8")))?;
            let kind = regs.fields[name].kind;
            let canonical = Zeroizing::new(catalogue::validate(name, kind, text)?);
            out.push(FieldValue { name: name.to_owned(), value: Plaintext::from_str_copy(&canonical) });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(VaultError::InvalidArgument(format!("field '{}' is given twice", w[0].name)));
        }
        Ok(out)
    }

    pub(crate) fn check_names<'r>(
        regs: &'r Regulations,
        names: &[String],
    ) -> Result<Vec<&'r str>, VaultError> {
        let mut out: Vec<&str> =
            names.iter().map(|n| Self::check_field_name(regs, n)).collect::<Result<_, _>>()?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}
