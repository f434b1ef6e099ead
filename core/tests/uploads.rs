//! Upload sessions on SQLite and Postgres: expiry with a manual clock, and a property test
//! driving the session state machine with random operations.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use proptest::prelude::*;
use vellum_core::blob::{Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, DocError, Documents};
use vellum_core::store::Metadata;
use vellum_core::uploads::{Initiate, SESSION_TTL_MS};
use vellum_testkit::TestDatabase;

struct Env {
    docs: Documents,
    store: Arc<dyn ObjectStore>,
    clock: Clock,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn env(postgres: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (url, db) = TestDatabase::or_sqlite(postgres, dir.path()).await.unwrap();
    let meta = Metadata::open(&url).await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::clone(&store));
    let clock = Clock::manual(1_767_225_600_000);
    let docs = Documents::new(meta, Tiers::new(vec![Arc::new(tier)], "hot").unwrap(), clock.clone(), None, 1 << 20);
    Env { docs, store, clock, _db: db, _dir: dir }
}

fn alice() -> Actor {
    Actor { user: "alice".into(), admin: false }
}

async fn objects(store: &Arc<dyn ObjectStore>) -> usize {
    store.list(None).try_collect::<Vec<_>>().await.unwrap().len()
}

fn init(total: u64, chunk: u64) -> Initiate {
    Initiate { filename: "f.bin".into(), total_size: total, chunk_size: Some(chunk), ..Initiate::default() }
}

async fn sessions_expire_after_a_day_and_leave_no_chunks(env: Env) {
    let session = env.docs.initiate_upload(&alice(), init(10, 5)).await.unwrap();
    let id = session.session_id;
    env.docs.put_chunk(&alice(), &id, 0, None, once("01234")).await.unwrap();
    assert_eq!(objects(&env.store).await, 1);
    env.clock.advance(SESSION_TTL_MS - 1);
    assert_eq!(env.docs.expire_uploads().await.unwrap(), 0);
    env.clock.advance(1);
    assert!(matches!(env.docs.put_chunk(&alice(), &id, 1, None, once("56789")).await, Err(DocError::Gone(_))));
    assert_eq!(env.docs.upload_status(&alice(), &id).await.unwrap().status, "EXPIRED");
    assert_eq!(env.docs.expire_uploads().await.unwrap(), 1);
    assert_eq!(objects(&env.store).await, 0);
    assert!(matches!(env.docs.complete_upload(&alice(), &id).await, Err(DocError::Gone(_))));
}

#[tokio::test]
async fn sqlite_sessions_expire() {
    sessions_expire_after_a_day_and_leave_no_chunks(env(false).await).await;
}

#[tokio::test]
async fn postgres_sessions_expire() {
    sessions_expire_after_a_day_and_leave_no_chunks(env(true).await).await;
}

#[derive(Clone, Debug)]
enum Op {
    Put { n: u64, corrupt: bool },
    Complete,
    Cancel,
    Age(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..5, prop::bool::weighted(0.2)).prop_map(|(n, corrupt)| Op::Put { n, corrupt }),
        2 => Just(Op::Complete),
        1 => Just(Op::Cancel),
        1 => (0i64..(SESSION_TTL_MS / 2)).prop_map(Op::Age),
    ]
}

