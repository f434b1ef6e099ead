//! One container run as a local process: in a process group of its own (so that what it
//! starts is stopped with it), in a private mount namespace when it mounts volumes, with
//! the parent-death signal set so that it never outlives the node, and with its output
//! written to a log file in the CRI format a kubelet keeps.

use std::collections::HashSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// A bind mount into the container's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start a container's process.
#[derive(Clone, Debug)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub mounts: Vec<Mount>,
    pub log: PathBuf,
}

/// The process groups of every running container, so that they can be killed together when
/// the node stops.
pub type Groups = Arc<Mutex<HashSet<i32>>>;

/// Kills every group in `groups`.
pub fn kill_all(groups: &Groups) {
    let groups: Vec<i32> = groups.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Whether the node runs as root (else mount namespaces need a user namespace too).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

/// Whether `setpriv` is there to set the parent-death signal (looked up once).
static SETPRIV: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| on_path("setpriv"));

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line that starts a container: `setpriv` sets the parent-death signal (and
/// `unshare` makes the mount namespace and `sh` mounts the volumes first, when there are any).
fn command(launch: &Launch) -> Command {
    let mut argv: Vec<String> = Vec::new();
    if *SETPRIV {
        argv.extend(["setpriv", "--pdeathsig", "KILL", "--"].map(str::to_owned));
    }
    argv.extend(launch.argv.iter().cloned());
    if launch.mounts.is_empty() {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        return cmd;
    }
    let mut script = String::from("set -e\n");
    for m in &launch.mounts {
        let (source, target) = (quote(&m.source.to_string_lossy()), quote(&m.target.to_string_lossy()));
        let _ = writeln!(script, "mount --bind {source} {target}");
        if m.read_only {
            let _ = writeln!(script, "mount -o remount,bind,ro {target}");
        }
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"]);
    if !is_root() {
        cmd.arg("--map-root-user");
    }
    cmd.args(["--", "sh", "-c", &script, "sh"]).args(&argv);
    cmd
}

/// A running container process.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pgid: i32,
    groups: Groups,
    output: Option<JoinHandle<()>>,
    exited: Option<i32>,
}

impl Process {
    /// Starts `launch`, its output appended to its log file.
    pub async fn spawn(launch: &Launch, groups: &Groups) -> std::io::Result<Self> {
        if let Some(dir) = launch.log.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let log = tokio::fs::OpenOptions::new().create(true).append(true).open(&launch.log).await?;
        let mut child = command(launch)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).unwrap_or_default();
        groups.lock().unwrap_or_else(PoisonError::into_inner).insert(pgid);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let output = tokio::spawn(write_log(log, stdout, stderr));
        Ok(Self { child, pgid, groups: groups.clone(), output: Some(output), exited: None })
    }

    pub fn pid(&self) -> i32 {
        self.pgid
    }

    /// Waits for the process to end; its exit code, or 128 + the signal that ended it.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.exited {
            return code;
        }
        let code = match self.child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
            }
            Err(_) => -1,
        };
        // What the container started goes with it, as when a container's init ends.
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.pgid);
        if let Some(output) = self.output.take() {
            let _ = output.await;
        }
        self.exited = Some(code);
        code
    }

    /// Stops the container as a kubelet does: SIGTERM, then SIGKILL once `grace` has passed.
    pub async fn terminate(&mut self, grace: Duration) -> i32 {
        if self.exited.is_none() {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
                let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            }
        }
        self.wait().await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            self.groups.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.pgid);
        }
    }
}

/// A log line as the CRI writes it: `<RFC 3339 nano timestamp> <stream> F <line>`.
fn cri_line(stream: &str, line: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let ts = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    format!("{ts} {stream} F {line}\n")
}

async fn pump(stream: &'static str, reader: Option<impl AsyncRead + Unpin>, tx: tokio::sync::mpsc::Sender<String>) {
    let Some(reader) = reader else { return };
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                if tx.send(cri_line(stream, text.trim_end_matches(['\n', '\r']))).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Copies the container's stdout and stderr, line by line, into its log file.
async fn write_log(
    mut log: tokio::fs::File,
    stdout: Option<impl AsyncRead + Unpin>,
    stderr: Option<impl AsyncRead + Unpin>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let pumps = futures::future::join(pump("stdout", stdout, tx.clone()), pump("stderr", stderr, tx));
    let write = async {
        while let Some(line) = rx.recv().await {
            let _ = log.write_all(line.as_bytes()).await;
        }
        let _ = log.flush().await;
    };
    futures::future::join(pumps, write).await;
}

/// Reads a CRI log file: `(timestamp, line)` per entry.
pub fn read_log(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_log(&text)
}

/// Parses CRI log lines.
pub fn parse_log(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (ts, rest) = l.split_once(' ')?;
            let (_stream, rest) = rest.split_once(' ')?;
            let (_tag, line) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((ts.to_owned(), line.to_owned()))
        })
        .collect()
}
