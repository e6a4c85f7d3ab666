//! The configuration file: TOML whose keys are `khlangd`'s long flag names (`data-dir = "…"`).
//!
//! Precedence, highest first: a flag on the command line, its environment variable, the file,
//! the built-in default. The file's values become the flags' defaults before clap parses, so
//! clap's own order (flag > environment > default) gives exactly that, with one parser and one
//! validation for all three sources.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use zeroize::Zeroizing;

/// Settings a file must not hold: each is a decision for one start, not a standing setting (a
/// file that said `regulations-changed = true` would silently accept every future rule change).
const ONE_TIME: &[&str] = &["regulations-changed", "accept-audit-break", "accept-unbased-log", "config"];

/// The environment variable naming the file when `--config` is not given.
pub const CONFIG_ENV: &str = "KHLANG_CONFIG";

/// A parsed configuration file: each setting's values, as text for clap's value parsers.
pub struct ConfigFile {
    pub path: PathBuf,
    settings: Vec<(String, Setting)>,
}

enum Setting {
    Flag(bool),
    Values(Vec<String>),
}

impl ConfigFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        crate::file_modes::check(path, "configuration file", crate::file_modes::Holds::Settings)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the configuration file {}", path.display()))?,
        );
        // A configuration that carries a password (in a connection string) is a secret itself.
        if scrub(&text) != *text {
            crate::file_modes::check(
                path,
                "configuration file (it holds a password)",
                crate::file_modes::Holds::Secret,
            )?;
        }
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let table: toml::Table =
            toml::from_str(text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        let mut settings = Vec::new();
        for (key, value) in table {
            let scalar = |v: &toml::Value| -> anyhow::Result<String> {
                Ok(match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    _ => bail!("{}: '{key}' takes a string or a number", path.display()),
                })
            };
            let setting = match &value {
                toml::Value::Boolean(b) => Setting::Flag(*b),
                toml::Value::Array(items) => {
                    Setting::Values(items.iter().map(scalar).collect::<Result<_, _>>()?)
                }
                toml::Value::Table(_) => bail!(
                    "{}: [{key}]: the file has no sections; write each setting as `name = value` at the top",
                    path.display()
                ),
                other => Setting::Values(vec![scalar(other)?]),
            };
            settings.push((key, setting));
        }
        Ok(Self { path: path.to_owned(), settings })
    }

    /// Whether the file gave this setting (by long flag name).
    pub fn gives(&self, long: &str) -> bool {
        self.settings.iter().any(|(k, _)| k == long)
    }

    /// `cmd` with the file's settings as its flags' defaults, at the top and in each subcommand
    /// that has the flag. A key no command knows, a one-time decision, or a value of the wrong
    /// shape is refused, naming the file and the key.
    pub fn apply(&self, mut cmd: Command) -> anyhow::Result<Command> {
        let file = self.path.display();
        for (key, setting) in &self.settings {
            if ONE_TIME.contains(&key.as_str()) {
                bail!("{file}: '{key}' is a decision for one start: give --{key} on the command line");
            }
            let mut known = false;
            if let Some(arg) = find(&cmd, key) {
                check_shape(&file, key, &arg, setting)?;
                cmd = cmd.mut_arg(arg.get_id().clone(), |a| with_default(a, setting));
                known = true;
            }
            let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
            for name in names {
                let Some(arg) = cmd.find_subcommand(&name).and_then(|s| find(s, key)) else { continue };
                check_shape(&file, key, &arg, setting)?;
                cmd = cmd
                    .mut_subcommand(name, |s| s.mut_arg(arg.get_id().clone(), |a| with_default(a, setting)));
                known = true;
            }
            if !known {
                let hint = if key.contains('_') {
                    format!(" (names are the flags' long names: '{}')", key.replace('_', "-"))
                } else {
                    String::new()
                };
                bail!("{file}: unknown setting '{key}'{hint}");
            }
        }
        Ok(cmd)
    }
}

/// The file `--config FILE` (or `--config=FILE`) or KHLANG_CONFIG names, looked for before clap
/// parses: its values must be in place when it does.
pub fn named_in(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(path) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn find(cmd: &Command, long: &str) -> Option<clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long) && !a.is_hide_set()).cloned()
}

fn check_shape(
    file: &std::path::Display<'_>,
    key: &str,
    arg: &clap::Arg,
    setting: &Setting,
) -> anyhow::Result<()> {
    let is_flag = matches!(arg.get_action(), ArgAction::SetTrue);
    let many = matches!(arg.get_action(), ArgAction::Append);
    match setting {
        Setting::Flag(_) if !is_flag => bail!("{file}: '{key}' takes a value, not true/false"),
        Setting::Values(_) if is_flag => bail!("{file}: '{key}' is a switch: write `{key} = true`"),
        Setting::Values(v) if !many && v.len() != 1 => bail!("{file}: '{key}' takes one value"),
        _ => Ok(()),
    }
}

