//! Retention runs against real stores: the seed's schedule applied to the day on local
//! tiers (SQLite) and on S3 tiers (Postgres and an S3-compatible server), archive and
//! restore, noncurrent versions, legal hold, reads during a migration, and a worker killed
//! at every step of a migration.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::Row;
use vellum_core::blob::Tiers;
use vellum_core::clock::Clock;
use vellum_core::config::{PlatformConfig, compile_dir};
use vellum_core::documents::{Actor, Document, Documents, Grace, MigrationStep, NewDocument, library_of, open_shards};
use vellum_core::events::outbox;
use vellum_core::retention::DAY_MS;
use vellum_core::store::Metadata;
use vellum_testkit::{TestBucket, TestDatabase};
use vellum_workers::retention::{RunReport, RunSettings, drain_tier, run_policy};

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

const POLICIES: &str = r"
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: standard-lifecycle}
spec:
  transitions:
    - {afterDays: 30, toTier: warm}
    - {afterDays: 90, toTier: cold}
    - {afterDays: 365, toTier: frozen}
  noncurrentVersions: {keep: 1, expireAfterDays: 180}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: temporary-files}
spec:
  selector: {fileTypes: [tmp, temp]}
  expiration: {afterDays: 30, action: DELETE}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: archive-contracts}
spec:
  selector: {tags: [contract]}
  expiration: {afterDays: 60, action: ARCHIVE}
";

fn tier_yaml(name: &str, class: &str, cost: f64, backend: &str) -> String {
    let default = name == "hot";
    format!(
        "---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: {name}}}\nspec:\n  class: {class}\n  \
         default: {default}\n  costPerGbMonth: {cost}\n  compression: {{enabled: true, level: 3}}\n  backend:\n{backend}\n"
    )
}

const TIERS: [(&str, &str, f64); 4] =
    [("hot", "HOT", 0.023), ("warm", "WARM", 0.01), ("cold", "COLD", 0.004), ("frozen", "FROZEN", 0.001)];

fn local_tiers() -> String {
    TIERS.iter().map(|(n, c, cost)| tier_yaml(n, c, *cost, &format!("    url: file://tiers/{n}"))).collect()
}

fn s3_tiers(bucket: &vellum_testkit::S3Bucket) -> String {
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s3}}\nstringData:\n  aws_access_key_id: '{}'\n  \
         aws_secret_access_key: '{}'\n",
        bucket.access_key, bucket.secret_key
    );
    let tiers: String = TIERS
        .iter()
        .map(|(n, c, cost)| {
            let backend = format!(
                "    url: 's3://{}/{n}'\n    endpoint: '{}'\n    region: '{}'\n    secretRef: {{name: s3}}\n    \
                 options: {{aws_allow_http: 'true', aws_virtual_hosted_style_request: 'false'}}",
                bucket.name, bucket.endpoint, bucket.region
            );
            tier_yaml(n, c, *cost, &backend)
        })
        .collect();
    secret + &tiers
}

struct Platform {
    docs: Documents,
    config: PlatformConfig,
    clock: Clock,
    dir: tempfile::TempDir,
    database_url: String,
    _db: Option<TestDatabase>,
    _bucket: Option<TestBucket>,
}

fn write_config(dir: &Path, tiers: &str) {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("tiers.yaml"), tiers).unwrap();
    std::fs::write(config.join("policies.yaml"), POLICIES).unwrap();
}

async fn platform(s3: bool, postgres: bool) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let bucket = if s3 { Some(TestBucket::new().await.unwrap()) } else { None };
    write_config(dir.path(), &bucket.as_ref().map_or_else(local_tiers, |b| s3_tiers(b)));
    let (_, config, secrets) = compile_dir(&dir.path().join("config")).unwrap();
    let tiers = Tiers::open(&config, &secrets, dir.path()).unwrap();
    let (database_url, db) = TestDatabase::or_sqlite(postgres, dir.path()).await.unwrap();
    let meta = Metadata::open(&database_url).await.unwrap();
    let clock = Clock::manual(T0);
    let docs = Documents::new(meta, tiers, clock.clone(), None, 1 << 30);
    Platform { docs, config, clock, dir, database_url, _db: db, _bucket: bucket }
}

fn alice() -> Actor {
    Actor { user: "alice".into(), admin: false }
}

fn admin() -> Actor {
    Actor { user: "root".into(), admin: true }
}

