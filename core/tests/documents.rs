//! The document service against real databases: every test runs on SQLite and on
//! Postgres (a fresh database of the shared server), and one on an S3 tier.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use vellum_core::blob::{Codec, Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, DocError, Documents, ListQuery, MetadataPatch, NewDocument, NewVersion};
use vellum_core::events::outbox;
use vellum_core::store::Metadata;
use vellum_testkit::{TestBucket, TestDatabase};

mod support;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

struct Env {
    docs: Documents,
    store: Arc<dyn ObjectStore>,
    clock: Clock,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn env(postgres: bool, tier_store: Option<Arc<dyn ObjectStore>>, compression: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (url, db) = TestDatabase::or_sqlite(postgres, dir.path()).await.unwrap();
    let meta = Metadata::open(&url).await.unwrap();
    let store = tier_store.unwrap_or_else(|| Arc::new(InMemory::new()));
    let compression = Compression { enabled: compression, ..Compression::default() };
    let tier = Tier::from_store("hot", TierClass::Hot, Some(0.023), compression, Arc::clone(&store));
    let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
    let clock = Clock::manual(T0);
    let docs = Documents::new(meta, tiers, clock.clone(), None, 10 << 20);
    Env { docs, store, clock, _db: db, _dir: dir }
}

fn user(name: &str) -> Actor {
    Actor { user: name.into(), admin: false }
}

fn admin() -> Actor {
    Actor { user: "root".into(), admin: true }
}

fn named(filename: &str) -> NewDocument {
    NewDocument { filename: filename.into(), ..NewDocument::default() }
}

async fn objects(store: &Arc<dyn ObjectStore>) -> usize {
    store.list(None).try_collect::<Vec<_>>().await.unwrap().len()
}

async fn concat(stream: vellum_core::blob::ByteStream) -> Vec<u8> {
    stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
}

async fn read_all(env: &Env, actor: &Actor, id: i64, version: Option<i64>) -> Vec<u8> {
    let content = env.docs.content(actor, id, version).await.unwrap();
    concat(env.docs.read(&content, None).await.unwrap()).await
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::env(false, None, true).await).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::env(true, None, true).await).await } )*
        }
    };
}

on_both!(
    upload_read_and_deduplicate,
    versions_and_restore,
    metadata_updates_emit_events,
    listing_pages_and_filters,
    owners_admins_and_strangers,
    delete_purge_and_shared_blobs,
    legal_hold_blocks_deletion,
    bad_input_changes_nothing,
    a_crashed_upload_leaves_garbage_not_an_orphan,
    finished_jobs_and_their_exports_go_a_week_after_they_end,
);

async fn upload_read_and_deduplicate(env: Env) {
    let alice = user("alice");
    let body = "The quick brown fox. ".repeat(1000);
    let new = NewDocument {
        filename: "fox.txt".into(),
        title: Some("Fox".into()),
        tags: vec!["animals".into()],
        ..NewDocument::default()
    };
    let first = env.docs.upload(&alice, new, once(body.clone())).await.unwrap();
    assert!(!first.deduplicated);
    assert_eq!(first.version_number, 1);
    let doc = &first.document;
    assert_eq!((doc.file_type.as_str(), doc.content_type.as_str()), ("txt", "text/plain"));
    assert_eq!(doc.size, i64::try_from(body.len()).unwrap());
    assert_eq!(doc.uploaded_by, "alice");
    assert_eq!(doc.storage_tier, "hot");
    assert_eq!(doc.created_at, "2026-01-01T00:00:00Z");
    assert!(doc.checksum.starts_with("sha256:") && doc.checksum.len() == 7 + 64);
    assert_eq!(read_all(&env, &alice, doc.id, None).await, body.as_bytes());
    assert_eq!(objects(&env.store).await, 1);

    // The same bytes from someone else: stored once, said so.
    let second = env.docs.upload(&user("bob"), named("copy.txt"), once(body.clone())).await.unwrap();
    assert!(second.deduplicated);
    assert_eq!(second.document.checksum, doc.checksum);
    assert_eq!(objects(&env.store).await, 1, "a deduplicated upload leaves no second copy");
    assert_eq!(read_all(&env, &user("bob"), second.document.id, None).await, body.as_bytes());

    // A range of a compressed blob.
    let content = env.docs.content(&alice, doc.id, None).await.unwrap();
    let part = concat(env.docs.read(&content, Some(21..40)).await.unwrap()).await;
    assert_eq!(part, &body.as_bytes()[21..40]);

    let events = outbox::pending(env.docs.meta(), 100).await.unwrap();
    assert_eq!(events.len(), 2);
    let payload = &events[0].event.payload;
    assert_eq!(payload["eventType"], "DOCUMENT_UPLOADED");
    assert_eq!(payload["timestamp"], T0);
    assert_eq!(payload["documentId"], doc.id);
    assert_eq!(payload["filename"], "fox.txt");
    assert_eq!(payload["fileType"], "txt");
    assert_eq!(payload["size"], body.len());
    assert_eq!(payload["uploadedBy"], "alice");
    assert_eq!(payload["checksum"], doc.checksum);
    assert_eq!(payload["metadata"]["title"], "Fox");
    assert_eq!(payload["metadata"]["tags"][0], "animals");
    assert_eq!(payload["eventId"], events[0].event.id);
}

