//! Live resharding moves upload sessions (chunked and tus) with their chunks, on two real
//! Postgres databases sharing one tier: a session open when the move begins goes on
//! through it and after the flip, a chunk that arrives while its session is handed over is
//! recorded where the session went, a session whose document is being assembled is waited
//! for, and the documents the sessions become download byte-exact.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use vellum_core::blob::{Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, DocError, Documents, Library};
use vellum_core::resharding::{hand_over_sessions, run_move};
use vellum_core::routing::RoutingTable;
use vellum_core::store::Metadata;
use vellum_core::uploads::Initiate;
use vellum_testkit::TestDatabase;

mod support;
use support::ring;

const START: i64 = 1_767_225_600_000;
const GRACE: i64 = 5 * 60_000;

struct Platform {
    a: Documents,
    b: Documents,
    store: Arc<dyn ObjectStore>,
    one: Arc<RoutingTable>,
    two: Arc<RoutingTable>,
    _dbs: [TestDatabase; 2],
}

async fn platform() -> Platform {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::clone(&store));
    let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
    let clock = Clock::manual(START);
    let (da, db) = (TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap());
    let a = Documents::new(Metadata::open(&da.url).await.unwrap(), tiers.clone(), clock.clone(), None, 1 << 20);
    let b = Documents::new(Metadata::open(&db.url).await.unwrap(), tiers, clock, None, 1 << 20);
    Platform { a, b, store, one: Arc::new(ring(&["a"])), two: Arc::new(ring(&["a", "b"])), _dbs: [da, db] }
}

impl Platform {
    /// Every replica before the move: one shard.
    fn before(&self) -> Library {
        Library::sharded(Arc::clone(&self.one), vec![self.a.clone()])
    }

    /// A replica that knows the move from one shard to two.
    fn growing(&self) -> Library {
        Library::moving(Arc::clone(&self.one), Some(Arc::clone(&self.two)), Vec::new(), self.both())
    }

    /// Every replica after the flip.
    fn after(&self) -> Library {
        Library::sharded(Arc::clone(&self.two), self.both())
    }

    fn both(&self) -> Vec<Documents> {
        vec![self.a.clone(), self.b.clone()]
    }

    /// The session keys `shard` holds.
    async fn sessions_on(&self, shard: &Documents) -> Vec<String> {
        sqlx::query_scalar("SELECT id FROM upload_sessions ORDER BY id").fetch_all(shard.meta().pool()).await.unwrap()
    }
}

fn alice() -> Actor {
    Actor { user: "alice".into(), admin: false }
}

fn init(i: usize) -> Initiate {
    Initiate { filename: format!("s{i}.bin"), total_size: 12, chunk_size: Some(4), ..Initiate::default() }
}

/// Session `i`'s bytes: 12 of them.
fn content(i: usize) -> Vec<u8> {
    format!("session {i:03}.").into_bytes()[..12].to_vec()
}

/// `what` as expected, or an error saying what it is instead.
fn expect<T: PartialEq + std::fmt::Debug>(what: &str, found: &T, want: &T) -> Result<(), DocError> {
    if found == want { Ok(()) } else { Err(DocError::Invalid(format!("{what} is {found:?}, not {want:?}"))) }
}

async fn download(library: &Library, id: i64) -> Vec<u8> {
    let me = alice();
    let content = library.at(id, |shard| Box::pin(shard.content(&me, id, None))).await.unwrap();
    let stream = library.at(id, |shard| Box::pin(shard.read(&content, None))).await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    chunks.concat()
}