/// Compressible bytes, different for each seed.
fn body(seed: u32, len: usize) -> Vec<u8> {
    let line = format!("document {seed}: the quick brown fox jumps over the lazy dog\n");
    line.bytes().cycle().take(len).collect()
}

async fn upload(p: &Platform, actor: &Actor, filename: &str, tags: &[&str], bytes: &[u8]) -> Document {
    let new = NewDocument {
        filename: filename.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..NewDocument::default()
    };
    p.docs.upload(actor, new, vellum_core::blob::once(Bytes::copy_from_slice(bytes))).await.unwrap().document
}

async fn read(docs: &Documents, id: i64) -> Vec<u8> {
    let content = docs.content(&admin(), id, None).await.unwrap();
    docs.read(&content, None)
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
}

fn settings() -> RunSettings {
    RunSettings { batch: 2, concurrency: 3, grace: Grace { source_ms: 0, ..Grace::default() } }
}

async fn run(p: &Platform, policy: &str) -> RunReport {
    run_policy(&p.docs, &p.config, policy, settings(), &|_| {}).await.unwrap()
}

async fn tier_of(p: &Platform, id: i64) -> String {
    p.docs.get(&admin(), id).await.unwrap().storage_tier
}

/// Every stored object, as `tier/key`.
async fn stored_objects(docs: &Documents) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for tier in docs.tiers().iter() {
        let listed: Vec<_> = tier.store().list(None).try_collect().await.unwrap();
        all.extend(listed.into_iter().map(|o| format!("{}/{}", tier.name, o.location)));
    }
    all
}

/// Every object a blob row or the garbage list names, as `tier/key`.
async fn referenced(docs: &Documents, table: &str) -> BTreeSet<String> {
    let sql = format!("SELECT tier, object_key FROM {table}");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(docs.meta().pool()).await.unwrap();
    rows.iter().map(|r| format!("{}/{}", r.get::<String, _>("tier"), r.get::<String, _>("object_key"))).collect()
}

/// Nothing stored that no blob row names, and no blob row without its object.
async fn assert_no_orphan_or_missing(docs: &Documents) {
    assert_eq!(stored_objects(docs).await, referenced(docs, "blobs").await);
}

async fn seed_schedule(p: Platform) {
    let report = body(1, 200_000);
    let doc = upload(&p, &alice(), "report.pdf", &["report"], &report).await;
    // The same bytes in another document: one blob, moved once.
    let copy = upload(&p, &admin(), "copy.pdf", &[], &report).await;
    let temp = upload(&p, &alice(), "scratch.tmp", &[], &body(2, 5_000)).await;
    let at = |days: i64| T0 + days * DAY_MS;

    p.clock.advance(at(29) + DAY_MS - 1 - p.clock.now_ms()); // the last millisecond of day 29
    let r = run(&p, "standard-lifecycle").await;
    assert_eq!((r.matched, r.transitioned, r.expired, r.errors), (3, 0, 0, 0), "{r:?}");
    assert_eq!(run(&p, "temporary-files").await.expired, 0);
    assert_eq!(tier_of(&p, doc.id).await, "hot");

    p.clock.advance(at(30) + DAY_MS - p.clock.now_ms());
    let r = run(&p, "standard-lifecycle").await;
    // The temporary file is due for deletion by the other policy, which wins over a move.
    // The two documents sharing a blob count once or twice: once when the first one's move
    // took the other's bytes along before its batch was read.
    assert!((1..=2).contains(&r.transitioned) && (r.expired, r.errors) == (0, 0), "{r:?}");
    assert_eq!(r.bytes_moved, 200_000, "the shared blob moved once: {r:?}");
    assert_eq!(tier_of(&p, doc.id).await, "warm");
    assert_eq!(tier_of(&p, copy.id).await, "warm");
    let r = run(&p, "temporary-files").await;
    assert_eq!((r.matched, r.expired), (1, 1), "{r:?}");
    assert!(p.docs.get(&admin(), temp.id).await.is_err(), "the temporary file is deleted");

    for (day, tier) in [(89, "warm"), (90, "cold"), (364, "cold"), (365, "frozen"), (1000, "frozen")] {
        p.clock.advance(at(day) - p.clock.now_ms());
        let r = run(&p, "standard-lifecycle").await;
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(tier_of(&p, doc.id).await, tier, "day {day}");
        assert_eq!(tier_of(&p, copy.id).await, tier, "day {day}");
        let bytes = read(&p.docs, doc.id).await;
        assert_eq!(hex::encode(Sha256::digest(&bytes)), doc.checksum.trim_start_matches("sha256:"), "day {day}");
    }
    assert_no_orphan_or_missing(&p.docs).await;

    // The runs are recorded, and their progress announced.
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM retention_runs WHERE finished_at IS NOT NULL")
        .fetch_one(p.docs.meta().pool())
        .await
        .unwrap();
    assert_eq!(runs, 9);
    let events = outbox::pending(p.docs.meta(), 10_000).await.unwrap();
    let kinds: Vec<String> =
        events.iter().map(|e| e.event.payload["eventType"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "BULK_OPERATION_COMPLETED").count(), 9);
    let progress = events.iter().find(|e| e.event.payload["eventType"] == "BULK_OPERATION_PROGRESS").unwrap();
    assert_eq!(progress.event.payload["operation"], "retention:standard-lifecycle");
    assert!(progress.event.payload["total"].as_i64().unwrap() >= 2);

    // What it costs: every byte in FROZEN now.
    let usage = p.docs.usage(&p.config).await.unwrap();
    let frozen = usage.tiers.iter().find(|t| t.tier == "frozen").unwrap();
    assert_eq!((frozen.objects, frozen.original_bytes), (1, 200_000));
    assert!(frozen.bytes < 20_000, "compressed: {frozen:?}");
    assert_eq!(usage.logical_bytes, 400_000);
    assert!(usage.monthly_savings.deduplication > 0.0 && usage.monthly_savings.tiering > 0.0, "{usage:?}");
    let total = usage.monthly_savings.total;
    assert!((usage.baseline_monthly_cost - total - usage.estimated_monthly_cost).abs() < 1e-12, "{usage:?}");
}