async fn versions_and_restore(env: Env) {
    let alice = user("alice");
    let doc = env.docs.upload(&alice, named("report.md"), once("v1")).await.unwrap().document;
    env.clock.advance(1000);
    let change = NewVersion { change_description: Some("Fixed typos".into()), ..NewVersion::default() };
    let v2 = env.docs.upload_version(&alice, doc.id, change, once("v2")).await.unwrap();
    assert_eq!(v2.version_number, 2);
    assert_eq!(v2.document.current_version, 2);
    assert_eq!(read_all(&env, &alice, doc.id, None).await, b"v2");
    assert_eq!(read_all(&env, &alice, doc.id, Some(1)).await, b"v1");

    let restored = env.docs.restore_version(&alice, doc.id, 1).await.unwrap();
    assert_eq!((restored.version_number, restored.restored_from_version), (3, 1));
    assert_eq!(restored.message, "Version 1 restored as version 3");
    assert_eq!(read_all(&env, &alice, doc.id, None).await, b"v1");
    assert_eq!(objects(&env.store).await, 2, "a restore reuses the old bytes");

    let history = env.docs.versions(&alice, doc.id).await.unwrap();
    assert_eq!(history.current_version, 3);
    let numbers: Vec<i64> = history.versions.iter().map(|v| v.version_number).collect();
    assert_eq!(numbers, [3, 2, 1]);
    assert!(history.versions[0].is_latest && !history.versions[1].is_latest);
    assert_eq!(history.versions[0].restored_from_version, Some(1));
    assert_eq!(history.versions[1].change_description.as_deref(), Some("Fixed typos"));
    assert_eq!(history.versions[1].created_at, "2026-01-01T00:00:01Z");

    assert!(matches!(
        env.docs.restore_version(&alice, doc.id, 9).await,
        Err(DocError::VersionNotFound { version: 9, .. })
    ));
    let types: Vec<String> = outbox::pending(env.docs.meta(), 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.event.payload["eventType"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["DOCUMENT_UPLOADED", "DOCUMENT_VERSION_CREATED", "DOCUMENT_VERSION_CREATED"]);
}

async fn metadata_updates_emit_events(env: Env) {
    let alice = user("alice");
    let doc = env.docs.upload(&alice, named("a.pdf"), once("%PDF")).await.unwrap().document;
    let patch: MetadataPatch = serde_json::from_str(
        r#"{"title": "Q4 Contract", "tags": ["legal", "contracts"], "metadata": {"dept": "ops"}}"#,
    )
    .unwrap();
    let updated = env.docs.update(&alice, doc.id, patch.clone()).await.unwrap();
    assert_eq!(updated.title.as_deref(), Some("Q4 Contract"));
    assert_eq!(updated.tags, ["legal", "contracts"]);
    assert_eq!(updated.metadata["dept"], "ops");
    // The same patch again changes nothing and emits nothing.
    env.docs.update(&alice, doc.id, patch).await.unwrap();
    let events = outbox::pending(env.docs.meta(), 100).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].event.payload["eventType"], "DOCUMENT_UPDATED");
    assert_eq!(events[1].event.payload["changedFields"], serde_json::json!(["title", "tags", "metadata"]));
    let cleared = env.docs.update(&alice, doc.id, serde_json::from_str(r#"{"title": null}"#).unwrap()).await.unwrap();
    assert_eq!(cleared.title, None);
    assert_eq!(cleared.tags, ["legal", "contracts"]);
}

async fn listing_pages_and_filters(env: Env) {
    let (alice, bob) = (user("alice"), user("bob"));
    let mut ids = Vec::new();
    for i in 0..7 {
        let new = NewDocument {
            filename: format!("doc-{i}.{}", if i % 2 == 0 { "pdf" } else { "txt" }),
            title: Some(format!("Quarterly {i}")),
            tags: if i < 3 { vec!["q4".into()] } else { vec![] },
            ..NewDocument::default()
        };
        ids.push(env.docs.upload(&alice, new, once(format!("body {i}"))).await.unwrap().document.id);
        env.clock.advance(if i == 3 { 0 } else { 60_000 }); // two share a timestamp
    }
    env.docs.upload(&bob, named("bob.pdf"), once("bob")).await.unwrap();

    let mut seen = Vec::new();
    let mut query = ListQuery { limit: Some(3), ..ListQuery::default() };
    loop {
        let page = env.docs.list(&alice, &query).await.unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|d| d.id));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    // Newest first; documents 3 and 4 share a time, and between them the larger id comes first.
    let mut expected: Vec<i64> = ids.iter().rev().copied().collect();
    let (three, four) =
        (expected.iter().position(|x| *x == ids[3]).unwrap(), expected.iter().position(|x| *x == ids[4]).unwrap());
    if ids[3] > ids[4] {
        expected.swap(three, four);
    }
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 7);
    let mut sorted_seen = seen.clone();
    sorted_seen.sort_unstable();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort_unstable();
    assert_eq!(sorted_seen, sorted_ids, "every document once, none of bob's");
    assert_eq!(seen[0], ids[6]);
    assert_eq!(seen[6], ids[0]);

    let count = |q: ListQuery| {
        let docs = &env.docs;
        let alice = alice.clone();
        async move { docs.list(&alice, &q).await.unwrap().items.len() }
    };
    assert_eq!(count(ListQuery { tag: Some("q4".into()), ..ListQuery::default() }).await, 3);
    assert_eq!(count(ListQuery { file_type: Some("PDF".into()), ..ListQuery::default() }).await, 4);
    assert_eq!(count(ListQuery { q: Some("quarterly 5".into()), ..ListQuery::default() }).await, 1);
    assert_eq!(count(ListQuery { q: Some("100%".into()), ..ListQuery::default() }).await, 0);
    assert_eq!(
        count(ListQuery { created_from: Some(T0 + 60_000), created_to: Some(T0 + 180_000), ..ListQuery::default() })
            .await,
        2
    );
    // Owners filter for admins; users only ever see their own.
    let everyone = env.docs.list(&admin(), &ListQuery::default()).await.unwrap().items.len();
    assert_eq!(everyone, 8);
    let bobs = ListQuery { owner: Some("bob".into()), ..ListQuery::default() };
    assert_eq!(env.docs.list(&admin(), &bobs).await.unwrap().items.len(), 1);
    assert_eq!(env.docs.list(&alice, &bobs).await.unwrap().items.len(), 7);

    for bad in [
        ListQuery { limit: Some(0), ..ListQuery::default() },
        ListQuery { cursor: Some("garbage!".into()), ..ListQuery::default() },
    ] {
        assert!(matches!(env.docs.list(&alice, &bad).await, Err(DocError::Invalid(_))), "{bad:?}");
    }
}