/// A model of what the session should be, checked against the service after every step.
#[derive(Debug, Default)]
struct Model {
    received: std::collections::BTreeSet<u64>,
    state: &'static str,
    age: i64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn the_session_state_machine_holds(ops in prop::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let env = env(false).await;
            let data: Vec<u8> = (0..10u8).collect();
            // 10 bytes in chunks of 3: chunks 0..=3, the last one byte.
            let id = env.docs.initiate_upload(&alice(), init(10, 3)).await.unwrap().session_id;
            let mut model = Model { state: "ACTIVE", ..Model::default() };
            for op in ops {
                let expired = model.age >= SESSION_TTL_MS;
                match op {
                    Op::Put { n, corrupt } => {
                        let start = usize::try_from(n * 3).unwrap().min(10);
                        let mut bytes = data[start..(start + 3).min(10)].to_vec();
                        if corrupt { bytes.push(0) }
                        let result = env.docs.put_chunk(&alice(), &id, n, None, once(bytes)).await;
                        match (model.state, expired, n, corrupt) {
                            ("ACTIVE", false, 0..=3, false) => { result.unwrap(); model.received.insert(n); }
                            ("ACTIVE", false, _, _) => assert!(matches!(result, Err(DocError::Invalid(_))), "{result:?}"),
                            _ => assert!(matches!(result, Err(DocError::Gone(_))), "{result:?}"),
                        }
                    }
                    Op::Complete => {
                        let result = env.docs.complete_upload(&alice(), &id).await;
                        match (model.state, expired) {
                            ("COMPLETED", _) => { result.unwrap(); }
                            ("ACTIVE", false) if model.received.len() == 4 => {
                                let doc = result.unwrap().document;
                                assert_eq!(doc.size, 10);
                                model.state = "COMPLETED";
                            }
                            ("ACTIVE", false) => assert!(matches!(result, Err(DocError::Invalid(_))), "{result:?}"),
                            _ => assert!(matches!(result, Err(DocError::Gone(_))), "{result:?}"),
                        }
                    }
                    Op::Cancel => {
                        let result = env.docs.cancel_upload(&alice(), &id).await;
                        if model.state == "COMPLETED" {
                            assert!(matches!(result, Err(DocError::Conflict(_))), "{result:?}");
                        } else {
                            result.unwrap();
                            model.state = "CANCELLED";
                            model.received.clear();
                        }
                    }
                    Op::Age(ms) => { env.clock.advance(ms); model.age += ms; }
                }
                let missing = env.docs.missing_chunks(&alice(), &id).await.unwrap();
                if model.state == "ACTIVE" {
                    let expected: Vec<u64> = (0..4).filter(|n| !model.received.contains(n)).collect();
                    assert_eq!(missing, expected);
                }
                // Chunk objects exist only for a live session; a completed one leaves the document's blob.
                let live = if model.state == "ACTIVE" { model.received.len() } else { 0 };
                let documents = usize::from(model.state == "COMPLETED");
                assert_eq!(objects(&env.store).await, live + documents);
            }
        });
    }
}

fn sha256_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

/// A body that delivers `bytes` and then breaks, as a dropped connection does.
fn broken_after(
    bytes: &'static str,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin + Send {
    futures::stream::iter(vec![
        Ok(bytes::Bytes::from_static(bytes.as_bytes())),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")),
    ])
}