#[tokio::test]
async fn the_seed_schedule_on_local_tiers() {
    seed_schedule(platform(false, false).await).await;
}

#[tokio::test]
async fn the_seed_schedule_on_s3_tiers() {
    seed_schedule(platform(true, true).await).await;
}

#[tokio::test]
async fn archive_restore_and_promotion() {
    let p = platform(false, true).await;
    let contract = upload(&p, &alice(), "lease.pdf", &["contract"], &body(3, 50_000)).await;
    let mut held = upload(&p, &alice(), "held.pdf", &["contract"], &body(4, 10_000)).await;
    held = p.docs.set_legal_hold(&admin(), held.id, true).await.unwrap();
    assert!(held.legal_hold);
    p.clock.advance(60 * DAY_MS);
    let r = run(&p, "archive-contracts").await;
    assert_eq!((r.matched, r.expired, r.blocked), (2, 1, 1), "{r:?}");
    let archived = p.docs.get(&alice(), contract.id).await.unwrap();
    assert_eq!(archived.storage_tier, "frozen");
    let archive_id = archived.archive_id.clone().unwrap();
    assert_eq!(tier_of(&p, held.id).await, "hot", "legal hold keeps the document where it is");
    let events = outbox::pending(p.docs.meta(), 1000).await.unwrap();
    let announced = events.iter().find(|e| e.event.payload["eventType"] == "DOCUMENT_ARCHIVED").unwrap();
    assert_eq!(announced.event.payload["archiveId"], archive_id.as_str());
    assert_eq!(announced.event.payload["storageTier"], "frozen");
    assert_eq!(announced.event.payload["documentId"], contract.id);
    // Archived documents stay readable, and are not archived twice.
    assert_eq!(read(&p.docs, contract.id).await, body(3, 50_000));
    assert_eq!(run(&p, "archive-contracts").await.expired, 0);

    let restored = p.docs.restore_archived(&alice(), contract.id, Grace::default()).await.unwrap();
    assert_eq!((restored.storage_tier.as_str(), restored.archive_id.as_deref()), ("hot", None));
    let events = outbox::pending(p.docs.meta(), 1000).await.unwrap();
    assert!(
        events.iter().any(|e| e.event.payload["eventType"] == "DOCUMENT_RESTORED"
            && e.event.payload["archiveId"] == archive_id.as_str())
    );
    let err = p.docs.restore_archived(&alice(), contract.id, Grace::default()).await.unwrap_err();
    assert!(err.to_string().contains("not archived"), "{err}");
    // The next run leaves what was just restored where it is.
    p.clock.advance(DAY_MS);
    assert_eq!(run(&p, "archive-contracts").await.expired, 0, "not archived again at once");
    assert_eq!(tier_of(&p, contract.id).await, "hot");

    // Promotion on demand, both ways, and a clear error for a tier that does not exist.
    let moved = p.docs.move_document(&alice(), held.id, "cold", Grace::default()).await.unwrap();
    assert_eq!(moved.storage_tier, "cold");
    let back = p.docs.move_document(&alice(), held.id, "hot", Grace::default()).await.unwrap();
    assert_eq!(back.storage_tier, "hot");
    assert_eq!(read(&p.docs, held.id).await, body(4, 10_000));
    let err = p.docs.move_document(&alice(), held.id, "tape", Grace::default()).await.unwrap_err();
    assert!(err.to_string().contains("tape"), "{err}");
    // The old copies go once their grace has passed.
    p.clock.advance(Grace::default().source_ms);
    p.docs.collect_garbage().await.unwrap();
    assert_no_orphan_or_missing(&p.docs).await;
}

