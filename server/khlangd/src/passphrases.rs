//! Custodians' passphrases: from files (mode-checked) or prompted, never echoed.

use super::*;

pub(crate) fn read_file_passphrase(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    crate::file_modes::check(path, "passphrase file", crate::file_modes::Holds::Secret)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read passphrase file {}", path.display()))?,
    );
    let pass = Zeroizing::new(text.lines().next().unwrap_or_default().to_owned());
    if pass.is_empty() {
        bail!("the passphrase in {} is empty", path.display());
    }
    Ok(pass)
}

pub(crate) fn prompt(label: &str, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: use --passphrase-file, KHLANG_PASSPHRASE, or run in a terminal to be prompted");
    }
    let p = Zeroizing::new(rpassword::prompt_password(format!("{label}: "))?);
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password(format!("Repeat {label}: "))?);
        if *again != *p {
            bail!("the passphrases differ");
        }
    }
    if p.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(p)
}

/// One passphrase per custodian for `init`: files in order, KHLANG_PASSPHRASE for a single
/// custodian, or a prompt for each.
pub(crate) fn init_passphrases(
    args: &PassphraseArgs,
    custodians: u8,
) -> anyhow::Result<Vec<Zeroizing<String>>> {
    if !args.passphrase_file.is_empty() {
        if args.passphrase_file.len() != custodians as usize {
            bail!("{custodians} custodians need {custodians} --passphrase-file options, one each");
        }
        return args.passphrase_file.iter().map(|f| read_file_passphrase(Path::new(f))).collect();
    }
    if custodians == 1 {
        if let Ok(p) = std::env::var("KHLANG_PASSPHRASE") {
            if p.is_empty() {
                bail!("KHLANG_PASSPHRASE is empty");
            }
            return Ok(vec![Zeroizing::new(p)]);
        }
        return Ok(vec![prompt("Vault passphrase", true)?]);
    }
    (1..=custodians).map(|i| prompt(&format!("Custodian {i}'s passphrase"), true)).collect()
}

/// `(custodian, passphrase)` pairs for `serve`: `N=FILE` or `FILE` (custodian 1), else
/// KHLANG_PASSPHRASE for custodian 1, else a prompt when a terminal is attached, else none
/// (the vault starts sealed).
pub(crate) fn serve_passphrases(args: &PassphraseArgs) -> anyhow::Result<Vec<(u8, Zeroizing<String>)>> {
    if !args.passphrase_file.is_empty() {
        return args
            .passphrase_file
            .iter()
            .map(|spec| {
                let (n, file) = match spec.split_once('=') {
                    Some((n, f)) if n.parse::<u8>().is_ok() => (n.parse::<u8>()?, f),
                    _ => (1, spec.as_str()),
                };
                Ok((n, read_file_passphrase(Path::new(file))?))
            })
            .collect();
    }
    if let Ok(p) = std::env::var("KHLANG_PASSPHRASE") {
        return Ok(vec![(1, Zeroizing::new(p))]);
    }
    if std::io::stdin().is_terminal() {
        return Ok(vec![(1, prompt("Vault passphrase (custodian 1)", false)?)]);
    }
    Ok(Vec::new())
}
