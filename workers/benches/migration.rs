//! Tier migration throughput against a raw copy between the same two tiers, measured side
//! by side in one run (this machine is shared and noisy: the ratios are what count).
//!
//! Two sets of documents, each uploaded to a local-file HOT tier on a fresh Postgres
//! database, aged past a 30-day transition with a manual clock, then:
//! 1. **raw**: every stored object copied with `object_store` (get, put) from the HOT
//!    directory into a scratch directory on the same disk, with the same concurrency;
//! 2. **migration**: the retention run that moves every blob to the COLD tier (claim, copy,
//!    read back and verify the SHA-256, switch the metadata, collect the source), a batch
//!    at a time. Both tiers are on one file system, so the copy is a hard link made inside
//!    the store (as an S3 CopyObject would be on one bucket): no byte is copied, but every
//!    byte is still read back and hashed, which is why large documents can beat the raw
//!    copy.
//!
//! Reported per set: MB/s and documents/s of both, and migration ÷ raw. Run:
//!
//! ```sh
//! scripts/test --services-only          # Postgres if missing
//! cargo bench -p vellum-workers --bench migration
//! ```
//!
//! Knobs: `VELLUM_BENCH_SMALL` (count, default 10000), `VELLUM_BENCH_SMALL_BYTES` (default
//! 4096), `VELLUM_BENCH_LARGE` (count, default 10), `VELLUM_BENCH_LARGE_BYTES` (default
//! 67108864), `VELLUM_BENCH_CONCURRENCY` (default 8).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rand::RngCore;
use vellum_core::blob::Tiers;
use vellum_core::clock::Clock;
use vellum_core::config::compile_dir;
use vellum_core::documents::{Actor, Documents, Grace, NewDocument};
use vellum_core::retention::DAY_MS;
use vellum_core::store::Metadata;
use vellum_testkit::TestDatabase;
use vellum_workers::retention::{RunSettings, run_policy};

const CONFIG: &str = r"
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: hot}
spec: {class: HOT, default: true, backend: {url: 'file://tiers/hot'}}
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: cold}
spec: {class: COLD, backend: {url: 'file://tiers/cold'}}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: cool-down}
spec:
  transitions: [{afterDays: 30, toTier: cold}]
";

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

struct Outcome {
    docs: u64,
    bytes: u64,
    raw: Duration,
    migration: Duration,
}

async fn measure(work: &Path, count: u64, size: u64, concurrency: usize) -> Outcome {
    std::fs::create_dir_all(work.join("config")).unwrap();
    std::fs::write(work.join("config/platform.yaml"), CONFIG).unwrap();
    let (_, config, secrets) = compile_dir(&work.join("config")).unwrap();
    let tiers = Tiers::open(&config, &secrets, work).unwrap();
    let db = TestDatabase::new().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let clock = Clock::manual(1_767_225_600_000);
    let docs = Arc::new(Documents::new(meta, tiers, clock.clone(), None, u64::MAX));

    let uploads = futures::stream::iter(0..count)
        .map(|n| {
            let docs = Arc::clone(&docs);
            async move {
                let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
                rand::rng().fill_bytes(&mut bytes);
                let actor = Actor { user: "bench".into(), admin: false };
                let new = NewDocument { filename: format!("doc-{n}.bin"), ..NewDocument::default() };
                docs.upload(&actor, new, vellum_core::blob::once(Bytes::from(bytes))).await.unwrap();
            }
        })
        .buffer_unordered(8);
    uploads.collect::<()>().await;
    clock.advance(31 * DAY_MS);

    // Raw: the same objects, hot directory to a scratch directory on the same disk.
    let hot = docs.tiers().get("hot").unwrap();
    let scratch = work.join("tiers/raw");
    std::fs::create_dir_all(&scratch).unwrap();
    let raw_store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&scratch).unwrap());
    let objects: Vec<_> = hot.store().list(None).try_collect().await.unwrap();
    let started = Instant::now();
    futures::stream::iter(objects)
        .map(|object| {
            let (from, to) = (Arc::clone(hot.store()), Arc::clone(&raw_store));
            async move {
                let bytes = from.get(&object.location).await.unwrap().bytes().await.unwrap();
                to.put(&object.location, PutPayload::from(bytes)).await.unwrap();
            }
        })
        .buffer_unordered(concurrency)
        .collect::<()>()
        .await;
    let raw = started.elapsed();
    std::fs::remove_dir_all(&scratch).unwrap();

    let settings = RunSettings { batch: 500, concurrency, grace: Grace { source_ms: 0, ..Grace::default() } };
    let started = Instant::now();
    let report = run_policy(&docs, &config, "cool-down", settings, &|_| {}).await.unwrap();
    let migration = started.elapsed();
    assert_eq!((report.transitioned, report.errors), (i64::try_from(count).unwrap(), 0), "{report:?}");
    Outcome { docs: count, bytes: count * size, raw, migration }
}

#[allow(clippy::cast_precision_loss)]
fn print(label: &str, o: &Outcome) {
    let rate = |d: Duration| (mb(o.bytes) / d.as_secs_f64(), o.docs as f64 / d.as_secs_f64());
    let (raw_mb, raw_docs) = rate(o.raw);
    let (mig_mb, mig_docs) = rate(o.migration);
    println!("{label}: {} documents, {:.1} MB", o.docs, mb(o.bytes));
    println!("  raw copy   {:>9.1} MB/s {:>9.0} docs/s   ({:.2} s)", raw_mb, raw_docs, o.raw.as_secs_f64());
    println!("  migration  {:>9.1} MB/s {:>9.0} docs/s   ({:.2} s)", mig_mb, mig_docs, o.migration.as_secs_f64());
    println!("  migration / raw: {:.2}", o.raw.as_secs_f64() / o.migration.as_secs_f64());
}

fn main() {
    let concurrency = usize::try_from(knob("VELLUM_BENCH_CONCURRENCY", 8)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    runtime.block_on(async {
        let small = measure(
            &work.path().join("small"),
            knob("VELLUM_BENCH_SMALL", 10_000),
            knob("VELLUM_BENCH_SMALL_BYTES", 4096),
            concurrency,
        )
        .await;
        print("small documents", &small);
        let large = measure(
            &work.path().join("large"),
            knob("VELLUM_BENCH_LARGE", 10),
            knob("VELLUM_BENCH_LARGE_BYTES", 64 << 20),
            concurrency,
        )
        .await;
        print("large documents", &large);
    });
}