async fn owners_admins_and_strangers(env: Env) {
    let doc = env.docs.upload(&user("alice"), named("private.txt"), once("secret")).await.unwrap().document;
    let bob = user("bob");
    assert!(matches!(env.docs.get(&bob, doc.id).await, Err(DocError::NotFound(_))));
    assert!(matches!(env.docs.content(&bob, doc.id, None).await, Err(DocError::NotFound(_))));
    assert!(matches!(env.docs.delete(&bob, doc.id).await, Err(DocError::NotFound(_))));
    assert!(matches!(env.docs.versions(&bob, doc.id).await, Err(DocError::NotFound(_))));
    assert!(matches!(
        env.docs.upload_version(&bob, doc.id, NewVersion::default(), once("x")).await,
        Err(DocError::NotFound(_))
    ));
    assert_eq!(objects(&env.store).await, 1, "a refused version stores nothing");
    assert_eq!(env.docs.get(&admin(), doc.id).await.unwrap().id, doc.id);
}

async fn delete_purge_and_shared_blobs(env: Env) {
    let alice = user("alice");
    let a = env.docs.upload(&alice, named("a.txt"), once("shared bytes")).await.unwrap().document;
    let b = env.docs.upload(&alice, named("b.txt"), once("shared bytes")).await.unwrap().document;
    let c = env.docs.upload(&alice, named("c.txt"), once("own bytes")).await.unwrap().document;
    assert_eq!(objects(&env.store).await, 2);

    env.docs.delete(&alice, a.id).await.unwrap();
    assert!(matches!(env.docs.get(&alice, a.id).await, Err(DocError::NotFound(_))));
    assert_eq!(env.docs.list(&alice, &ListQuery::default()).await.unwrap().items.len(), 2);
    assert_eq!(objects(&env.store).await, 2, "a soft delete keeps the bytes");

    env.docs.purge(&alice, a.id).await.unwrap();
    assert_eq!(objects(&env.store).await, 2, "b still references the shared blob");
    assert_eq!(read_all(&env, &alice, b.id, None).await, b"shared bytes");
    env.docs.purge(&alice, b.id).await.unwrap();
    assert_eq!(objects(&env.store).await, 1, "the last reference gone, the blob goes");
    env.docs.purge(&alice, c.id).await.unwrap();
    assert_eq!(objects(&env.store).await, 0);
    assert!(matches!(env.docs.purge(&alice, c.id).await, Err(DocError::NotFound(_))));

    let kinds: Vec<(String, bool)> = outbox::pending(env.docs.meta(), 100)
        .await
        .unwrap()
        .iter()
        .filter(|p| p.event.payload["eventType"] == "DOCUMENT_DELETED")
        .map(|p| {
            (p.event.payload["deletedBy"].as_str().unwrap().to_owned(), p.event.payload["permanent"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(kinds.len(), 4);
    assert_eq!(kinds[0], ("alice".to_owned(), false));
    assert!(kinds[1..].iter().all(|(_, permanent)| *permanent));
}

async fn a_crashed_upload_leaves_garbage_not_an_orphan(env: Env) {
    let alice = user("alice");
    let kept = env.docs.upload(&alice, named("kept.txt"), once("kept bytes")).await.unwrap().document;
    // The copy of an upload whose process died before the transaction recording it.
    env.docs.store_bytes("text/plain", once("never recorded")).await.unwrap();
    assert_eq!(objects(&env.store).await, 2);
    assert_eq!(env.docs.collect_garbage().await.unwrap(), 0, "a young claim: the upload may still record it");
    env.clock.advance(24 * 3_600_000);
    assert_eq!(env.docs.collect_garbage().await.unwrap(), 1, "the unrecorded copy, and only it");
    assert_eq!(objects(&env.store).await, 1);
    assert_eq!(read_all(&env, &alice, kept.id, None).await, b"kept bytes");
    env.clock.advance(365 * 24 * 3_600_000);
    assert_eq!(env.docs.collect_garbage().await.unwrap(), 0, "a recorded upload holds no claim");
}

async fn finished_jobs_and_their_exports_go_a_week_after_they_end(env: Env) {
    use vellum_core::bulk::{self, BulkRequest, Export, JobStatus, Planned};
    let alice = user("alice");
    let id = env.docs.upload(&alice, named("exported.txt"), once("exported bytes")).await.unwrap().document.id;
    let export: BulkRequest =
        serde_json::from_value(serde_json::json!({"operation": "export", "documentIds": [id]})).unwrap();
    let planned = || Planned { ids: vec![id], tags: Vec::new() };
    let meta = env.docs.meta();
    // An export run to its end, as a replica runs it.
    let created = bulk::create(meta, env.clock.now_ms(), &alice, &export, planned()).await.unwrap();
    let mut job = bulk::claim(meta, env.clock.now_ms(), "runner").await.unwrap().expect("the job");
    assert_eq!(job.id, created.id);
    let mut zip = Export::start(&env.docs, &job);
    let (name, bytes) = Export::open(&env.docs, &job, id).await.unwrap();
    zip.add(id, &name, bytes).await.unwrap();
    job.result = Some(zip.finish().await.unwrap());
    job.record(id, Ok(()));
    assert!(bulk::checkpoint(&env.docs, &job, "runner", None, Some(JobStatus::Completed)).await.unwrap());
    // Another, still queued: a job not finished stays whatever its age.
    let queued = bulk::create(meta, env.clock.now_ms(), &alice, &export, planned()).await.unwrap();
    assert_eq!(objects(&env.store).await, 2, "the document's copy and the ZIP");

    env.clock.advance(bulk::KEPT_FOR_MS - 1);
    assert_eq!(bulk::prune(&env.docs).await.unwrap(), 0, "a week is not over");
    assert_eq!(bulk::get(meta, &alice, &job.id).await.unwrap().status, JobStatus::Completed);
    env.clock.advance(2);
    assert_eq!(bulk::prune(&env.docs).await.unwrap(), 1);
    let gone = bulk::get(meta, &alice, &job.id).await.unwrap_err();
    assert!(matches!(gone, DocError::JobNotFound(_)), "{gone}");
    assert_eq!(objects(&env.store).await, 1, "the ZIP went; the document's copy stays");
    assert_eq!(read_all(&env, &alice, id, None).await, b"exported bytes");
    assert_eq!(bulk::get(meta, &alice, &queued.id).await.unwrap().status, JobStatus::Queued);
    assert_eq!(bulk::prune(&env.docs).await.unwrap(), 0, "nothing more to forget");
}

/// An export whose ZIP cannot be stored (a file stands where the exports' folder would
/// be) is let go for another try after a pause, by whichever replica, and fails for good at
/// the third failure: it says why, and its `BULK_OPERATION_COMPLETED` event says FAILED.
#[tokio::test]
async fn an_export_whose_zip_cannot_be_stored_fails_at_the_third_try() {
    use vellum_core::bulk::{self, BulkRequest, Export, JobStatus, Planned};
    for postgres in [false, true] {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("exports"), b"not a folder").unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root.path()).unwrap());
        let env = env(postgres, Some(store), false).await;
        let alice = user("alice");
        let id = env.docs.upload(&alice, named("kept.txt"), once("kept bytes")).await.unwrap().document.id;
        let export: BulkRequest =
            serde_json::from_value(serde_json::json!({"operation": "export", "documentIds": [id]})).unwrap();
        let meta = env.docs.meta();
        let planned = Planned { ids: vec![id], tags: Vec::new() };
        let created = bulk::create(meta, env.clock.now_ms(), &alice, &export, planned).await.unwrap();
        for attempt in 1..=bulk::MAX_EXPORT_FAILURES {
            let runner = format!("replica-{attempt}");
            let mut job = bulk::claim(meta, env.clock.now_ms(), &runner).await.unwrap().expect("the job, tried again");
            let mut zip = Export::start(&env.docs, &job);
            let (name, bytes) = Export::open(&env.docs, &job, id).await.unwrap();
            let added = zip.add(id, &name, bytes).await;
            job.record(id, added);
            let why = zip.finish().await.unwrap_err().to_string();
            let failed = bulk::export_failed(&env.docs, &mut job, &runner, &why).await.unwrap();
            assert_eq!(failed, attempt == bulk::MAX_EXPORT_FAILURES, "try {attempt}");
            if !failed {
                assert!(bulk::claim(meta, env.clock.now_ms(), "eager").await.unwrap().is_none(), "a pause first");
                env.clock.advance(bulk::EXPORT_RETRY_MS * attempt + 1);
            }
        }
        let job = bulk::get(meta, &alice, &created.id).await.unwrap();
        assert_eq!(job.status, JobStatus::Failed);
        assert!(job.failure.as_deref().is_some_and(|f| f.contains("could not be stored")), "{job:?}");
        assert!(job.download.is_none() && job.finished_at.is_some(), "{job:?}");
        assert!(bulk::claim(meta, env.clock.now_ms() + 3_600_000, "late").await.unwrap().is_none(), "for good");
        let ended: Vec<serde_json::Value> = outbox::pending(meta, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|p| p.event.payload["jobId"] == created.id.as_str())
            .map(|p| p.event.payload["status"].clone())
            .collect();
        assert_eq!(ended, [serde_json::json!("FAILED")]);
        assert_eq!(read_all(&env, &alice, id, None).await, b"kept bytes", "the document is untouched");
    }
}

async fn legal_hold_blocks_deletion(env: Env) {
    let alice = user("alice");
    let doc = env.docs.upload(&alice, named("evidence.txt"), once("exhibit A")).await.unwrap().document;
    assert!(matches!(env.docs.set_legal_hold(&alice, doc.id, true).await, Err(DocError::Forbidden(_))));
    assert!(env.docs.set_legal_hold(&admin(), doc.id, true).await.unwrap().legal_hold);
    assert!(matches!(env.docs.delete(&alice, doc.id).await, Err(DocError::Conflict(_))));
    assert!(matches!(env.docs.purge(&admin(), doc.id).await, Err(DocError::Conflict(_))));
    assert_eq!(read_all(&env, &alice, doc.id, None).await, b"exhibit A");
    assert!(!env.docs.set_legal_hold(&admin(), doc.id, false).await.unwrap().legal_hold);
    env.docs.delete(&alice, doc.id).await.unwrap();
}

async fn bad_input_changes_nothing(env: Env) {
    let alice = user("alice");
    for bad in ["../../etc/passwd", "", "a\u{7}b"] {
        let err = env.docs.upload(&alice, named(bad), once("x")).await.unwrap_err();
        assert!(matches!(err, DocError::Invalid(_)), "{bad:?}: {err}");
    }
    let typed = NewDocument { content_type: Some("nonsense".into()), ..named("a.txt") };
    assert!(matches!(env.docs.upload(&alice, typed, once("x")).await, Err(DocError::Invalid(_))));
    let big = vec![0u8; (10 << 20) + 1];
    let err = env.docs.upload(&alice, named("big.bin"), once(Bytes::from(big))).await.unwrap_err();
    assert!(matches!(err, DocError::TooLarge { .. }), "{err}");
    let failing =
        futures::stream::iter([Ok(Bytes::from_static(b"partial")), Err(std::io::Error::other("client went away"))]);
    assert!(matches!(env.docs.upload(&alice, named("cut.txt"), failing).await, Err(DocError::Invalid(_))));
    assert_eq!(objects(&env.store).await, 0, "nothing stored");
    assert_eq!(env.docs.list(&admin(), &ListQuery::default()).await.unwrap().items.len(), 0);
    assert!(outbox::pending(env.docs.meta(), 10).await.unwrap().is_empty(), "no event");
}

/// A purge and an upload of the same bytes racing: whichever wins, the upload's document
/// stays readable.
#[tokio::test]
async fn postgres_purge_racing_a_deduplicating_upload_loses_nothing() {
    let env = env(true, None, false).await;
    let alice = user("alice");
    for round in 0..20 {
        let body = format!("contested bytes {round}");
        let old = env.docs.upload(&alice, named("old.txt"), once(body.clone())).await.unwrap().document;
        let (purged, uploaded) =
            tokio::join!(env.docs.purge(&alice, old.id), env.docs.upload(&alice, named("new.txt"), once(body.clone())));
        purged.unwrap();
        let new = uploaded.unwrap().document;
        assert_eq!(read_all(&env, &alice, new.id, None).await, body.as_bytes(), "round {round}");
        env.docs.purge(&alice, new.id).await.unwrap();
    }
    assert_eq!(objects(&env.store).await, 0);
}

/// An upload whose content another transaction records while it records it (a
/// resharding copy bringing a document with the same bytes to the shard, an upload of the
/// same bytes): it waits for that one, then finds the content recorded and is answered as
/// deduplicated, not with an error.
#[tokio::test]
async fn postgres_an_upload_racing_another_record_of_its_content_is_deduplicated() {
    use sha2::Digest as _;
    let env = env(true, None, false).await;
    let body = "recorded by another transaction first";
    let sha = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    let size = i64::try_from(body.len()).unwrap();
    let mut other = env.docs.meta().begin_with(None).await.unwrap();
    sqlx::query(
        "INSERT INTO blobs (sha256, object_key, tier, size, stored_size, compression, created_at) \
         VALUES ($1, 'objects/recorded-elsewhere', 'hot', $2, $2, 'none', 0)",
    )
    .bind(&sha)
    .bind(size)
    .execute(&mut *other)
    .await
    .unwrap();
    let alice = user("alice");
    let upload = env.docs.upload(&alice, named("same.txt"), once(body.to_owned()));
    let commit = async {
        // Long enough for the upload to reach its record and wait on this one's row.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        other.commit().await.unwrap();
    };
    let (uploaded, ()) = tokio::join!(upload, commit);
    let uploaded = uploaded.unwrap();
    assert!(uploaded.deduplicated, "the content was recorded first by the other transaction");
    assert_eq!(uploaded.document.checksum, format!("sha256:{sha}"));
    assert_eq!(objects(&env.store).await, 0, "the upload's own copy was not needed and is gone");
}

/// The same service on a real S3-compatible server.
#[tokio::test]
async fn s3_tier_stores_reads_ranges_and_purges() {
    let bucket = TestBucket::new().await.unwrap();
    let store: Arc<dyn ObjectStore> = bucket.store().unwrap();
    let env = env(true, Some(Arc::clone(&store)), true).await;
    let alice = user("alice");
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        body.chunks(65_536).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let doc = env.docs.upload(&alice, named("big.bin"), futures::stream::iter(chunks)).await.unwrap().document;
    assert_eq!(read_all(&env, &alice, doc.id, None).await, body);
    let content = env.docs.content(&alice, doc.id, None).await.unwrap();
    let part = concat(env.docs.read(&content, Some(1_000_000..1_000_100)).await.unwrap()).await;
    assert_eq!(part, &body[1_000_000..1_000_100]);
    env.docs.purge(&alice, doc.id).await.unwrap();
    assert_eq!(objects(&store).await, 0);
}

#[tokio::test]
async fn s3_tiers_on_one_bucket_copy_inside_it_and_other_backends_do_not() {
    let bucket = TestBucket::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tier = |name: &str, class: &str, default: bool| {
        format!(
            "---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: {name}}}\nspec:\n  class: {class}\n  \
             default: {default}\n  backend:\n    url: 's3://{}/{name}'\n    endpoint: '{}'\n    region: '{}'\n    \
             secretRef: {{name: s3}}\n    options: {{aws_allow_http: 'true', aws_virtual_hosted_style_request: 'false'}}\n",
            bucket.name, bucket.endpoint, bucket.region
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: s3}}\nstringData:\n  aws_access_key_id: '{}'\n  \
         aws_secret_access_key: '{}'\n{}{}---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: mem}}\n\
         spec: {{class: FROZEN, backend: {{url: 'memory://'}}}}\n",
        bucket.access_key,
        bucket.secret_key,
        tier("hot", "HOT", true),
        tier("cold", "COLD", false)
    );
    std::fs::write(dir.path().join("tiers.yaml"), yaml).unwrap();
    let (_, config, secrets) = vellum_core::config::compile_dir(dir.path()).unwrap();
    let tiers = Tiers::open(&config, &secrets, dir.path()).unwrap();
    let (hot, cold, mem) = (tiers.get("hot").unwrap(), tiers.get("cold").unwrap(), tiers.get("mem").unwrap());
    let stored = hot.write(once("copied inside the bucket"), false, 1 << 20).await.unwrap();
    let copied = hot.copy_within(&stored.object_key, &cold, "blobs/copied").await.expect("one backend").unwrap();
    assert_eq!(copied, stored.stored_size);
    let back = concat(cold.read("blobs/copied", Codec::None, None).await.unwrap()).await;
    assert_eq!(back, b"copied inside the bucket");
    assert!(hot.copy_within(&stored.object_key, &mem, "blobs/x").await.is_none(), "another backend streams");
}