#[tokio::test]
async fn noncurrent_versions_expire_and_their_blobs_are_freed() {
    let p = platform(false, false).await;
    let doc = upload(&p, &alice(), "plan.txt", &[], &body(10, 1000)).await;
    for n in 11..14 {
        p.clock.advance(DAY_MS);
        let new = vellum_core::documents::NewVersion::default();
        p.docs.upload_version(&alice(), doc.id, new, vellum_core::blob::once(body(n, 1000))).await.unwrap();
    }
    // Versions 1..=4; keep 1 noncurrent; expire 180 days after being replaced.
    p.clock.advance(180 * DAY_MS);
    let r = run(&p, "standard-lifecycle").await;
    assert_eq!(r.errors, 0, "{r:?}");
    let history = p.docs.versions(&alice(), doc.id).await.unwrap();
    let numbers: Vec<i64> = history.versions.iter().map(|v| v.version_number).collect();
    assert_eq!(numbers, [4, 3], "the current and the newest noncurrent stay");
    assert_eq!(read(&p.docs, doc.id).await, body(13, 1000));
    assert_no_orphan_or_missing(&p.docs).await;
}

#[tokio::test]
async fn a_tier_drains_into_another() {
    let p = platform(false, false).await;
    for n in 0..5 {
        upload(&p, &alice(), &format!("d{n}.txt"), &[], &body(20 + n, 3000)).await;
    }
    let seen = std::sync::Mutex::new(Vec::new());
    let report =
        drain_tier(&p.docs, "hot", "warm", settings(), &|moved| seen.lock().unwrap().push(moved)).await.unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(!seen.is_empty() && seen.windows(2).all(|w| w[0] <= w[1]), "progress after each batch: {seen:?}");
    assert_eq!(seen.last(), Some(&report.moved));
    assert_eq!((report.moved, report.remaining, report.errors), (5, 0, 0), "{report:?}");
    let usage = p.docs.usage(&p.config).await.unwrap();
    assert_eq!(usage.tiers.iter().find(|t| t.tier == "hot").unwrap().objects, 0);
    assert_no_orphan_or_missing(&p.docs).await;
}

#[tokio::test]
async fn reads_during_a_large_migration_all_succeed() {
    let p = Arc::new(platform(false, true).await);
    let mut ids = Vec::new();
    for n in 0..24 {
        ids.push(upload(&p, &alice(), &format!("big{n}.bin"), &[], &body(100 + n, 1 << 20)).await.id);
    }
    p.clock.advance(400 * DAY_MS);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (p, ids, stop) = (Arc::clone(&p), ids.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut reads = 0u32;
                let mut i = r;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || reads < 24 {
                    let id = ids[i % ids.len()];
                    let n = u32::try_from(i % ids.len()).unwrap();
                    assert_eq!(read(&p.docs, id).await, body(100 + n, 1 << 20), "read {reads} of {id}");
                    reads += 1;
                    i += 5;
                }
                reads
            })
        })
        .collect();
    let r = run(&p, "standard-lifecycle").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    assert_eq!((r.transitioned, r.errors), (24, 0), "{r:?}");
    assert!(reads >= 96, "{reads} reads");
    for id in &ids {
        assert_eq!(tier_of(&p, *id).await, "frozen");
    }
    assert_no_orphan_or_missing(&p.docs).await;
}

