//! Throughput benchmark of the gateway against the physical limits next to it, measured
//! side by side in one run (this machine is shared and noisy: the ratios are what count).
//!
//! 1. Upload of one large document (1 GiB by default) as a raw streaming body, against a
//!    raw file copy of the same bytes on the same disk; the gateway's peak memory (VmHWM)
//!    during the upload.
//! 2. Download of it to a file, against the same raw copy.
//! 3. Metadata reads (`GET /api/v1/documents/{id}` with a JWT) per second with p50 and p99
//!    latency, against `pgbench -S` (primary-key SELECTs) on the same Postgres with the
//!    same number of clients: cached (answered from the gateway's metadata cache, the goal
//!    being faster than the database can answer) and uncached (`Cache-Control: no-cache`:
//!    each read goes to the database, and refreshes the cached entry). Each reader is one
//!    keep-alive connection of hyper's bare HTTP/1 client, as each of pgbench's clients is
//!    one connection of libpq; the readers share one thread (pgbench has two).
//! 4. The same cached reads against a bare HTTP peer: a hyper server in a process of its own
//!    answering the same JSON body to every request (no JWT, no lookup), the cost of an
//!    HTTP exchange itself on this machine.
//! 5. The CPU a read costs each process (the gateway, Postgres, the client; sampled from
//!    `/proc` in the middle of each read phase), and the bound it sets: how fast uncached
//!    reads could go against `pgbench -S` if the gateway's database access took no CPU,
//!    since the gateway, Postgres and the client share this machine's cores.
//!
//! The gateway is the release `vellum-gateway standalone` binary in its own process, on a
//! fresh Postgres database and a local-file tier. Run:
//!
//! ```sh
//! scripts/test --services-only          # Postgres (and pgbench) if missing
//! cargo bench -p vellum-gateway --bench throughput
//! ```
//!
//! Knobs: `VELLUM_BENCH_BYTES` (document size, default 1073741824), `VELLUM_BENCH_SECONDS`
//! (each read phase, default 10), `VELLUM_BENCH_CLIENTS` (concurrent readers, default 8).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::http;
use futures::StreamExt;

use rand::RngCore;
use vellum_testkit::TestDatabase;

mod support;

use support::{Gateway, knob, memory, mib, percentile};

fn start_gateway(work: &Path, database_url: &str) -> Gateway {
    let config = work.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("tiers.yaml"),
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\n\
         spec: {class: HOT, default: true, backend: {url: 'file://tiers/hot'}, compression: {enabled: true}}\n",
    )
    .unwrap();
    Gateway::start(work, database_url, &["--max-upload-bytes", "1099511627776"])
}

/// Incompressible bytes, written in 1 MiB blocks.
fn make_file(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    let mut rng = rand::rng();
    while left > 0 {
        rng.fill_bytes(&mut block);
        let n = usize::try_from(left.min(block.len() as u64)).unwrap();
        file.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
}

/// Writes dirty pages back, so that each timed phase starts without the previous one's
/// write-back competing with it.
fn settle() {
    let _ = Command::new("sync").status();
}

/// The physical reference: a user-space copy with a 1 MiB buffer, on the same disk.
fn raw_copy(from: &Path, to: &Path) -> Duration {
    settle();
    let started = Instant::now();
    let mut input = std::fs::File::open(from).unwrap();
    let mut output = std::fs::File::create(to).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        output.write_all(&buffer[..n]).unwrap();
    }
    output.flush().unwrap();
    let took = started.elapsed();
    std::fs::remove_file(to).unwrap();
    settle();
    took
}

/// The other reference: coreutils `cp`, which copies inside the kernel where it can.
fn cp(from: &Path, to: &Path) -> Duration {
    settle();
    let started = Instant::now();
    assert!(Command::new("cp").arg(from).arg(to).status().unwrap().success());
    let took = started.elapsed();
    std::fs::remove_file(to).unwrap();
    settle();
    took
}