fn with_default(arg: clap::Arg, setting: &Setting) -> clap::Arg {
    // A required flag given by the file is no longer required on the command line (clap refuses a
    // required argument that has a default).
    let arg = arg.required(false);
    match setting {
        Setting::Flag(true) => arg.default_value("true"),
        Setting::Flag(false) => arg,
        Setting::Values(v) => arg.default_values(v.clone()),
    }
}

/// Where a setting's effective value came from, for `config check`.
fn source(m: &ArgMatches, arg: &clap::Arg, file: &ConfigFile) -> String {
    let long = arg.get_long().unwrap_or_default();
    match m.value_source(arg.get_id().as_str()) {
        Some(ValueSource::CommandLine) => "command line".into(),
        Some(ValueSource::EnvVariable) => {
            format!("environment {}", arg.get_env().and_then(|e| e.to_str()).unwrap_or_default())
        }
        Some(ValueSource::DefaultValue) if file.gives(long) => "file".into(),
        Some(ValueSource::DefaultValue) => "default".into(),
        _ => "not set".into(),
    }
}

/// The effective settings of `cmd` (unchanged by the file, for its flags' order) as TOML lines
/// with their source: every flag but the hidden and one-time ones, `storage` with any password removed (`redact`). Never a passphrase: the file and the
/// flags hold only passphrase files' paths.
pub fn effective(
    cmd: &Command,
    m: &ArgMatches,
    file: &ConfigFile,
    redact: &dyn Fn(&str, &str) -> String,
) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set()
            || ["help", "version"].contains(&long)
            || ONE_TIME.contains(&long)
            || !seen.insert(long)
        {
            continue;
        }
        let values: Vec<String> = m
            .get_raw(arg.get_id().as_str())
            .map(|vs| vs.map(|v| redact(long, &v.to_string_lossy())).collect())
            .unwrap_or_default();
        let value = match (arg.get_action(), values.as_slice()) {
            (ArgAction::SetTrue, [v]) => v.clone(),
            (ArgAction::Append, vs) => {
                format!("[{}]", vs.iter().map(|v| toml_text(v)).collect::<Vec<_>>().join(", "))
            }
            (_, [v]) => toml_text(v),
            _ => {
                out.push(format!("# {long} (not set)"));
                continue;
            }
        };
        out.push(format!("{:<56} # {}", format!("{long} = {value}"), source(m, arg, file)));
    }
    out
}