/// Kills `vellum-workers retention` right after each step of a tier migration, then runs
/// it again: every document stays readable with its checksum throughout, the rerun
/// finishes the move, and no stored copy is left that nothing accounts for.
#[tokio::test]
async fn one_bad_blob_does_not_stop_the_rest_of_its_batch() {
    let p = platform(false, true).await;
    let mut docs = Vec::new();
    for n in 0..6 {
        let bytes = body(300 + n, 5_000);
        docs.push((upload(&p, &alice(), &format!("b{n}.pdf"), &[], &bytes).await, bytes));
    }
    // The stored copy of one document no longer matches its checksum.
    let rotten = &docs[2].0;
    let row = sqlx::query("SELECT tier, object_key FROM blobs WHERE sha256 = $1")
        .bind(rotten.checksum.trim_start_matches("sha256:"))
        .fetch_one(p.docs.meta().pool())
        .await
        .unwrap();
    let (tier, key): (String, String) = (row.get("tier"), row.get("object_key"));
    let store = Arc::clone(p.docs.tiers().get(&tier).unwrap().store());
    object_store::ObjectStoreExt::put(&*store, &key.as_str().into(), Bytes::from_static(b"rotten").into())
        .await
        .unwrap();

    p.clock.advance(100 * DAY_MS);
    let r = run(&p, "standard-lifecycle").await;
    assert_eq!((r.transitioned, r.errors), (5, 1), "{r:?}");
    for (n, (doc, bytes)) in docs.iter().enumerate() {
        if n == 2 {
            assert_eq!(tier_of(&p, doc.id).await, "hot", "a copy that does not verify is never switched to");
            let failed = p.docs.lifecycle_facts(&admin(), doc.id).await.unwrap().failed.unwrap_or_default();
            assert!(!failed.is_empty(), "the failure is recorded on the document");
        } else {
            assert_eq!(tier_of(&p, doc.id).await, "cold", "document {n}");
            assert_eq!(&read(&p.docs, doc.id).await, bytes, "document {n}");
        }
    }
}

