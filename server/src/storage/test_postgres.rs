//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` from the installed server
//! binaries into a temporary folder, on a free loopback port, run as the `postgres` user when the
//! tests run as root (PostgreSQL refuses to run as root). Stopped and removed on drop, so also
//! when the test panics.
//!
//! Without server binaries a test skips with a loud message, unless `KHLANG_REQUIRE_POSTGRES=1`
//! (set by `.ci/run`), which makes a missing server fail the test.

// A test harness: a cluster that cannot be set up fails the test that asked for it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that turns a missing PostgreSQL into a failure.
pub const REQUIRE_POSTGRES: &str = "KHLANG_REQUIRE_POSTGRES";

/// The cluster's superuser (trust authentication, loopback only).
const SUPERUSER: &str = "khlang";

/// A running cluster; dropped, it is stopped and its folder removed.
pub struct TestPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<String>,
    databases: AtomicU32,
    /// Whether the server was given a certificate (`ssl = on`).
    tls: bool,
}

impl std::fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPostgres").field("port", &self.port).finish_non_exhaustive()
    }
}

/// The folder holding `pg_ctl` and `initdb`: `KHLANG_PG_BIN`, then `PATH`, then Debian's
/// `/usr/lib/postgresql/<newest>/bin`.
fn server_binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KHLANG_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let has =
        |d: &Path| d.join("pg_ctl").is_file() && d.join("initdb").is_file() && d.join("postgres").is_file();
    // A folder on PATH may hold only links to a few of them (pg_dump, pg_basebackup elsewhere):
    // the binaries' own folder is where `pg_ctl` really lives.
    if let Some(path) = std::env::var_os("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has(d))
    {
        return std::fs::canonicalize(d.join("pg_ctl")).ok().and_then(|p| p.parent().map(Path::to_path_buf));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A fresh, empty folder for a cluster, owned by the user the server runs as.
fn cluster_folder(name: &str, run_as: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("khlang-pg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the cluster's folder");
    if let Some(user) = run_as {
        let status = Command::new("chown").arg(format!("{user}:")).arg(&dir).status().expect("chown");
        assert!(status.success(), "chown {user} {}", dir.display());
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl TestPostgres {
    /// Starts a cluster, or returns `None` (after saying so on stderr) when no server is installed
    /// and `KHLANG_REQUIRE_POSTGRES` is not set. Panics when the server is installed but will not
    /// start, or is required and missing.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, None)
    }

    /// Like [`TestPostgres::start`], serving TLS with this certificate and key (PEM).
    pub fn start_tls(test: &str, cert_pem: &str, key_pem: &str) -> Option<Self> {
        Self::start_with(test, Some((cert_pem, key_pem)))
    }

    fn start_with(test: &str, tls: Option<(&str, &str)>) -> Option<Self> {
        let Some(bin) = server_binaries() else {
            if std::env::var_os(REQUIRE_POSTGRES).is_some_and(|v| v == "1") {
                panic!("{test}: PostgreSQL server binaries not found and {REQUIRE_POSTGRES}=1");
            }
            eprintln!(
                "\n*** SKIPPED {test}: no PostgreSQL server binaries (install Debian's `postgresql`, \
                 or set KHLANG_PG_BIN); set {REQUIRE_POSTGRES}=1 to make this a failure ***\n"
            );
            return None;
        };
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = cluster_folder(&format!("{}", CLUSTERS.fetch_add(1, Ordering::Relaxed)), run_as.as_deref());
        let mut cluster =
            Self { bin, dir, port: 0, run_as, databases: AtomicU32::new(0), tls: tls.is_some() };
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = cluster.dir.join(name);
                std::fs::write(&path, pem).expect("write the server's certificate");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
                if cluster.run_as.is_some() {
                    let status = Command::new("chown").arg("postgres:").arg(&path).status().expect("chown");
                    assert!(status.success(), "chown postgres {}", path.display());
                }
            }
        }
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
            ],
        );
        // A port can be taken between choosing and binding it: try a few.
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.start_server() {
                return Some(cluster);
            }
        }
        let log = std::fs::read_to_string(cluster.dir.join("log")).unwrap_or_default();
        panic!("PostgreSQL did not start; its log:\n{log}");
    }

    fn start_server(&self) -> bool {
        let data = self.dir.join("data");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        if self.tls {
            let (cert, key) = (self.dir.join("server.crt"), self.dir.join("server.key"));
            options +=
                &format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", cert.display(), key.display());
        }
        let log = self.dir.join("log");
        self.try_run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint, WAL replayed at the
    /// next start).
    pub fn crash(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "stop".as_ref()],
        );
    }

    /// Starts the server again on the same port after [`TestPostgres::crash`].
    pub fn restart(&self) {
        assert!(self.start_server(), "PostgreSQL did not restart");
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`) on a port of its own, made
    /// synchronous: from when this returns, the primary acknowledges a commit only once the
    /// standby has it (`synchronous_standby_names = '*'`, `synchronous_commit = on`).
    pub async fn synchronous_replica(&self) -> TestPostgres {
        let replica = self.base_backup("replica", true);
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.expect("connect");
        let conn = tokio::spawn(connection);
        // Up to 10 s for a standby that the condition holds for.
        let standby = |condition: &'static str| {
            let client = &client;
            async move {
                for _ in 0..200 {
                    let sql = format!("SELECT count(*) FROM pg_stat_replication WHERE {condition}");
                    let n: i64 = client.query_one(&sql, &[]).await.expect("pg_stat_replication").get(0);
                    if n > 0 {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                false
            }
        };
        assert!(standby("state = 'streaming'").await, "the replica never streamed");
        // Two statements, not one batch: ALTER SYSTEM refuses to run in a transaction block.
        client
            .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .await
            .expect("make it synchronous");
        client.batch_execute("SELECT pg_reload_conf()").await.expect("reload the primary's configuration");
        assert!(standby("sync_state = 'sync'").await, "the replica never became synchronous");
        drop(client);
        let _ = conn.await;
        replica
    }

    /// A copy of this running cluster by `pg_basebackup -X stream` (the documented backup of a
    /// vault on PostgreSQL), started on a port of its own: with `standby`, as a streaming standby
    /// (`-R`); otherwise as a cluster of its own, what a restore of that backup is.
    pub fn base_backup(&self, name: &str, standby: bool) -> TestPostgres {
        static COPIES: AtomicU32 = AtomicU32::new(0);
        let dir = cluster_folder(
            &format!("{name}-{}", COPIES.fetch_add(1, Ordering::Relaxed)),
            self.run_as.as_deref(),
        );
        let mut copy = TestPostgres {
            bin: self.bin.clone(),
            dir,
            port: 0,
            run_as: self.run_as.clone(),
            databases: AtomicU32::new(self.databases.load(Ordering::Relaxed)),
            tls: false,
        };
        let data = copy.dir.join("data");
        let port = self.port.to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "-h".as_ref(),
            "127.0.0.1".as_ref(),
            "-p".as_ref(),
            port.as_ref(),
            "-U".as_ref(),
            SUPERUSER.as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-X".as_ref(),
            "stream".as_ref(),
            "-c".as_ref(),
            "fast".as_ref(),
            "--no-sync".as_ref(),
        ];
        if standby {
            args.push("-R".as_ref());
        }
        copy.run("pg_basebackup", &args);
        let mut started = false;
        for _ in 0..5 {
            copy.port = free_port();
            if copy.start_server() {
                started = true;
                break;
            }
        }
        assert!(started, "the copy made by pg_basebackup did not start");
        copy
    }

    /// Database `name`, created if it does not exist yet (synchronously, with `createdb`); its
    /// connection string. The same name gives the same database, so a test that restarts a
    /// vault on one folder finds it again.
    pub fn ensure_database(&self, name: &str) -> String {
        let port = self.port.to_string();
        let out = self
            .command(
                "createdb",
                &[
                    "-h".as_ref(),
                    "127.0.0.1".as_ref(),
                    "-p".as_ref(),
                    port.as_ref(),
                    "-U".as_ref(),
                    SUPERUSER.as_ref(),
                    name.as_ref(),
                ],
            )
            .output()
            .expect("createdb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() || err.contains("already exists"), "createdb {name}: {err}");
        self.url(name)
    }

    /// For a cluster that lives as long as the test process (a `static`, never dropped): a
    /// watchdog process stops and removes it once this process has exited, however it exits.
    pub fn stop_when_this_process_exits(&self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match &self.run_as {
            Some(user) => {
                format!("runuser -u {user} -- {} -D {} -m immediate stop", pg_ctl.display(), data.display())
            }
            None => format!("{} -D {} -m immediate stop", pg_ctl.display(), data.display()),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        // Never waited for: it must outlive this process (its parent), which is what it watches.
        #[allow(clippy::zombie_processes)]
        let _watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the cluster's watchdog");
    }

    /// Whether PostgreSQL server binaries are installed (see [`TestPostgres::start`]).
    pub fn available() -> bool {
        server_binaries().is_some()
    }

    /// Promotes a standby to primary (waits until it accepts writes).
    pub fn promote(&self) {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D".as_ref(), data.as_os_str(), "-w".as_ref(), "promote".as_ref()]);
    }

    fn command(&self, program: &str, args: &[&std::ffi::OsStr]) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe).args(args);
                c
            }
            None => {
                let mut c = Command::new(exe);
                c.args(args);
                c
            }
        }
    }

    fn try_run(&self, program: &str, args: &[&std::ffi::OsStr]) -> bool {
        self.command(program, args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
        let out = self.command(program, args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The cluster's folder (its `log` file among others).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server binaries' folder (`pg_dump`, `pg_basebackup` beside `pg_ctl`).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The connection string of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database; its connection string.
    pub async fn database(&self) -> String {
        let name = format!("vault{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.expect("connect");
        let conn = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        drop(client);
        let _ = conn.await;
        self.url(&name)
    }

    /// Everything database `db` holds, as `pg_dump` prints it.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", SUPERUSER, db])
            .output()
            .expect("pg_dump");
        assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.try_run(
            "pg_ctl",
            &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "stop".as_ref()],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
