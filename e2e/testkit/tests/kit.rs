//! The kit really isolates tests from each other and really talks to the servers.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use sqlx::Row;
use vellum_testkit::{NatsProcess, PostgresProcess, TestBucket, TestDatabase, TestNats};

fn admin_url() -> String {
    std::env::var(vellum_testkit::env::DATABASE_URL)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vellum_testkit::env::DATABASE_URL_DEFAULT.to_owned())
}

async fn database_exists(name: &str) -> bool {
    let pool = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let row = sqlx::query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
    row.get::<i64, _>("n") == 1
}

#[tokio::test]
async fn databases_are_separate_and_dropped_afterwards() {
    let a = TestDatabase::new().await.unwrap();
    let b = TestDatabase::new().await.unwrap();
    assert_ne!(a.name, b.name);
    let pa = a.pool().await.unwrap();
    let pb = b.pool().await.unwrap();
    sqlx::query("CREATE TABLE documents (id int)").execute(&pa).await.unwrap();
    sqlx::query("INSERT INTO documents VALUES (1)").execute(&pa).await.unwrap();
    let missing = sqlx::query("SELECT * FROM documents").fetch_all(&pb).await;
    assert!(missing.is_err(), "a table of one test's database is not visible in another's");
    // The URL handed to code under test reaches the same database.
    let via_url = sqlx::PgPool::connect(&a.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&via_url).await.unwrap();
    assert_eq!(n, 1);
    via_url.close().await;
    pa.close().await;
    pb.close().await;
    let name = a.name.clone();
    assert!(database_exists(&name).await);
    drop(a);
    assert!(!database_exists(&name).await, "the database is dropped with the TestDatabase");
}

/// A client of the code under test may be half-way through authenticating when its test's
/// database is dropped, on the runtime the drop blocks. `DROP DATABASE` waits for such a
/// backend until the server's authentication timeout (a minute by default); the drop does
/// not wait with it, and the database is gone once the client is.
#[tokio::test]
async fn a_client_stuck_authenticating_does_not_hold_the_drop_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDatabase::new().await.unwrap();
    let name = db.name.clone();
    let admin: sqlx::postgres::PgConnectOptions = admin_url().parse().unwrap();
    let mut stuck = tokio::net::TcpStream::connect((admin.get_host(), admin.get_port())).await.unwrap();
    let mut body = 196_608_i32.to_be_bytes().to_vec();
    for (key, value) in [("user", admin.get_username()), ("database", name.as_str())] {
        body.extend_from_slice(format!("{key}\0{value}\0").as_bytes());
    }
    body.push(0);
    let mut startup = i32::try_from(body.len() + 4).unwrap().to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    stuck.write_all(&startup).await.unwrap();
    let mut kind = [0u8; 1];
    stuck.read_exact(&mut kind).await.unwrap();
    assert_eq!(kind[0], b'R', "the server answers the startup with an authentication request");

    let started = std::time::Instant::now();
    drop(db);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "the drop returned after {took:?}");
    drop(stuck);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while database_exists(&name).await {
        assert!(std::time::Instant::now() < deadline, "{name} is still there after its client went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_with_how_to_start_it() {
    let err =
        TestDatabase::on("postgres://postgres:secret-password@127.0.0.1:1/postgres").await.unwrap_err().to_string();
    assert!(err.contains("cannot reach Postgres"), "{err}");
    assert!(err.contains("scripts/test --services-only"), "{err}");
    assert!(err.contains("VELLUM_TEST_DATABASE_URL"), "{err}");
    assert!(!err.contains("secret-password"), "the password never appears in the message: {err}");

    let err = TestNats::on("nats://127.0.0.1:1").await.unwrap_err().to_string();
    assert!(err.contains("cannot reach NATS") && err.contains("VELLUM_TEST_NATS_URL"), "{err}");
}

#[tokio::test]
async fn nats_namespaces_are_separate_and_deduplicate_by_message_id() {
    let a = TestNats::new().await.unwrap();
    let b = TestNats::new().await.unwrap();
    assert_ne!(a.prefix, b.prefix);
    let name = a.stream_name("events");
    let stream = a
        .jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![a.subject(">")],
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "event-1");
        a.jetstream
            .publish_with_headers(a.subject("document.uploaded"), headers, Bytes::from_static(b"{}"))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A message in the other namespace does not land in this stream.
    b.client.publish(b.subject("document.uploaded"), Bytes::from_static(b"{}")).await.unwrap();
    b.client.flush().await.unwrap();
    let info = a.jetstream.get_stream(&name).await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "the re-published event is deduplicated, the other namespace's is not here");
    drop(stream);

    let js = a.jetstream.clone();
    drop(a);
    assert!(js.get_stream(&name).await.is_err(), "the stream is deleted with the TestNats");
}

#[tokio::test]
async fn buckets_are_separate_and_deleted_afterwards() {
    let a = TestBucket::new().await.unwrap();
    let b = TestBucket::new().await.unwrap();
    assert_ne!(a.name, b.name);
    let sa = a.store().unwrap();
    let sb = b.store().unwrap();
    let path = Path::from("blobs/ab/cdef");
    sa.put(&path, PutPayload::from_static(b"hello vellum")).await.unwrap();
    let got = sa.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello vellum");
    assert!(sb.get(&path).await.is_err(), "an object of one bucket is not in another");
    let listed: Vec<_> = sa.list(None).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);

    let probe = (*a).clone();
    assert!(probe.exists().await.unwrap());
    drop(a);
    assert!(!probe.exists().await.unwrap(), "the bucket is deleted with the TestBucket");
}

#[tokio::test]
async fn a_private_nats_server_keeps_jetstream_messages_across_a_kill() {
    let mut server = NatsProcess::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "DURABLE".into(),
        subjects: vec!["durable.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("durable.one", Bytes::from_static(b"1")).await.unwrap().await.unwrap();

    server.kill();
    assert!(async_nats::connect(server.url()).await.is_err(), "the killed server is gone");
    server.restart().unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream("DURABLE").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1, "the acknowledged message survived the kill");
}

#[tokio::test]
async fn a_private_postgres_keeps_committed_rows_across_a_kill() {
    let mut server = PostgresProcess::start().unwrap();
    let pool = sqlx::PgPool::connect(&server.url()).await.unwrap();
    sqlx::query("CREATE TABLE t (v text)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO t VALUES ('kept')").execute(&pool).await.unwrap();
    pool.close().await;

    server.kill();
    // A single connection, not a pool: a pool would retry until its acquire timeout.
    assert!(
        <sqlx::PgConnection as sqlx::Connection>::connect(&server.url()).await.is_err(),
        "the killed server is gone"
    );
    server.restart().unwrap();

    let pool = sqlx::PgPool::connect(&server.url()).await.unwrap();
    let v: String = sqlx::query_scalar("SELECT v FROM t").fetch_one(&pool).await.unwrap();
    assert_eq!(v, "kept");
}