#[tokio::test]
async fn a_run_covers_every_shard_of_a_shard_set() {
    let dir = tempfile::tempdir().unwrap();
    let dbs = [TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap()];
    let shard_set = format!(
        "---\napiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {{name: docs}}\nspec:\n  shards:\n  \
         - {{name: s0, urlSecretRef: {{name: shard-urls, key: s0}}}}\n  \
         - {{name: s1, urlSecretRef: {{name: shard-urls, key: s1}}}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: shard-urls}}\nstringData:\n  s0: '{}'\n  s1: '{}'\n",
        dbs[0].url, dbs[1].url
    );
    write_config(dir.path(), &(local_tiers() + &shard_set));
    let (_, config, secrets) = compile_dir(&dir.path().join("config")).unwrap();
    let tiers = Tiers::open(&config, &secrets, dir.path()).unwrap();
    // Uploaded 100 days before the run (which reads the system clock).
    let clock = Clock::manual(Clock::system().now_ms() - 100 * DAY_MS);
    let shards = open_shards(&config, &secrets, &dbs[0].url).await.unwrap();
    let shards = shards.into_iter().map(|m| Documents::new(m, tiers.clone(), clock.clone(), None, 1 << 30)).collect();
    let library = library_of(&config, shards).unwrap();
    let mut docs = Vec::new();
    for n in 0..12 {
        let bytes = body(400 + n, 3_000);
        let new = NewDocument { filename: format!("s{n}.pdf"), ..NewDocument::default() };
        let once = vellum_core::blob::once(Bytes::copy_from_slice(&bytes));
        docs.push((library.for_new().upload(&alice(), new, once).await.unwrap().document, bytes));
    }
    let per_shard: Vec<usize> =
        library.shards().iter().map(|s| docs.iter().filter(|(d, _)| s.owns_id(d.id)).count()).collect();
    assert!(per_shard.iter().all(|n| *n > 0), "both shards hold documents: {per_shard:?}");

    // What the operator's CronJob runs.
    let out = Command::new(env!("CARGO_BIN_EXE_vellum-workers"))
        .args(["retention", "--policy", "standard-lifecycle", "--batch", "5", "--database-url", &dbs[0].url])
        .arg("--config-dir")
        .arg(dir.path().join("config"))
        .arg("--data-dir")
        .arg(dir.path())
        .env("VELLUM_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<serde_json::Value> =
        serde_json::Deserializer::from_slice(&out.stdout).into_iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(reports.len(), 2, "one report per shard");
    for (report, expected) in reports.iter().zip(&per_shard) {
        assert_eq!(report["report"]["transitioned"], *expected as u64, "{report}");
    }
    for (doc, bytes) in &docs {
        let shard = library.of(doc.id);
        assert_eq!(shard.get(&admin(), doc.id).await.unwrap().storage_tier, "cold");
        assert_eq!(&read(shard, doc.id).await, bytes);
    }
}

#[cfg(unix)]
#[tokio::test]
async fn tiers_on_one_file_system_copy_inside_it() {
    use std::os::unix::fs::MetadataExt;
    let p = platform(false, false).await;
    let bytes = body(500, 20_000);
    let doc = upload(&p, &alice(), "linked.pdf", &[], &bytes).await;
    let located = |p: &Platform| {
        let sha = doc.checksum.trim_start_matches("sha256:").to_owned();
        let pool = p.docs.meta().pool().clone();
        async move {
            let row = sqlx::query("SELECT tier, object_key FROM blobs WHERE sha256 = $1")
                .bind(sha)
                .fetch_one(&pool)
                .await
                .unwrap();
            (row.get::<String, _>("tier"), row.get::<String, _>("object_key"))
        }
    };
    let (hot, hot_key) = located(&p).await;
    p.clock.advance(40 * DAY_MS);
    // The default grace keeps the source a while, so both can be looked at.
    let kept = RunSettings { grace: Grace::default(), ..settings() };
    let r = run_policy(&p.docs, &p.config, "standard-lifecycle", kept, &|_| {}).await.unwrap();
    assert_eq!(r.transitioned, 1, "{r:?}");
    let (warm, warm_key) = located(&p).await;
    assert_eq!((hot.as_str(), warm.as_str()), ("hot", "warm"));
    let inode =
        |tier: &str, key: &str| std::fs::metadata(p.dir.path().join("tiers").join(tier).join(key)).unwrap().ino();
    assert_eq!(inode("hot", &hot_key), inode("warm", &warm_key), "one file, linked: no byte went through the worker");
    assert_eq!(read(&p.docs, doc.id).await, bytes, "and verified by reading it back");
}

#[tokio::test]
async fn a_worker_killed_at_every_step_of_a_migration_loses_nothing() {
    for step in MigrationStep::ALL {
        let p = platform(false, false).await;
        let now = vellum_core::clock::Clock::system().now_ms();
        p.clock.advance(now - 100 * DAY_MS - p.clock.now_ms());
        let mut docs = Vec::new();
        for n in 0..4 {
            let bytes = body(200 + n, 40_000);
            docs.push((upload(&p, &alice(), &format!("f{n}.pdf"), &[], &bytes).await, bytes));
        }
        let cli = |fault: Option<&str>| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_vellum-workers"));
            command
                .args(["retention", "--policy", "standard-lifecycle", "--batch", "2", "--concurrency", "1"])
                .args(["--source-grace-seconds", "0", "--database-url", &p.database_url])
                .arg("--config-dir")
                .arg(p.dir.path().join("config"))
                .arg("--data-dir")
                .arg(p.dir.path())
                .env("VELLUM_LOG", "warn")
                .env_remove("VELLUM_FAULT_ABORT_AT");
            if let Some(step) = fault {
                command.env("VELLUM_FAULT_ABORT_AT", step);
            }
            command.output().unwrap()
        };
        let killed = cli(Some(step.name()));
        assert!(!killed.status.success(), "{step:?}: the worker should have died");
        assert!(String::from_utf8_lossy(&killed.stderr).contains("fault injection"), "{step:?}");
        for (doc, bytes) in &docs {
            assert_eq!(&read(&p.docs, doc.id).await, bytes, "{step:?}: document {} after the kill", doc.id);
        }
        // Every stored object is either a blob's or on the garbage list, never unaccounted.
        let accounted: BTreeSet<String> =
            referenced(&p.docs, "blobs").await.union(&referenced(&p.docs, "blob_garbage").await).cloned().collect();
        assert!(stored_objects(&p.docs).await.is_subset(&accounted), "{step:?}");
        assert!(referenced(&p.docs, "blobs").await.is_subset(&stored_objects(&p.docs).await), "{step:?}");

        let rerun = cli(None);
        assert!(rerun.status.success(), "{step:?}: {}", String::from_utf8_lossy(&rerun.stderr));
        let report: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
        assert!(report["resumed"].as_bool().unwrap(), "{step:?}: the rerun resumes the killed run: {report}");
        assert_eq!(report["errors"], 0, "{step:?}: {report}");
        for (doc, bytes) in &docs {
            assert_eq!(tier_of(&p, doc.id).await, "cold", "{step:?}");
            assert_eq!(&read(&p.docs, doc.id).await, bytes, "{step:?}");
        }
        // A copy the killed run claimed but never switched to is collected once its claim
        // expires; then exactly the blobs' objects are left.
        p.clock.advance(now + Grace::default().claim_ms + 3_600_000 - p.clock.now_ms());
        p.docs.collect_garbage().await.unwrap();
        assert_no_orphan_or_missing(&p.docs).await;
        let garbage: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM blob_garbage").fetch_one(p.docs.meta().pool()).await.unwrap();
        assert_eq!(garbage, 0, "{step:?}");
    }
}