/// Reads `urls` in turn from `clients` readers for `seconds`, each on one keep-alive
/// connection of its own (as each of pgbench's clients has one): reads per second and
/// the latencies. The client is hyper's bare HTTP/1 connection, and all readers run on
/// one thread of their own (a current-thread runtime), so that the load generator takes as
/// little of the two shared cores as it can, whichever server it measures (spread over a
/// multi-threaded runtime, its wake-ups cross threads and take CPU the server could use).
async fn read_load(urls: &[String], token: &str, cached: bool, knobs: (u64, u64)) -> (f64, Vec<Duration>) {
    let (urls, token) = (urls.to_vec(), token.to_owned());
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(readers(&urls, &token, cached, knobs))
    })
    .await
    .unwrap()
}

async fn readers(urls: &[String], token: &str, cached: bool, (clients, seconds): (u64, u64)) -> (f64, Vec<Duration>) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let urls: Vec<http::Uri> = urls.iter().map(|u| u.parse().unwrap()).collect();
            let authorization = format!("Bearer {token}");
            tokio::spawn(async move {
                let authority = urls[0].authority().unwrap().clone();
                let stream = tokio::net::TcpStream::connect(authority.as_str()).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
                tokio::spawn(connection);
                let mut latencies = Vec::new();
                let mut i = usize::try_from(c).unwrap_or(0);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let mut request = http::Request::get(urls[i % urls.len()].path())
                        .header(http::header::HOST, authority.as_str())
                        .header(http::header::AUTHORIZATION, &authorization);
                    if !cached {
                        request = request.header(http::header::CACHE_CONTROL, "no-cache");
                    }
                    sender.ready().await.unwrap();
                    let response =
                        sender.send_request(request.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap());
                    let response = response.await.unwrap();
                    assert_eq!(response.status(), http::StatusCode::OK);
                    http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
                    latencies.push(t.elapsed());
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    #[allow(clippy::cast_precision_loss)]
    let rate = all.len() as f64 / elapsed;
    (rate, all)
}

/// The environment variable that makes this benchmark's binary the bare HTTP peer: a
/// hyper server (in a process of its own, as the gateway is) that answers every request
/// with the bytes of the file it names, as JSON.
const BARE_SERVER: &str = "VELLUM_BENCH_BARE_SERVER";

/// Serves [`BARE_SERVER`]'s body on a free loopback port, printed on the first line.
async fn bare_server(body: &Path) {
    let body = bytes::Bytes::from(std::fs::read(body).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let response = http::Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(body.clone()));
                async move { response }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The bare HTTP peer, killed when dropped.
struct BarePeer {
    child: std::process::Child,
    base: String,
}

impl BarePeer {
    fn start(body: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(BARE_SERVER, body)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        Self { child, base: format!("http://127.0.0.1:{}", line.trim()) }
    }
}

impl Drop for BarePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pgbench -S` with `clients` clients for `seconds`: transactions per second and the
/// per-transaction latencies from its log.
fn pgbench(database_url: &str, work: &Path, clients: u64, seconds: u64) -> (f64, Vec<Duration>) {
    // The sqlx options in the URL's query mean nothing to libpq.
    let database_url = database_url.split('?').next().unwrap_or(database_url);
    let init = Command::new("pgbench").args(["-i", "-q", "-s", "1", database_url]).output().unwrap();
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let logs = work.join("pgbench-log");
    std::fs::create_dir_all(&logs).unwrap();
    let run = Command::new("pgbench")
        .args(["-S", "-n", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "-l"])
        .arg(format!("--log-prefix={}", logs.join("tx").display()))
        .arg(database_url)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "pgbench -S: {out}{}", String::from_utf8_lossy(&run.stderr));
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{out}"));
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        // client_id transaction_no time_us script_no epoch epoch_us
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok()))
                .map(Duration::from_micros),
        );
    }
    latencies.sort();
    (tps, latencies)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn work_dir() -> PathBuf {
    // Under the target directory: the same disk as the gateway's data directory.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-work");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Results {
    size: u64,
    copy: Duration,
    upload: Duration,
    download: Duration,
    reads: f64,
    latencies: Vec<Duration>,
    uncached: f64,
    uncached_latencies: Vec<Duration>,
    /// The bare HTTP peer: reads per second, latencies, and the size of the body it sent.
    bare: (f64, Vec<Duration>, usize),
    tps: f64,
    pg_latencies: Vec<Duration>,
    peak: u64,
    rss_before: u64,
}

impl Results {
    fn print(&self) {
        let rate = |d: Duration| mib(self.size) / d.as_secs_f64();
        println!();
        println!("{:<34} {:>12} {:>12} {:>8}", "", "vellum", "reference", "ratio");
        println!("  (reference for bytes: the fastest of a buffered copy before, one after, and cp)");
        println!(
            "{:<34} {:>8.0} MiB/s {:>8.0} MiB/s {:>8.2}",
            "upload vs raw copy",
            rate(self.upload),
            rate(self.copy),
            rate(self.upload) / rate(self.copy)
        );
        println!(
            "{:<34} {:>8.0} MiB/s {:>8.0} MiB/s {:>8.2}",
            "download vs raw copy",
            rate(self.download),
            rate(self.copy),
            rate(self.download) / rate(self.copy)
        );
        for (name, reads, latencies) in [
            ("cached metadata reads vs pgbench -S", self.reads, &self.latencies),
            ("uncached reads vs pgbench -S", self.uncached, &self.uncached_latencies),
        ] {
            println!("{name:<34} {reads:>10.0}/s {:>10.0}/s {:>8.2}", self.tps, reads / self.tps);
            for (label, p) in [("  p50 latency", 0.5), ("  p99 latency", 0.99)] {
                println!(
                    "{label:<34} {:>12} {:>12} {:>8.2}",
                    ms(percentile(latencies, p)),
                    ms(percentile(&self.pg_latencies, p)),
                    percentile(latencies, p).as_secs_f64() / percentile(&self.pg_latencies, p).as_secs_f64().max(1e-9)
                );
            }
        }
        let (bare, bare_latencies, body) = &self.bare;
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>8.2}",
            "cached reads vs bare HTTP",
            self.reads,
            bare,
            self.reads / bare
        );
        println!(
            "{:<34} {:>12} {:>12} {:>8.2}",
            "  p50 latency",
            ms(percentile(&self.latencies, 0.5)),
            ms(percentile(bare_latencies, 0.5)),
            percentile(&self.latencies, 0.5).as_secs_f64() / percentile(bare_latencies, 0.5).as_secs_f64().max(1e-9)
        );
        println!("{:<34} {:>10.0}/s {:>10.0}/s {:>8.2}", "bare HTTP vs pgbench -S", bare, self.tps, bare / self.tps);
        println!("  (bare HTTP: a hyper server answering the same {body}-byte JSON, no JWT, no lookup)");
        println!(
            "{:<34} {:>8.1} MiB {:>8.1} MiB {:>8.4}",
            "gateway peak RSS vs document size",
            mib(self.peak),
            mib(self.size),
            mib(self.peak) / mib(self.size)
        );
        println!("  (gateway RSS before the upload: {:.1} MiB)", mib(self.rss_before));
    }
}

/// The CPU time (user and system, in seconds) of every process now, by pid, with its
/// command name, from `/proc/<pid>/stat`.
fn cpu_times(ticks: f64) -> HashMap<u32, (String, f64)> {
    let mut times = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: utime and stime are the 14th and 15th fields.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        times.insert(pid, (stat[open + 1..close].to_owned(), (tick(11) + tick(12)) / ticks));
    }
    times
}

/// The CPU that processes took in the middle of a phase of `seconds`: sampled a second
/// after it starts and a second before it ends, so that a process counts only for the
/// time it ran in between (one that starts or ends in the window counts for none).
struct CpuWindow {
    sampling: std::thread::JoinHandle<CpuSample>,
}

/// What [`CpuWindow`] measured.
struct CpuSample {
    before: HashMap<u32, (String, f64)>,
    after: HashMap<u32, (String, f64)>,
    elapsed: Duration,
}

impl CpuWindow {
    fn start(seconds: u64) -> Self {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        let sampling = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let (before, started) = (cpu_times(ticks), std::time::Instant::now());
            std::thread::sleep(Duration::from_secs(seconds.saturating_sub(2).max(1)));
            CpuSample { before, after: cpu_times(ticks), elapsed: started.elapsed() }
        });
        Self { sampling }
    }

    fn finish(self) -> CpuSample {
        self.sampling.join().unwrap()
    }
}

impl CpuSample {
    /// CPU seconds per second (cores kept busy) of the processes that `role` picks by pid
    /// and command name.
    fn busy(&self, role: impl Fn(u32, &str) -> bool) -> f64 {
        let used: f64 = self
            .after
            .iter()
            .filter(|(pid, (name, _))| role(**pid, name))
            .filter_map(|(pid, (name, after))| {
                self.before.get(pid).filter(|(was, _)| was == name).map(|(_, before)| after - before)
            })
            .sum();
        used / self.elapsed.as_secs_f64()
    }
}

/// Where the CPU of a read goes, phase by phase: the processes serving the reads share
/// this machine's cores, so what each read costs all of them bounds how fast reads go.
struct CpuPerRead {
    gateway: u32,
    /// Each phase's reads per second and the CPU sampled in its middle.
    cached: (f64, CpuSample),
    uncached: (f64, CpuSample),
    pgbench: (f64, CpuSample),
}

impl CpuPerRead {
    /// Microseconds of CPU per read of the gateway, Postgres, the client (this process, or
    /// pgbench), and of every process on the machine.
    fn per_read(&self, (rate, sample): &(f64, CpuSample)) -> [f64; 4] {
        let me = std::process::id();
        let per = |busy: f64| busy / rate * 1e6;
        [
            per(sample.busy(|pid, _| pid == self.gateway)),
            per(sample.busy(|_, name| name == "postgres")),
            per(sample.busy(|pid, name| pid == me || name == "pgbench")),
            per(sample.busy(|_, _| true)),
        ]
    }

    fn print(&self) {
        println!();
        println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "CPU per read, µs", "gateway", "Postgres", "client", "machine");
        let [cached, uncached, pgbench] = [&self.cached, &self.uncached, &self.pgbench].map(|p| self.per_read(p));
        for (name, cpu) in [("  cached reads", cached), ("  uncached reads", uncached), ("  pgbench -S", pgbench)] {
            println!("{name:<34} {:>9.0} {:>9.0} {:>9.0} {:>9.0}", cpu[0], cpu[1], cpu[2], cpu[3]);
        }
        // Were the gateway's database access free (its CPU per read no more than a cached
        // read's), an uncached read would still cost Postgres and the client what it does.
        let bound = (pgbench[1] + pgbench[2]) / (cached[0] + uncached[1] + uncached[2]);
        println!("{:<34} {:>42.2}", "uncached vs pgbench -S, at most", bound);
        println!("  (if the gateway's database access took no CPU: pgbench's CPU per transaction over");
        println!("   a cached read's gateway CPU plus an uncached read's Postgres and client CPU)");
    }
}

/// The metadata URLs the read phases go through: the large document's and those of 31
/// small ones uploaded for them.
async fn documents_to_read(client: &reqwest::Client, gateway: &Gateway, id: i64) -> Vec<String> {
    let mut urls = vec![format!("{}/api/v1/documents/{id}", gateway.url)];
    for i in 0..31 {
        let doc: serde_json::Value = client
            .post(format!("{}/api/v1/documents?filename=small-{i}.txt&tags=bench,t{i}", gateway.url))
            .bearer_auth(&gateway.token)
            .body(format!("small document {i}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        urls.push(format!("{}/api/v1/documents/{}", gateway.url, doc["id"]));
    }
    urls
}

#[tokio::main]
async fn main() {
    if let Some(body) = std::env::var_os(BARE_SERVER) {
        return bare_server(Path::new(&body)).await;
    }
    // `cargo bench` passes `--bench`; a `cargo test --benches` run passes nothing: both run it.
    let size = knob("VELLUM_BENCH_BYTES", 1 << 30);
    let seconds = knob("VELLUM_BENCH_SECONDS", 10);
    let clients = knob("VELLUM_BENCH_CLIENTS", 8);
    let work = work_dir();
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let gateway = start_gateway(&work, &db.url);
    let pid = gateway.child.id();
    let client = reqwest::Client::new();
    println!("vellum gateway throughput: {} MiB document, {clients} readers for {seconds} s each", mib(size));

    let source = work.join("document.bin");
    make_file(&source, size);
    let copy = raw_copy(&source, &work.join("copy.bin"));

    // Upload: a raw streaming body, stored as-is (a zip is not compressed again).
    settle();
    let rss_before = memory(pid, "VmRSS:");
    let file = tokio::fs::File::open(&source).await.unwrap();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    let started = Instant::now();
    let response = client
        .post(format!("{}/api/v1/documents?filename=bench.zip", gateway.url))
        .bearer_auth(&gateway.token)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let uploaded: serde_json::Value = response.json().await.unwrap();
    let upload = started.elapsed();
    assert_eq!(status, reqwest::StatusCode::CREATED, "{uploaded}");
    let peak = memory(pid, "VmHWM:");

    // Download to a file on the same disk.
    settle();
    let id = uploaded["id"].as_i64().unwrap();
    let started = Instant::now();
    let response =
        client.get(format!("{}/api/v1/documents/{id}/content", gateway.url)).bearer_auth(&gateway.token).send().await;
    let mut stream = response.unwrap().bytes_stream();
    let mut out =
        tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(work.join("out.bin")).await.unwrap());
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len() as u64;
        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.unwrap();
    }
    tokio::io::AsyncWriteExt::flush(&mut out).await.unwrap();
    let download = started.elapsed();
    assert_eq!(received, size);
    std::fs::remove_file(work.join("out.bin")).unwrap();
    // The reference is the better of two copies, before and after: the first one may still
    // share the disk with the write-back of the freshly made file.
    let copy = copy.min(raw_copy(&source, &work.join("copy.bin"))).min(cp(&source, &work.join("cp.bin")));
    std::fs::remove_file(&source).unwrap();

    let urls = documents_to_read(&client, &gateway, id).await;
    // The bare HTTP peer answers what the gateway answers for one small document.
    let small = client.get(&urls[1]).bearer_auth(&gateway.token).send().await.unwrap().bytes().await.unwrap();
    std::fs::write(work.join("bare-body.json"), &small).unwrap();
    let bare = BarePeer::start(&work.join("bare-body.json"));
    let bare_urls: Vec<String> = urls.iter().map(|u| u.replacen(&gateway.url, &bare.base, 1)).collect();
    // Uncached first, then cached, then HTTP alone, then the database alone: each phase on
    // the same data.
    let window = CpuWindow::start(seconds);
    let (uncached, uncached_latencies) = read_load(&urls, &gateway.token, false, (clients, seconds)).await;
    let uncached_cpu = window.finish();
    let window = CpuWindow::start(seconds);
    let (reads, latencies) = read_load(&urls, &gateway.token, true, (clients, seconds)).await;
    let cached_cpu = window.finish();
    let (bare_reads, bare_latencies) = read_load(&bare_urls, &gateway.token, true, (clients, seconds)).await;
    drop(bare);
    let window = CpuWindow::start(seconds);
    let (tps, pg_latencies) = pgbench(&db.url, &work, clients, seconds);
    let pgbench_cpu = window.finish();
    let cpu = CpuPerRead {
        gateway: pid,
        cached: (reads, cached_cpu),
        uncached: (uncached, uncached_cpu),
        pgbench: (tps, pgbench_cpu),
    };

    Results {
        size,
        copy,
        upload,
        download,
        reads,
        latencies,
        uncached,
        uncached_latencies,
        bare: (bare_reads, bare_latencies, small.len()),
        tps,
        pg_latencies,
        peak,
        rss_before,
    }
    .print();
    cpu.print();
    drop(gateway);
    let _ = std::fs::remove_dir_all(&work);
}