async fn tus_uploads_append_resume_and_expire(env: Env) {
    let docs = &env.docs;
    let meta = "filename bm90ZXMudHh0,tags YSxi";
    let upload = docs.tus_create(&alice(), 10, Some(meta)).await.unwrap();
    let id = upload.id.clone();
    assert_eq!((upload.offset, upload.length, upload.metadata.as_deref()), (0, 10, Some(meta)));
    assert_eq!(upload.expires_at_ms, env.clock.now_ms() + SESSION_TTL_MS);

    // A wrong offset, a wrong checksum and too many bytes change nothing.
    assert!(matches!(docs.tus_append(&alice(), &id, 3, None, once("abc")).await, Err(DocError::Conflict(_))));
    let wrong = format!("sha256 {}", sha256_b64(b"xyz"));
    assert!(matches!(
        docs.tus_append(&alice(), &id, 0, Some(&wrong), once("012")).await,
        Err(DocError::ChecksumMismatch(_))
    ));
    assert!(matches!(docs.tus_append(&alice(), &id, 0, None, once("0123456789A")).await, Err(DocError::Invalid(_))));
    assert_eq!(docs.tus_status(&alice(), &id).await.unwrap().offset, 0);
    assert_eq!(objects(&env.store).await, 0);

    // A broken connection keeps what arrived; a checked request keeps nothing of a broken body.
    let kept = docs.tus_append(&alice(), &id, 0, None, broken_after("0123")).await.unwrap_err();
    assert!(kept.to_string().contains("4 bytes, which were kept"), "{kept}");
    let checked = format!("sha256 {}", sha256_b64(b"45"));
    assert!(docs.tus_append(&alice(), &id, 4, Some(&checked), broken_after("45")).await.is_err());
    assert_eq!(docs.tus_status(&alice(), &id).await.unwrap().offset, 4);

    // Another user does not see the upload; the owner resumes and finishes it.
    let bob = Actor { user: "bob".into(), admin: false };
    assert!(matches!(docs.tus_status(&bob, &id).await, Err(DocError::SessionNotFound(_))));
    assert!(matches!(docs.put_chunk(&alice(), &id, 0, None, once("x")).await, Err(DocError::Invalid(_))));
    let upload = docs.tus_append(&alice(), &id, 4, Some(&checked), once("45")).await.unwrap();
    assert_eq!((upload.offset, upload.completed.is_none()), (6, true));
    let done = docs.tus_append(&alice(), &id, 6, None, once("6789")).await.unwrap();
    let uploaded = done.completed.unwrap();
    assert_eq!(done.document_id, Some(uploaded.document.id));
    assert_eq!((uploaded.document.filename.as_str(), uploaded.document.size), ("notes.txt", 10));
    assert_eq!(uploaded.document.tags, vec!["a", "b"]);
    let content = docs.content(&alice(), uploaded.document.id, None).await.unwrap();
    let content: Vec<u8> = docs.read(&content, None).await.unwrap().map_ok(|b| b.to_vec()).try_concat().await.unwrap();
    assert_eq!(content, b"0123456789");
    // Completed: the offset stays at the end, the segments are gone, only the blob remains.
    let status = docs.tus_status(&alice(), &id).await.unwrap();
    assert_eq!((status.offset, status.document_id), (10, Some(uploaded.document.id)));
    assert_eq!(objects(&env.store).await, 1);
    assert!(docs.tus_append(&alice(), &id, 10, None, futures::stream::empty()).await.is_ok());

    // The same bytes through tus again are deduplicated; an empty upload completes at once.
    let again = docs.tus_create(&alice(), 10, None).await.unwrap();
    let twice = docs.tus_append(&alice(), &again.id, 0, None, once("0123456789")).await.unwrap();
    assert!(twice.completed.unwrap().deduplicated);
    let empty = docs.tus_create(&alice(), 0, Some("filename ZS50eHQ=")).await.unwrap();
    assert_eq!(empty.completed.unwrap().document.size, 0);

    // Terminated and expired uploads are gone, and leave no segment behind.
    let ended = docs.tus_create(&alice(), 10, None).await.unwrap();
    docs.tus_append(&alice(), &ended.id, 0, None, once("01")).await.unwrap();
    docs.tus_terminate(&alice(), &ended.id).await.unwrap();
    assert!(matches!(docs.tus_status(&alice(), &ended.id).await, Err(DocError::Gone(_))));
    let stale = docs.tus_create(&alice(), 10, None).await.unwrap();
    docs.tus_append(&alice(), &stale.id, 0, None, once("01")).await.unwrap();
    env.clock.advance(SESSION_TTL_MS);
    assert!(matches!(docs.tus_append(&alice(), &stale.id, 2, None, once("2")).await, Err(DocError::Gone(_))));
    assert_eq!(docs.expire_uploads().await.unwrap(), 1);
    assert_eq!(objects(&env.store).await, 2, "the two documents' blobs, nothing else");
}

#[tokio::test]
async fn sqlite_tus_uploads() {
    tus_uploads_append_resume_and_expire(env(false).await).await;
}

#[tokio::test]
async fn postgres_tus_uploads() {
    tus_uploads_append_resume_and_expire(env(true).await).await;
}

/// Two replicas appending at one offset at once: exactly one wins, the other is told.
#[tokio::test]
async fn postgres_racing_tus_appends_do_not_both_land() {
    let env = env(true).await;
    let alice = alice();
    for _ in 0..10 {
        let upload = env.docs.tus_create(&alice, 4, None).await.unwrap();
        let (a, b) = tokio::join!(
            env.docs.tus_append(&alice, &upload.id, 0, None, once("ab")),
            env.docs.tus_append(&alice, &upload.id, 0, None, once("cd")),
        );
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        assert!(matches!(a.err().or(b.err()), Some(DocError::Conflict(_))));
        assert_eq!(env.docs.tus_status(&alice, &upload.id).await.unwrap().offset, 2);
        env.docs.tus_terminate(&alice, &upload.id).await.unwrap();
    }
    assert_eq!(objects(&env.store).await, 0);
}