/// `vellum-workers drain` (the Job a deleted StorageTier runs) announces its progress on
/// the gateways' `/topic/migrations` through NATS, as seed 003's `StatusUpdateEvent`.
#[tokio::test]
async fn the_drain_command_announces_its_progress_on_topic_migrations() {
    use futures::StreamExt as _;
    let p = platform(false, false).await;
    for n in 0..5 {
        upload(&p, &alice(), &format!("d{n}.txt"), &[], &body(40 + n, 2000)).await;
    }
    let nats = vellum_testkit::NatsProcess::start().unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut notices = client.subscribe(vellum_jetstream::notices::SUBJECT).await.unwrap();
    client.flush().await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vellum-workers"))
        .args(["drain", "--tier", "hot", "--to", "warm", "--database-url", &p.database_url, "--nats-url", &nats.url()])
        .arg("--config-dir")
        .arg(p.dir.path().join("config"))
        .arg("--data-dir")
        .arg(p.dir.path())
        .env("VELLUM_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut updates = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(std::time::Duration::from_secs(2), notices.next()).await {
        let notice: vellum_jetstream::notices::WireNotice = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(notice.audience, vellum_jetstream::notices::WireAudience::Admins, "for admins only");
        assert_eq!((notice.channel.as_str(), notice.kind.as_str()), ("migrations", "status_update"));
        updates.push(notice.message);
    }
    let kinds: Vec<&str> = updates.iter().filter_map(|u| u["eventType"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"phase_changed"), "{updates:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{updates:?}");
    let done = updates.last().unwrap();
    assert_eq!((done["entityId"].as_str(), done["phase"].as_str()), (Some("tier-drain/hot"), Some("Draining")));
    assert_eq!((done["recordsProcessed"].as_u64(), done["totalRecords"].as_u64()), (Some(5), Some(5)), "{done}");
    assert_eq!(done["progress"], 100);
    let usage = p.docs.usage(&p.config).await.unwrap();
    assert_eq!(usage.tiers.iter().find(|t| t.tier == "hot").unwrap().objects, 0, "the tier is empty");
}

/// Where `doc`'s current content is stored: its tier and object key.
async fn stored_at(p: &Platform, doc: &Document) -> (Arc<vellum_core::blob::Tier>, object_store::path::Path) {
    let sha = doc.checksum.trim_start_matches("sha256:");
    let row = sqlx::query("SELECT tier, object_key FROM blobs WHERE sha256 = $1")
        .bind(sha)
        .fetch_one(p.docs.meta().pool())
        .await
        .unwrap();
    let tier: String = row.get("tier");
    let key: String = row.get("object_key");
    (p.docs.tiers().get(&tier).unwrap(), object_store::path::Path::from(key))
}

/// `vellum-workers scrub` on `p`, with its progress to `nats`: its stdout's JSON lines
/// and the status updates it announced.
async fn scrub(p: &Platform, nats: &vellum_testkit::NatsProcess) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    use futures::StreamExt as _;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut notices = client.subscribe(vellum_jetstream::notices::SUBJECT).await.unwrap();
    client.flush().await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vellum-workers"))
        .args(["scrub", "--database-url", &p.database_url, "--nats-url", &nats.url()])
        .arg("--config-dir")
        .arg(p.dir.path().join("config"))
        .arg("--data-dir")
        .arg(p.dir.path())
        .env("VELLUM_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut updates = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(std::time::Duration::from_secs(2), notices.next()).await {
        let notice: vellum_jetstream::notices::WireNotice = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(notice.audience, vellum_jetstream::notices::WireAudience::Admins, "for admins only");
        assert_eq!((notice.channel.as_str(), notice.kind.as_str()), ("data-quality", "status_update"));
        updates.push(notice.message);
    }
    (printed, updates)
}