/// A body that sends `bytes` once `go` fires: the request is in flight, its session looked
/// up, while the test hands the session over.
fn held_body(
    bytes: Vec<u8>,
    go: tokio::sync::oneshot::Receiver<()>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send {
    futures::stream::once(async move {
        go.await.ok();
        Ok(Bytes::from(bytes))
    })
    .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_when_a_move_begins_go_on_through_it_and_after_the_flip() {
    let p = platform().await;
    let me = alice();
    let before = p.before();
    // 30 chunked sessions with their first chunk, 30 tus uploads with their first 4 bytes.
    let mut chunked = Vec::new();
    let mut tus = Vec::new();
    for i in 0..30 {
        let session = before.initiate_upload(&me, init(i)).await.unwrap();
        before.put_chunk(&me, &session.session_id, 0, None, once(content(i)[..4].to_vec())).await.unwrap();
        chunked.push((i, session.session_id));
        let upload = before.tus_create(&me, 12, Some("filename dC5iaW4=")).await.unwrap();
        before.tus_append(&me, &upload.id, 0, None, once(content(100 + i)[..4].to_vec())).await.unwrap();
        tus.push((100 + i, upload.id));
    }
    let moving: Vec<&String> =
        chunked.iter().chain(&tus).map(|(_, id)| id).filter(|id| p.two.shard_of_key(id) == 1).collect();
    assert!(moving.len() > 10, "a good part of the sessions move: {}", moving.len());

    // While the mover runs, the clients go on: the second chunk of every session, the
    // next 4 bytes of every upload, and status reads, through a replica that knows the move.
    let growing = p.growing();
    let done = AtomicBool::new(false);
    let failures = std::sync::Mutex::new(Vec::new());
    let mover = async {
        let sums = run_move(&growing, 3, GRACE, &|_| {}).await;
        done.store(true, Ordering::SeqCst);
        sums
    };
    let clients = async {
        let mut requests = 0;
        for ((i, id), (j, upload)) in chunked.iter().zip(&tus) {
            let mut note = |what: &str, e: Option<DocError>| {
                requests += 1;
                if let Some(e) = e {
                    failures.lock().unwrap().push(format!("{what}: {e}"));
                }
            };
            let r = growing.put_chunk(&me, id, 1, None, once(content(*i)[4..8].to_vec())).await;
            note("chunk 1", r.err());
            let r = growing.tus_append(&me, upload, 4, None, once(content(*j)[4..8].to_vec())).await;
            note("tus 4..8", r.err());
            let r = growing.upload_status(&me, id).await.and_then(|s| expect("chunks", &s.uploaded_chunks, &2));
            note("status", r.err());
            let r = growing.tus_status(&me, upload).await.and_then(|u| expect("offset", &u.offset, &8));
            note("tus status", r.err());
            let r = growing.missing_chunks(&me, id).await.and_then(|m| expect("missing", &m, &vec![2]));
            note("missing", r.err());
        }
        requests
    };
    let (sums, requests) = tokio::join!(mover, clients);
    sums.unwrap();
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of {requests} requests failed: {failures:?}", failures.len());

    // Each session is where the new table sends it, with its chunks, once.
    let (on_a, on_b) = (p.sessions_on(&p.a).await, p.sessions_on(&p.b).await);
    assert_eq!(on_a.len() + on_b.len(), 60, "every session once");
    assert!(on_a.iter().all(|id| p.two.shard_of_key(id) == 0) && on_b.iter().all(|id| p.two.shard_of_key(id) == 1));
    assert_eq!(on_b.len(), moving.len());

    // A replica still on the old table is sent on by the markers, and told to retry while
    // it has not loaded the shard a session went to, never told it is gone.
    let handed = moving[0];
    assert!(matches!(before.upload_status(&me, handed).await, Err(DocError::Unavailable(_))));
    assert!(growing.upload_status(&me, handed).await.is_ok());

    // After the flip the sessions finish, and become their documents, byte-exact.
    let after = p.after();
    for (i, id) in &chunked {
        after.put_chunk(&me, id, 2, None, once(content(*i)[8..].to_vec())).await.unwrap();
        let uploaded = after.complete_upload(&me, id).await.unwrap();
        assert_eq!(download(&after, uploaded.document.id).await, content(*i), "session {i}");
        let again = after.complete_upload(&me, id).await.unwrap();
        assert_eq!(again.document.id, uploaded.document.id, "completing again answers the same document");
    }
    for (i, id) in &tus {
        let upload = after.tus_append(&me, id, 8, None, once(content(*i)[8..].to_vec())).await.unwrap();
        let document = upload.document_id.expect("the last byte completes the upload");
        assert_eq!(download(&after, document).await, content(*i), "upload {i}");
    }
    // The chunks' bytes went with the sessions' completion; only the documents' remain.
    let objects: Vec<_> = p.store.list(None).try_collect().await.unwrap();
    let documents = objects.iter().filter(|o| !o.location.as_ref().contains("uploads/")).count();
    assert_eq!((objects.len(), documents), (60, 60), "no chunk left behind");
}

#[tokio::test]
async fn a_chunk_arriving_while_its_session_is_handed_over_is_recorded_where_it_went() {
    let p = platform().await;
    let me = alice();
    let growing = p.growing();
    let session = loop {
        let s = p.before().initiate_upload(&me, init(1)).await.unwrap();
        if p.two.shard_of_key(&s.session_id) == 1 {
            break s.session_id;
        }
    };
    let upload = loop {
        let u = p.before().tus_create(&me, 12, None).await.unwrap();
        if p.two.shard_of_key(&u.id) == 1 {
            break u.id;
        }
    };
    // The requests look their session up on a, then wait for their bytes...
    let (go, wait) = tokio::sync::oneshot::channel();
    let (tus_go, tus_wait) = tokio::sync::oneshot::channel();
    let chunk = growing.put_chunk(&me, &session, 0, None, held_body(content(1)[..4].to_vec(), wait));
    let append = growing.tus_append(&me, &upload, 0, None, held_body(content(2), tus_wait));
    let handover = async {
        // ...while both sessions are handed over to b.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let ids = vec![session.clone(), upload.clone()];
        let moved = hand_over_sessions(p.a.meta(), p.b.meta(), "b", &ids, START).await.unwrap();
        assert_eq!((moved.moved, moved.busy), (2, 0));
        go.send(()).unwrap();
        tus_go.send(()).unwrap();
    };
    let (chunk, append, ()) = tokio::join!(chunk, append, handover);
    let status = chunk.unwrap();
    assert_eq!((status.uploaded_chunks, status.uploaded_bytes), (1, 4), "the chunk is recorded on b");
    let completed = append.unwrap();
    let document = completed.document_id.expect("the upload completed where it went");
    assert_eq!(download(&growing, document).await, content(2));
    let on_b = p.sessions_on(&p.b).await;
    assert!(!p.sessions_on(&p.a).await.iter().any(|id| *id == session || *id == upload));
    assert!(on_b.contains(&session) && on_b.contains(&upload));
    // The rest of the chunked session goes on at b, through the markers.
    growing.put_chunk(&me, &session, 1, None, once(content(1)[4..8].to_vec())).await.unwrap();
    growing.put_chunk(&me, &session, 2, None, once(content(1)[8..].to_vec())).await.unwrap();
    let uploaded = growing.complete_upload(&me, &session).await.unwrap();
    assert_eq!(download(&growing, uploaded.document.id).await, content(1));
    // A cancellation follows a session too.
    let cancelled = loop {
        let s = p.before().initiate_upload(&me, init(3)).await.unwrap();
        if p.two.shard_of_key(&s.session_id) == 1 {
            break s.session_id;
        }
    };
    hand_over_sessions(p.a.meta(), p.b.meta(), "b", std::slice::from_ref(&cancelled), START).await.unwrap();
    growing.cancel_upload(&me, &cancelled).await.unwrap();
    assert!(matches!(p.after().upload_status(&me, &cancelled).await, Ok(s) if s.status == "CANCELLED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_being_completed_is_waited_for_and_then_moved() {
    let p = platform().await;
    let me = alice();
    let mut ids = BTreeSet::new();
    while ids.len() < 3 {
        let s = p.before().initiate_upload(&me, init(ids.len())).await.unwrap();
        if p.two.shard_of_key(&s.session_id) == 1 {
            ids.insert(s.session_id);
        }
    }
    let busy = ids.iter().next().unwrap().clone();
    // A replica holds its completion lock (it is assembling the document).
    sqlx::query("UPDATE upload_sessions SET status = 'COMPLETING', lock_until = $1 WHERE id = $2")
        .bind(START + 60_000)
        .bind(&busy)
        .execute(p.a.meta().pool())
        .await
        .unwrap();
    let growing = p.growing();
    let mover = run_move(&growing, 10, GRACE, &|_| {});
    tokio::pin!(mover);
    tokio::select! {
        r = &mut mover => panic!("the move ended while a session was being completed: {r:?}"),
        () = tokio::time::sleep(std::time::Duration::from_millis(800)) => {}
    }
    let moving = |on: Vec<String>| on.into_iter().filter(|id| ids.contains(id)).collect::<Vec<_>>();
    assert_eq!(moving(p.sessions_on(&p.a).await), vec![busy.clone()], "the others moved, the busy one waits");
    sqlx::query("UPDATE upload_sessions SET status = 'ACTIVE', lock_until = NULL WHERE id = $1")
        .bind(&busy)
        .execute(p.a.meta().pool())
        .await
        .unwrap();
    mover.await.unwrap();
    assert!(moving(p.sessions_on(&p.a).await).is_empty());
    assert_eq!(moving(p.sessions_on(&p.b).await).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_shard_being_drained_becomes_a_document_on_a_shard_that_stays() {
    let p = platform().await;
    let me = alice();
    let after = p.after();
    let session = loop {
        let s = after.initiate_upload(&me, init(7)).await.unwrap();
        if p.two.shard_of_key(&s.session_id) == 1 {
            break s.session_id;
        }
    };
    for n in 0..3 {
        let part = content(7)[n * 4..n * 4 + 4].to_vec();
        after.put_chunk(&me, &session, n as u64, None, once(part)).await.unwrap();
    }
    // b leaves: the routing sends no new document there, so the session, still on b,
    // completes into a document on a.
    let shrinking = Library::moving(Arc::clone(&p.two), Some(Arc::clone(&p.one)), Vec::new(), p.both());
    let uploaded = shrinking.complete_upload(&me, &session).await.unwrap();
    let id = uploaded.document.id;
    assert_eq!(p.one.shard_of_id(id), 0);
    assert!(p.a.get(&me, id).await.is_ok(), "recorded on a");
    run_move(&shrinking, 10, GRACE, &|_| {}).await.unwrap();
    assert!(p.sessions_on(&p.b).await.is_empty(), "b is drained of sessions");
    let alone = p.before();
    assert_eq!(alone.upload_status(&me, &session).await.unwrap().status, "COMPLETED");
    assert_eq!(alone.complete_upload(&me, &session).await.unwrap().document.id, id);
    assert_eq!(download(&alone, id).await, content(7));
}