#[tokio::test]
async fn rotated_database_credentials_serve_new_connections_and_resized_pools_and_another_database_is_refused() {
    let db = TestDatabase::new().await.unwrap();
    let admin = db.pool().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let role = format!("vellum_rotated_{}", uuid_suffix());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN PASSWORD 'a-rotated-password'")))
        .execute(&admin)
        .await
        .unwrap();
    let mut rotated = url::Url::parse(&db.url).unwrap();
    rotated.set_username(&role).unwrap();
    rotated.set_password(Some("a-rotated-password")).unwrap();
    // The native driver's pool (the mover's), open before the rotation, holds a
    // connection logged in as before.
    let mut before = meta.begin_native(None).await.unwrap().expect("Postgres");
    let user: String = sqlx::query_scalar("SELECT CAST(current_user AS TEXT)").fetch_one(&mut *before).await.unwrap();
    assert_ne!(user, role);
    assert_eq!(meta.rotate(rotated.as_str()), Ok(true));
    assert_eq!(meta.rotate(rotated.as_str()), Ok(false), "nothing changed");
    // Its next connection logs in with the rotated credentials too.
    let mut after = meta.begin_native(None).await.unwrap().expect("Postgres");
    let user: String = sqlx::query_scalar("SELECT CAST(current_user AS TEXT)").fetch_one(&mut *after).await.unwrap();
    assert_eq!(user, role);
    after.rollback().await.unwrap();
    before.rollback().await.unwrap();
    // The store shows no password.
    let shown = format!("{meta:?}");
    assert!(shown.contains("Metadata") && !shown.contains("a-rotated-password"), "{shown}");

    // The connections open stay; every new one logs in with the rotated credentials.
    while meta.pool().size() > 0 {
        meta.pool().acquire().await.unwrap().close().await.unwrap();
    }
    let user: String = sqlx::query_scalar("SELECT CAST(current_user AS TEXT)").fetch_one(meta.pool()).await.unwrap();
    assert_eq!(user, role);
    // A pool made for another share of a replica's connections (a shard kept through a
    // routing change) has that size, and logs in with the credentials in use.
    let resized = meta.resized(5).await.unwrap();
    assert_eq!((meta.max_connections(), resized.max_connections()), (16, 5));
    let user: String = sqlx::query_scalar("SELECT CAST(current_user AS TEXT)").fetch_one(resized.pool()).await.unwrap();
    assert_eq!(user, role);
    resized.pool().close().await;

    // Another database is not a rotation; the message never quotes a URL.
    let mut elsewhere = rotated.clone();
    elsewhere.set_path("/another_database");
    let refused = meta.rotate(elsewhere.as_str()).unwrap_err();
    assert!(refused.contains("another database") && !refused.contains("a-rotated-password"), "{refused}");
    assert_eq!(meta.rotate(rotated.as_str()), Ok(false), "the refused URL was not taken");
    meta.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}"))).execute(&admin).await.unwrap();
}