#[tokio::test]
async fn a_scrub_quarantines_blobs_whose_bytes_changed_or_vanished_and_releases_them_once_restored() {
    use object_store::ObjectStoreExt as _;
    let p = platform(true, true).await;
    // Compressed (text) and stored as is (a JPEG): both forms are read back.
    let altered = upload(&p, &alice(), "altered.txt", &[], &body(1, 5000)).await;
    let vanished = upload(&p, &alice(), "vanished.jpg", &[], &body(2, 3000)).await;
    let sound = upload(&p, &alice(), "sound.txt", &[], &body(3, 4000)).await;
    let (tier, key) = stored_at(&p, &altered).await;
    let original = tier.store().get(&key).await.unwrap().bytes().await.unwrap();
    tier.store().put(&key, Bytes::from_static(b"not what was uploaded").into()).await.unwrap();
    let (tier, key) = stored_at(&p, &vanished).await;
    tier.store().delete(&key).await.unwrap();
    let nats = vellum_testkit::NatsProcess::start().unwrap();

    let (printed, updates) = scrub(&p, &nats).await;
    let report = &printed[0]["scrub"];
    assert_eq!(
        (report["checked"].as_u64(), report["unsound"].as_u64(), report["errors"].as_u64()),
        (Some(3), Some(2), Some(0)),
        "{report}"
    );
    let quarantined: BTreeSet<i64> =
        report["quarantined"].as_array().unwrap().iter().map(|q| q["documents"][0].as_i64().unwrap()).collect();
    assert_eq!(quarantined, BTreeSet::from([altered.id, vanished.id]));
    // Seed 003's StatusUpdateEvents on /topic/data-quality: the start, each quarantined
    // blob, the end.
    let kinds: Vec<&str> = updates.iter().filter_map(|u| u["eventType"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"phase_changed"), "{updates:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{updates:?}");
    let blobs: BTreeSet<&str> = updates
        .iter()
        .filter(|u| u["status"] == "QUARANTINED")
        .map(|u| {
            assert_eq!((u["eventType"].as_str(), u["entityType"].as_str()), (Some("status_changed"), Some("blob")));
            u["entityId"].as_str().unwrap()
        })
        .collect();
    let sha = |d: &Document| d.checksum.trim_start_matches("sha256:").to_owned();
    assert_eq!(blobs, BTreeSet::from([sha(&altered).as_str(), sha(&vanished).as_str()]));
    let done = updates.last().unwrap();
    assert_eq!(
        (done["entityType"].as_str(), done["phase"].as_str(), done["totalRecords"].as_i64()),
        (Some("integrity-scrub"), Some("Scrubbing"), Some(3))
    );
    assert!(done["message"].as_str().unwrap().contains("2 of 3"), "{done}");

    // Their downloads are refused with the reason; the sound one is served.
    for doc in [&altered, &vanished] {
        match p.docs.content(&admin(), doc.id, None).await {
            Err(vellum_core::documents::DocError::Quarantined { id, reason, .. }) => {
                assert_eq!(id, doc.id);
                assert!(
                    reason.contains("hash to") || reason.contains("missing") || reason.contains("decompress"),
                    "{reason}"
                );
            }
            other => panic!("document {} is served: {:?}", doc.id, other.map(|c| c.sha256)),
        }
    }
    assert_eq!(read(&p.docs, sound.id).await, body(3, 4000));

    // Restored from a backup: the next scrub releases it; the vanished one stays.
    let (tier, key) = stored_at(&p, &altered).await;
    tier.store().put(&key, original.into()).await.unwrap();
    let (printed, _) = scrub(&p, &nats).await;
    let report = &printed[0]["scrub"];
    assert_eq!((report["released"].as_u64(), report["unsound"].as_u64()), (Some(1), Some(1)), "{report}");
    assert_eq!(report["quarantined"], serde_json::json!([]), "already quarantined: not again");
    assert_eq!(read(&p.docs, altered.id).await, body(1, 5000));
    assert!(p.docs.content(&admin(), vanished.id, None).await.is_err());
}
