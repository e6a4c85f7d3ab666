//! Test harness: start a real vault server on 127.0.0.1:0 over a temporary data folder, talk to it
//! with the real client library or the real binaries.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure here is a test failure

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use khlang_client::Client;
use khlang_keys::SealParams;
use std::collections::BTreeMap;

use khlang_server::policy::regulations::{Regulations, SAMPLE};
use khlang_server::{AuthLimits, Vault, VaultError, VaultOptions, api};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const PASSPHRASE: &str = "test passphrase: correct horse battery staple";

/// Test binaries whose name starts so run the same end-to-end tests on PostgreSQL: each
/// `tests/on_postgres_<suite>.rs` includes `<suite>.rs` whole, and the harness's vaults then
/// live in databases of one throwaway cluster per test process instead of sled.
const ON_POSTGRES_PREFIX: &str = "on_postgres_";

/// Whether this test binary runs its vaults on PostgreSQL (see [`ON_POSTGRES_PREFIX`]).
pub fn on_postgres() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().starts_with(ON_POSTGRES_PREFIX)))
            .unwrap_or(false)
    })
}

/// Waits (up to 3 s) until the server's health for `service` ("" for the server as a whole) is
/// `serving` or not; returns whether it got there.
pub async fn health_becomes(url: &str, service: &str, serving: bool) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let want = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for _ in 0..60 {
        let got =
            client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status();
        if got == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Ends a test at once on PostgreSQL, saying why: it edits or reads sled's own files (the
/// PostgreSQL tests in `tests/postgres.rs` attack the database's rows instead).
#[macro_export]
macro_rules! sled_only {
    ($why:expr) => {
        if $crate::on_postgres() {
            eprintln!("not run on PostgreSQL: {}", $why);
            return;
        }
    };
}

/// The store of the (stopped) vault in `dir`, as the harness's options put it: sled in the
/// folder, or the folder's database on PostgreSQL.
pub async fn open_store(dir: &Path) -> Box<dyn khlang_server::storage::Storage> {
    use khlang_server::storage::{Durability, PgStore, SledStore};
    if on_postgres() {
        Box::new(PgStore::connect(&postgres_for(dir)).await.expect("connect to the folder's database"))
    } else {
        Box::new(SledStore::open(dir, Durability::PerRequest).expect("open the folder's sled"))
    }
}

/// The database of the vault in `dir` (PostgreSQL suites), for tests that write it as someone
/// with access to the database would.
pub fn database_url(dir: &Path) -> String {
    postgres_for(dir)
}

/// Runs SQL on the vault's database as someone with write access to it would (attack tests).
pub async fn database_sql(dir: &Path, statements: &str) {
    let (client, conn) = tokio_postgres::connect(&database_url(dir), tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client.batch_execute(statements).await.unwrap_or_else(|e| panic!("{statements}: {e}"));
    drop(client);
    let _ = conn.await;
}

/// The database for the vault in `dir`, on this process's cluster (started at first use, stopped
/// by a watchdog when the process exits). Without server binaries (and without
/// `KHLANG_REQUIRE_POSTGRES=1`, which makes that a failure) the whole binary is skipped: it
/// says so loudly and exits successfully, since its tests are the sled suite's, run again.
fn postgres_for(dir: &Path) -> String {
    use khlang_server::storage::test_postgres::{REQUIRE_POSTGRES, TestPostgres};
    static CLUSTER: std::sync::OnceLock<TestPostgres> = std::sync::OnceLock::new();
    let cluster = CLUSTER.get_or_init(|| {
        if !TestPostgres::available() && std::env::var_os(REQUIRE_POSTGRES).is_none_or(|v| v != "1") {
            eprintln!(
                "\n*** SKIPPED {}: the end-to-end suite on PostgreSQL needs PostgreSQL server binaries \
                 (install Debian's `postgresql`, or set KHLANG_PG_BIN); set {REQUIRE_POSTGRES}=1 to make \
                 this a failure ***\n",
                std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default()
            );
            std::process::exit(0);
        }
        let cluster = TestPostgres::start("end-to-end suite on PostgreSQL").expect("a PostgreSQL cluster");
        cluster.stop_when_this_process_exits();
        cluster
    });
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned()).hash(&mut h);
    cluster.ensure_database(&format!("vault_{:016x}", h.finish()))
}

/// The municipality's sample regulations plus a `tester` role that may do every record operation
/// and read every field in full for `service_delivery`: the record-path tests use it.
pub fn test_regulations() -> String {
    format!(
        "{SAMPLE}
[roles.tester]
description = \"End-to-end tests of the record path\"
operations = [\"write\", \"update\", \"read\", \"delete\", \"list\", \"export\", \"erase\", \"consent\"]
write_fields = [\"*\"]
[[roles.tester.read]]
purposes = [\"service_delivery\"]
fields = [\"*\"]
reveal = \"full\"
"
    )
}

/// The purpose the `tester` role reads for.
pub const PURPOSE: Option<&str> = Some("service_delivery");

/// Canary values: if any of these bytes show up at rest, encryption failed.
pub const CANARY_CARD: &str = "4111111111111111";
pub const CANARY_NAME_TH: &str = "สมหญิง รักษ์ไทย";
pub const CANARY_ADDRESS_TH: &str = "123 หมู่ 4 ตำบลคลัง อำเภอเมือง นครศรีธรรมราช";
pub const CANARY_EMAIL: &str = "somying.canary@example.go.th";

pub fn canary_fields() -> Vec<(&'static str, &'static str)> {
    vec![
        ("card_number", CANARY_CARD),
        ("name", CANARY_NAME_TH),
        ("home_address", CANARY_ADDRESS_TH),
        ("email", CANARY_EMAIL),
    ]
}

/// A running server. Stop it with [`TestServer::stop`] to release the data folder.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The `tester` identity's token.
    pub token: String,
    /// Identity name → token, for `tester` and one identity per sample role (named after it).
    pub tokens: BTreeMap<String, String>,
    /// The regulations file the server reloads from.
    pub regulations_path: PathBuf,
    pub dir: PathBuf,
    vault: Option<Arc<Vault>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl TestServer {
    /// Options for tests: the test regulations (written to `dir/regulations.toml`), and an
    /// authentication-failure limit high enough that tests sending bad tokens are not locked out.
    pub fn options(dir: &Path) -> VaultOptions {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("regulations.toml");
        if !path.exists() {
            std::fs::write(&path, test_regulations()).unwrap();
        }
        let regs = Regulations::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let storage = if on_postgres() {
            khlang_server::StorageLocation::Postgres { url: postgres_for(dir), ca_cert: None }
        } else {
            khlang_server::StorageLocation::Sled
        };
        VaultOptions {
            regulations: Arc::new(regs),
            regulations_path: Some(path),
            auth: AuthLimits { max_failures: 10_000, ..AuthLimits::default() },
            storage,
            ..VaultOptions::default()
        }
    }

    /// Starts (creating if needed) a vault in `dir` with the test options.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, Self::options(dir)).await
    }

    pub async fn start_with(dir: &Path, options: VaultOptions) -> Self {
        Self::start_tls(dir, options, None).await
    }

    pub async fn start_tls(
        dir: &Path,
        options: VaultOptions,
        tls: Option<khlang_server::api::ServerTls>,
    ) -> Self {
        let vault = Vault::open_or_init(dir, PASSPHRASE.as_bytes(), SealParams::MINIMUM, &options)
            .await
            .expect("open test vault");
        Self::serve(dir, options, vault, tls).await
    }

    /// Serves a vault the test opened itself (sealed or not).
    pub async fn start_vault(dir: &Path, options: VaultOptions, vault: Vault) -> Self {
        Self::serve(dir, options, vault, None).await
    }

    async fn serve(
        dir: &Path,
        options: VaultOptions,
        vault: Vault,
        tls: Option<khlang_server::api::ServerTls>,
    ) -> Self {
        let regulations_path = options.regulations_path.clone().unwrap_or_default();
        let mut tokens = BTreeMap::new();
        for role in vault.regulations().roles.keys().filter(|_| !vault.is_sealed()) {
            // A restarted vault keeps its identities; issue a fresh token for each.
            let token = match vault.bootstrap_identity(role, role).await {
                Ok(t) => t,
                Err(_) => match vault.issue_token(role).await {
                    Ok(t) => t,
                    // An identity the store no longer proves genuine (an attack test): no token.
                    Err(VaultError::Storage(khlang_server::StoreError::Unauthentic { .. })) => continue,
                    // An identity the test revoked: it gets no token.
                    Err(VaultError::FailedPrecondition(why)) if why.ends_with("is revoked") => continue,
                    // A damaged store (a bit-flip test): the test reads what it can.
                    Err(e) if e.outcome() == khlang_server::Outcome::DataLoss => continue,
                    Err(e) => panic!("issue token: {e}"),
                },
            };
            tokens.insert(role.clone(), token.expose_secret().to_owned());
        }
        let token = tokens.get("tester").cloned().unwrap_or_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let vault = Arc::new(vault);
        let serving = vault.clone();
        let handle = tokio::spawn(async move {
            // As the daemon does: key jobs beside serving, the final flush after it.
            let key_jobs = khlang_server::vault::keyops::spawn_key_jobs(&serving);
            api::serve(serving.clone(), listener, tls, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
            key_jobs.stop().await;
            serving.shut_down().await.ok();
        });
        Self {
            addr,
            token,
            tokens,
            regulations_path,
            dir: dir.to_owned(),
            vault: Some(vault),
            shutdown: Some(tx),
            handle,
        }
    }

    /// Every audit entry the vault's log holds, oldest first.
    pub fn audit_entries(&self) -> Vec<khlang_server::audit::AuditEntry> {
        self.vault()
            .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(
                khlang_server::audit::AuditFilter::default(),
            ))
            .map(Result::unwrap)
            .collect()
    }

    /// The vault behind the server, for white-box checks (flush counts).
    pub fn vault(&self) -> &Vault {
        self.vault.as_ref().unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url(), &self.token).await.expect("connect")
    }

    pub async fn client_with_token(&self, token: &str) -> Client {
        Client::connect(&self.url(), token).await.expect("connect")
    }

    /// A client acting as the identity named after a sample role (e.g. "billing-clerk").
    pub async fn client_as(&self, identity: &str) -> Client {
        let token = self.tokens.get(identity).unwrap_or_else(|| panic!("no identity '{identity}'"));
        self.client_with_token(token).await
    }

    /// The second key administrator ("key-admin-2", created on first use) that approves requests.
    pub async fn second_admin(&self) -> Client {
        let vault = self.vault.as_ref().expect("serving");
        let token = match vault.bootstrap_identity("key-admin-2", "key-admin").await {
            Ok(t) => t,
            Err(_) => vault.issue_token("key-admin-2").await.expect("issue token"),
        };
        self.client_with_token(token.expose_secret()).await
    }

    /// Creates an identity through the two-person rule: "key-admin" requests it, "key-admin-2"
    /// approves it. Returns the new identity's token.
    pub async fn approved_identity(&self, name: &str, role: &str) -> String {
        let mut admin = self.client_as("key-admin").await;
        let request = admin.create_identity(name, role).await.expect("request").pending().expect("pending");
        let token = self.second_admin().await.approve_identity(&request.id).await.expect("approve");
        token.expose_secret().to_owned()
    }

    /// Stops serving and waits until the vault (and its database lock) is released: connection
    /// tasks the server spawned hold the vault until they wind down, a moment after `serve` returns.
    pub async fn stop(mut self) {
        let released = self.vault.as_ref().map(|v| v.released());
        self.vault.take();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.await.expect("server task");
        if let Some(rx) = released {
            let waited = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
                .await
                .expect("waiting for the vault");
            assert!(
                matches!(waited, Err(mpsc::RecvTimeoutError::Disconnected)),
                "the vault is still held 20 s after the server stopped"
            );
        }
    }
}

/// Path of a workspace binary (`khlang`, `khlangd`), built by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

/// Copies every file under `from` to the same place under `to` (a data folder, as a backup would).
pub fn copy_tree(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

/// Whether `haystack` contains `needle` anywhere.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A running `khlangd`, killed when dropped, so a failing test leaves no server behind.
pub struct Daemon(pub Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `khlangd` with stderr piped, and waits for the address it logs.
pub fn spawn_khlangd(args: &[&str]) -> (Daemon, Result<String, String>) {
    let (child, url, _log) = spawn_khlangd_logged(args, "info");
    (child, url)
}

/// Like [`spawn_khlangd`], also returning the receiver of the whole log (sent when stderr closes).
pub fn spawn_khlangd_logged(
    args: &[&str],
    level: &str,
) -> (Daemon, Result<String, String>, mpsc::Receiver<Result<String, String>>) {
    spawn_khlangd_with(args, level, &[])
}

/// Like [`spawn_khlangd_logged`], with these environment variables set.
pub fn spawn_khlangd_with(
    args: &[&str],
    level: &str,
    env: &[(&str, &str)],
) -> (Daemon, Result<String, String>, mpsc::Receiver<Result<String, String>>) {
    let mut child = Command::new(bin("khlangd"))
        .args(args)
        .envs(env.iter().copied())
        .env("KHLANG_LOG", level)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split(" address=").nth(1) {
                let _ = tx.send(Ok(addr.split_whitespace().next().unwrap_or_default().to_owned()));
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(Err(all));
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| Err("timed out".into()));
    (Daemon(child), addr.map(|a| format!("http://{a}")), rx)
}

/// A token from a development vault's credentials file.
pub fn dev_token(data: &Path, identity: &str) -> String {
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dev-credentials.json")).unwrap()).unwrap();
    creds[identity].as_str().unwrap().to_owned()
}

/// A client whose connection leaves from `local` (any 127.x.y.z works on loopback), so a test can
/// be several addresses at once.
pub async fn client_from(url: &str, local: std::net::IpAddr, token: Option<&str>) -> Client {
    let target: SocketAddr = url.trim_start_matches("http://").parse().expect("a http://ip:port url");
    let connector = tower::service_fn(move |_: tonic::transport::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(local, 0))?;
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("connect");
    Client::with_channel(channel, token).expect("client")
}

/// Two custodians' passphrases for the sealed test vaults.
pub const TWO_CUSTODIANS: [&str; 2] = ["custodian one: mango sticky rice", "custodian two: tom yum goong"];

/// A sealed 2-of-2 vault ([`TWO_CUSTODIANS`]) served with `auth`.
pub async fn sealed_server(dir: &Path, auth: AuthLimits) -> TestServer {
    let options = VaultOptions { auth, ..TestServer::options(dir) };
    let passes: Vec<&[u8]> = TWO_CUSTODIANS.iter().map(|p| p.as_bytes()).collect();
    let vault =
        Vault::init_custodians(dir, 2, &passes, khlang_keys::SealParams::MINIMUM, &options).await.unwrap();
    TestServer::start_vault(dir, options, vault).await
}

/// Runs the `khlang` CLI against `server_url` as the holder of `token`.
pub fn khlang(server_url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(bin("khlang"))
        .args(args)
        .env("KHLANG_ADDR", server_url)
        .env("KHLANG_TOKEN", token)
        .output()
        .unwrap()
}

/// A command's standard output, after checking that it succeeded.
pub fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Writes `pass` to a file of its own in `dir` (for `--passphrase-file`); returns its path.
pub fn write_passphrase(dir: &Path, pass: &str) -> String {
    // Named by the passphrase's own letters: two passphrases never share a file.
    let name: String = pass.chars().filter(char::is_ascii_alphanumeric).collect();
    let path = dir.join(format!("pass-{name}-{}", pass.len()));
    std::fs::write(&path, format!("{pass}\n")).unwrap();
    // khlangd refuses a passphrase file other users could read.
    #[cfg(unix)]
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A valid (Luhn) card number, different for every `n`.
pub fn card_number(n: u64) -> String {
    let body = format!("4{:014}", n);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// Runs `khlangd` with `args` to completion.
pub fn khlangd_cmd(args: &[&str]) -> Output {
    Command::new(bin("khlangd")).args(args).output().unwrap()
}

/// An address on loopback (`127.0.0.N`), parsed.
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// Options with a small failure limit (the harness's default is high so other tests' bad tokens
/// lock nothing).
pub fn strict(dir: &std::path::Path, max_failures: u32) -> khlang_server::VaultOptions {
    khlang_server::VaultOptions {
        auth: khlang_server::AuthLimits { max_failures, ..Default::default() },
        ..TestServer::options(dir)
    }
}

/// Runs the `khlang` CLI against `server_url` with no token (custodians' calls).
pub fn khlang_anon(server_url: &str, args: &[&str]) -> Output {
    Command::new(bin("khlang"))
        .args(args)
        .env("KHLANG_ADDR", server_url)
        .env_remove("KHLANG_TOKEN")
        .output()
        .unwrap()
}

/// Runs an offline `khlangd` command (`verify`, `approve-identity`, ...) on the stopped vault in
/// `dir`, unsealed with the harness's passphrase, on its store (sled, or the folder's database).
pub fn khlangd_offline(dir: &Path, command: &str, more: &[&str]) -> Output {
    let pass = write_passphrase(dir, PASSPHRASE);
    let mut args = vec![command, "--data-dir", dir.to_str().unwrap(), "--passphrase-file", &pass];
    let url = on_postgres().then(|| database_url(dir));
    if let Some(url) = &url {
        args.extend(["--storage", url.as_str()]);
    }
    args.extend_from_slice(more);
    khlangd_cmd(&args)
}