/// A value as TOML: numbers bare, everything else a quoted string.
fn toml_text(v: &str) -> String {
    if v.parse::<i64>().is_ok() {
        return v.to_owned();
    }
    toml::Value::String(v.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{Arg, CommandFactory as _};

    fn cmd() -> Command {
        Command::new("t").arg(Arg::new("top").long("top")).subcommand(
            Command::new("serve")
                .arg(Arg::new("data_dir").long("data-dir").required(true))
                .arg(Arg::new("listen").long("listen").env("T_LISTEN_UNSET_VAR").default_value("a"))
                .arg(Arg::new("plain").long("plain").action(ArgAction::SetTrue))
                .arg(Arg::new("files").long("files").action(ArgAction::Append)),
        )
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile::parse(Path::new("k.toml"), text).unwrap()
    }

    fn refusal(text: &str) -> String {
        match ConfigFile::parse(Path::new("k.toml"), text).and_then(|f| f.apply(cmd())) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let f = file("data-dir = \"/d\"\nlisten = \"b\"\nplain = true\nfiles = [\"x\", \"y\"]\ntop = 3");
        let m = f.apply(cmd()).unwrap().try_get_matches_from(["t", "serve"]).unwrap();
        let (_, s) = m.subcommand().unwrap();
        assert_eq!(s.get_one::<String>("data_dir").unwrap(), "/d");
        assert_eq!(s.get_one::<String>("listen").unwrap(), "b");
        assert!(s.get_flag("plain"));
        assert_eq!(s.get_many::<String>("files").unwrap().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(m.get_one::<String>("top").unwrap(), "3");
        let m = f.apply(cmd()).unwrap().try_get_matches_from(["t", "serve", "--listen", "c"]).unwrap();
        assert_eq!(m.subcommand().unwrap().1.get_one::<String>("listen").unwrap(), "c");
        let m =
            file("").apply(cmd()).unwrap().try_get_matches_from(["t", "serve", "--data-dir", "e"]).unwrap();
        assert_eq!(m.subcommand().unwrap().1.get_one::<String>("listen").unwrap(), "a");
    }

    #[test]
    fn what_the_file_cannot_say_is_refused_by_name() {
        assert!(refusal("lisen = \"x\"").contains("unknown setting 'lisen'"));
        assert!(refusal("data_dir = \"x\"").contains("'data-dir'"));
        assert!(refusal("plain = \"yes\"").contains("switch"));
        assert!(refusal("listen = true").contains("takes a value"));
        assert!(refusal("listen = [\"a\", \"b\"]").contains("one value"));
        assert!(refusal("[serve]\nlisten = \"a\"").contains("no sections"));
        assert!(refusal("regulations-changed = true").contains("command line"));
        assert!(ConfigFile::parse(Path::new("k.toml"), "listen = ").is_err());
    }

    #[test]
    fn every_setting_of_the_daemon_can_be_named() {
        // The real command: each setting the README's example file uses is a flag of `serve`.
        let f = file(
            "data-dir = \"/var/lib/khlang\"\nlisten = \"127.0.0.1:7420\"\nlog-format = \"json\"\n\
             metrics-listen = \"127.0.0.1:9420\"\npid-file = \"/run/k.pid\"\nauth-max-failures = 5",
        );
        f.apply(crate::Cli::command()).unwrap();
    }

    #[test]
    fn the_file_is_found_by_flag_or_environment() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(named_in(&args(&["k", "--config", "a.toml", "serve"])), Some("a.toml".into()));
        assert_eq!(named_in(&args(&["k", "serve", "--config=b.toml"])), Some("b.toml".into()));
    }
}

/// Any text with the passwords in it masked: a URL's `user:password@` (every scheme) and a
/// keyword setting's `password=…` (libpq's form). Used on every setting `config check` prints
/// and on every error line the daemon prints, since a TOML or argument error quotes the text it
/// could not take.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@').and_then(|user_end| authority[..user_end].find(':').map(|c| (c, user_end)))
        {
            Some((colon, user_end)) => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[user_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    scrub_keywords(&out)
}

/// `password=secret`, `password = 'secret'` (any case, `pass`/`passwd`/`password`): the value
/// masked.
fn scrub_keywords(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let word = ["password", "passwd", "pass"].into_iter().find(|w| lower[i..].starts_with(w));
        let boundary = i == 0 || !lower.as_bytes()[i - 1].is_ascii_alphanumeric();
        if let (Some(w), true) = (word, boundary) {
            let mut j = i + w.len();
            let bytes = text.as_bytes();
            while j < text.len() && bytes[j] == b' ' {
                j += 1;
            }
            if j < text.len() && bytes[j] == b'=' {
                j += 1;
                while j < text.len() && bytes[j] == b' ' {
                    j += 1;
                }
                let quote = (j < text.len() && (bytes[j] == b'\'' || bytes[j] == b'"')).then(|| bytes[j]);
                let start = if quote.is_some() { j + 1 } else { j };
                let mut k = start;
                while k < text.len()
                    && !match quote {
                        Some(q) => bytes[k] == q,
                        None => bytes[k].is_ascii_whitespace() || bytes[k] == b'&' || bytes[k] == b'"',
                    }
                {
                    k += 1;
                }
                out.push_str(&text[i..start]);
                out.push_str("***");
                i = k;
                continue;
            }
        }
        let c = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + c]);
        i += c;
    }
    out
}

#[cfg(test)]
mod scrub_tests {
    use super::scrub;

    #[test]
    fn passwords_are_masked_wherever_they_appear() {
        for (text, shows) in [
            ("postgres://khlang:hunter2@db/khlang", "postgres://khlang:***@db/khlang"),
            ("syslog+tls://u:p%40ss@host:6514", "syslog+tls://u:***@host:6514"),
            ("host=db user=k password=hunter2 dbname=x", "host=db user=k password=*** dbname=x"),
            (
                "postgres://db/x?user=k&password=hunter2&sslmode=require",
                "postgres://db/x?user=k&password=***&sslmode=require",
            ),
            ("PASSWORD = 'a b c' host=x", "PASSWORD = '***' host=x"),
            (
                "invalid value 'postgres://u:hunter2@h' for '--listen'",
                "invalid value 'postgres://u:***@h' for '--listen'",
            ),
            ("http://127.0.0.1:7070 and file:///var/log/x", "http://127.0.0.1:7070 and file:///var/log/x"),
            ("passenger=1 compass=2", "passenger=1 compass=2"),
        ] {
            assert_eq!(scrub(text), shows, "{text}");
        }
    }
}
