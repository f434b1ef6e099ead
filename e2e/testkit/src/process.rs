//! Private server processes, for tests that kill or restart a server under the code they
//! test. Each listens on a free loopback port and keeps its data in a temporary directory;
//! dropping it kills the process and removes the data.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::KitError;

fn free_port() -> Result<u16, KitError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| KitError::Process(format!("finding a free port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| KitError::Process(e.to_string()))
}

/// Waits until something accepts connections on the port, or the child exits.
fn wait_for_port(child: &mut Child, port: u16, what: &str, log: &Path) -> Result<(), KitError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(KitError::Process(format!("{what} exited at start ({status}):\n{log}")));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(KitError::Process(format!("{what} did not listen on port {port} within 30 s")))
}

fn find_program(name: &str, candidates: &[&str]) -> Result<PathBuf, KitError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates.iter().map(PathBuf::from).chain(from_path).find(|p| p.is_file()).ok_or_else(|| {
        KitError::Process(format!("{name} is not installed; `scripts/test --services-only` installs it"))
    })
}

fn log_file(dir: &Path, name: &str) -> Result<(std::fs::File, PathBuf), KitError> {
    let path = dir.join(name);
    let file =
        std::fs::File::create(&path).map_err(|e| KitError::Process(format!("creating {}: {e}", path.display())))?;
    Ok((file, path))
}

/// Starts a server in a process group of its own, its output in `<dir>/<name>.log`, and
/// waits until it listens on `port`.
fn spawn_server(mut command: Command, dir: &Path, name: &str, port: u16) -> Result<Child, KitError> {
    let (log, log_path) = log_file(dir, &format!("{name}.log"))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| KitError::Process(e.to_string()))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| KitError::Process(format!("starting {name}: {e}")))?;
    wait_for_port(&mut child, port, name, &log_path)?;
    Ok(child)
}

/// Kills the child's whole process group at once (SIGKILL), as a crash would: a server's
/// own children (Postgres backends, or the server under `runuser`) go with it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A private `nats-server` with JetStream, on a port of its own.
#[derive(Debug)]
pub struct NatsProcess {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl NatsProcess {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Result<Self, KitError> {
        let dir = tempfile::tempdir().map_err(|e| KitError::Process(e.to_string()))?;
        let mut server = Self { port: free_port()?, dir, child: None };
        server.restart()?;
        Ok(server)
    }

    /// URL of the server; it stays the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same port with the same JetStream store, killing it
    /// first if it runs.
    pub fn restart(&mut self) -> Result<(), KitError> {
        self.kill();
        let program = find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])?;
        let mut command = Command::new(program);
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path().join("jetstream"));
        self.child = Some(spawn_server(command, self.dir.path(), "nats-server", self.port)?);
        Ok(())
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private Postgres cluster (`initdb` + `postgres`), on a port of its own, trusting local
/// connections as the role `postgres`.
#[derive(Debug)]
pub struct PostgresProcess {
    port: u16,
    dir: TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    child: Option<Child>,
}

impl PostgresProcess {
    /// Creates a cluster, starts it and waits until it accepts connections.
    pub fn start() -> Result<Self, KitError> {
        let bin = postgres_bindir()?;
        let dir = tempfile::tempdir().map_err(|e| KitError::Process(e.to_string()))?;
        // Postgres refuses to run as root; as root, run it as the `postgres` user.
        let run_as = running_as_root(dir.path()).then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .args(["-R", &format!("{user}:"), &dir.path().to_string_lossy()])
                .status()
                .map_err(|e| KitError::Process(format!("chown: {e}")))?;
            if !status.success() {
                return Err(KitError::Process(format!("chown of the data directory to {user} failed")));
            }
        }
        let mut server = Self { port: free_port()?, dir, bin, run_as, child: None };
        let data = server.data_dir();
        let out = server
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .map_err(|e| KitError::Process(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(KitError::Process(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        server.restart()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// URL of the `postgres` database as the `postgres` role; it stays the same across restarts.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same port and data, killing it first if it runs.
    pub fn restart(&mut self) -> Result<(), KitError> {
        self.kill();
        // A killed postmaster leaves its lock file; Postgres takes it over only once the
        // PID in it is gone, which can take a moment after SIGKILL.
        let pid = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned));
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let socket_dir = self.dir.path().to_string_lossy().into_owned();
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k", &socket_dir])
            .args(["-c", "fsync=off", "-c", "max_connections=50"]);
        self.child = Some(spawn_server(command, self.dir.path(), "postgres", self.port)?);
        Ok(())
    }
}

impl Drop for PostgresProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running_as_root(probe_dir: &Path) -> bool {
    std::fs::metadata(probe_dir).is_ok_and(|m| m.uid() == 0)
}

/// The directory holding `initdb` and `postgres`: `VELLUM_TEST_PG_BINDIR`, or the newest
/// Debian installation under `/usr/lib/postgresql`.
fn postgres_bindir() -> Result<PathBuf, KitError> {
    if let Some(dir) = std::env::var_os("VELLUM_TEST_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| KitError::Process("Postgres server binaries not found under /usr/lib/postgresql; `scripts/test --services-only` installs them, or set VELLUM_TEST_PG_BINDIR".into()))?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| KitError::Process("no Postgres with initdb under /usr/lib/postgresql".into()))
}