fn uuid_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Two SQLite shards sharing one memory tier, under a two-shard ring.
async fn two_shards(dir: &std::path::Path) -> (vellum_core::documents::Library, Arc<dyn ObjectStore>, Clock) {
    let table = Arc::new(support::ring(&["s0", "s1"]));
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::clone(&store));
    let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
    let clock = Clock::manual(T0);
    let mut shards = Vec::new();
    for n in 0..2 {
        let meta = Metadata::open(&format!("sqlite://{}", dir.join(format!("s{n}.db")).display())).await.unwrap();
        shards.push(Documents::new(meta, tiers.clone(), clock.clone(), None, 10 << 20));
    }
    (vellum_core::documents::Library::sharded(table, shards), store, clock)
}

async fn claims(docs: &Documents) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM blob_garbage").fetch_one(docs.meta().pool()).await.unwrap()
}

#[tokio::test]
async fn a_library_upload_stores_claims_and_records_on_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (library, store, clock) = two_shards(dir.path()).await;
    let alice = user("alice");
    let mut expected = Vec::new();
    for i in 0..24 {
        let mut upload = library.begin_document();
        upload.store("text/plain", once(format!("document {i}"))).await.unwrap();
        assert!(upload.is_stored());
        let prepared = Documents::prepare(named(&format!("d{i}.txt"))).unwrap();
        let doc = upload.finish(&alice, &prepared).await.unwrap().document;
        let mut version = library.begin_version(&alice, doc.id).await.unwrap();
        assert_eq!(version.current().id, doc.id);
        version.store("text/plain", once(format!("version 2 of {i}"))).await.unwrap();
        version.finish(&alice, NewVersion::default()).await.unwrap();
        expected.push((doc.id, format!("document {i}"), format!("version 2 of {i}")));
    }
    let per_shard: Vec<usize> =
        library.shards().iter().map(|s| expected.iter().filter(|(id, ..)| s.owns_id(*id)).count()).collect();
    assert!(per_shard.iter().all(|n| *n > 0), "24 documents did not reach both shards: {per_shard:?}");
    for shard in library.shards() {
        assert_eq!(claims(shard).await, 0, "a recorded upload left its claim behind");
    }
    // A day later the collector finds nothing to delete on either shard.
    clock.advance(48 * 3_600_000);
    for shard in library.shards() {
        assert_eq!(shard.collect_garbage().await.unwrap(), 0);
    }
    assert_eq!(objects(&store).await, 48);
    for (id, first, second) in &expected {
        let shard = library.of(*id);
        for (version, bytes) in [(1, first), (2, second)] {
            let content = shard.content(&alice, *id, Some(version)).await.unwrap();
            assert_eq!(concat(shard.read(&content, None).await.unwrap()).await, bytes.as_bytes());
        }
    }

    // The same bytes on both shards are stored once per shard: purging the copy on one
    // shard and collecting leaves the other's readable, and so does a restored version.
    let mut twins: [Option<i64>; 2] = [None, None];
    for _ in 0..64 {
        let mut upload = library.begin_document();
        upload.store("text/plain", once("the same bytes")).await.unwrap();
        let prepared = Documents::prepare(named("twin.txt")).unwrap();
        let id = upload.finish(&alice, &prepared).await.unwrap().document.id;
        let on = usize::from(library.shards()[1].owns_id(id));
        twins[on].get_or_insert(id);
        if twins.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(gone), Some(kept)] = twins else { panic!("64 documents did not reach both shards") };
    library.of(gone).purge(&admin(), gone).await.unwrap();
    let restored = library.of(expected[0].0).restore_version(&alice, expected[0].0, 1).await.unwrap();
    clock.advance(48 * 3_600_000);
    for shard in library.shards() {
        shard.collect_garbage().await.unwrap();
    }
    let content = library.of(kept).content(&alice, kept, None).await.unwrap();
    assert_eq!(concat(library.of(kept).read(&content, None).await.unwrap()).await, b"the same bytes");
    let shard = library.of(expected[0].0);
    let content = shard.content(&alice, expected[0].0, Some(restored.version_number)).await.unwrap();
    assert_eq!(concat(shard.read(&content, None).await.unwrap()).await, expected[0].1.as_bytes());

    // An abandoned upload deletes its copy; one stored twice or never is refused.
    let mut abandoned = library.begin_document();
    abandoned.store("text/plain", once("abandoned")).await.unwrap();
    assert!(matches!(abandoned.store("text/plain", once("again")).await, Err(DocError::Invalid(_))));
    let before = objects(&store).await;
    abandoned.abandon().await;
    assert_eq!(objects(&store).await, before - 1);
    let empty = library.begin_document();
    let prepared = Documents::prepare(named("empty.txt")).unwrap();
    assert!(matches!(empty.finish(&alice, &prepared).await, Err(DocError::Invalid(_))));
    // A new version of a document the actor may not see is refused before any byte.
    assert!(matches!(library.begin_version(&user("mallory"), expected[0].0).await, Err(DocError::NotFound(_))));
}

#[tokio::test]
async fn a_database_that_refuses_says_so_in_words_without_the_servers_source_lines() {
    let db = TestDatabase::new().await.unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_password(Some("not-the-password")).unwrap();
    let wrong_password = Metadata::connect(url.as_str()).await.unwrap_err();
    url.set_username("no_such_role_here").unwrap();
    let no_role = Metadata::connect(url.as_str()).await.unwrap_err();
    for e in [&wrong_password, &no_role] {
        assert!(e.is_bad_credentials(), "{e}");
        assert!(!e.brief().contains(" at line "), "Postgres' source line stays out: {}", e.brief());
        assert!(!e.brief().contains("not-the-password"), "{}", e.brief());
    }
    assert!(wrong_password.brief().contains("password authentication failed"), "{}", wrong_password.brief());

    // A port nothing listens on: refused, in those words.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = Metadata::connect(&format!("postgres://vellum:secret@127.0.0.1:{port}/vellum")).await.unwrap_err();
    assert!(!refused.is_bad_credentials());
    assert_eq!(refused.brief(), "connection refused");
}
