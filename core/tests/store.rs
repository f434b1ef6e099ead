//! The metadata store's transactions on Postgres.

use std::time::Duration;

use vellum_core::store::Metadata;
use vellum_testkit::TestDatabase;

/// A transaction whose caller stops waiting while its `BEGIN` is in flight (a task killed,
/// a `select!` that went the other way) leaves no transaction behind on the pool's
/// connection: what is written through the pool afterwards is committed, and seen from
/// another connection. (sqlx alone hands such a connection back inside the transaction:
/// every later statement on it then runs in it, uncommitted, holding its locks.)
#[tokio::test]
async fn a_begin_dropped_in_flight_leaves_no_transaction_behind() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let meta = Metadata::open(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE probe (n BIGINT)").execute(meta.pool()).await.unwrap();
    let rounds = 20i64;
    let mut in_flight = 0;
    for round in 0..rounds {
        let mut begin = Box::pin(meta.begin_write());
        // Polled once, the BEGIN goes out; then dropped while its answer arrives unread.
        if futures::poll!(begin.as_mut()).is_pending() {
            in_flight += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(begin);
        sqlx::query("INSERT INTO probe VALUES ($1)").bind(round).execute(meta.pool()).await.unwrap();
    }
    assert!(in_flight >= rounds / 2, "only {in_flight} of {rounds} dropped in flight");
    let other = Metadata::connect(&db.url).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM probe").fetch_one(other.pool()).await.unwrap();
    assert_eq!(seen, rounds, "every insert committed");
    let stuck: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
    )
    .fetch_one(other.pool())
    .await
    .unwrap();
    assert_eq!(stuck, 0, "no connection left idle in a transaction");
}

/// A TCP relay between a store and Postgres that counts what the client sends: each
/// round trip is one write the server reads apart from the next, since the client waits
/// for the answer in between.
struct Relay {
    url: String,
    sends: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    async fn start(database_url: &str) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut url = url::Url::parse(database_url).unwrap();
        let server = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port())).unwrap();
        let sends = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sends.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = tokio::net::TcpStream::connect(&server).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                        counter.fetch_add(1, Ordering::SeqCst);
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        Self { url: url.to_string(), sends }
    }

    fn sends(&self) -> usize {
        self.sends.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A read through [`Metadata::reader`] costs one round trip to Postgres, where a read
/// through the pool costs two: sqlx's pool tests every connection it takes back.
#[tokio::test]
async fn a_read_through_a_reader_costs_one_round_trip() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    Metadata::open(&db.url).await.unwrap();
    let relay = Relay::start(&db.url).await;
    let meta = Metadata::connect_with(&relay.url, 2).await.unwrap();
    let query = "SELECT count(*) FROM documents WHERE id = $1";
    // Both ways once, so that the statement is prepared on the connection they share.
    for _ in 0..2 {
        let mut reader = meta.reader().await.unwrap();
        let _: i64 = sqlx::query_scalar(query).bind(1i64).fetch_one(reader.connection()).await.unwrap();
        drop(reader);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reads = 20;
    let before = relay.sends();
    for _ in 0..reads {
        let _: i64 = sqlx::query_scalar(query).bind(1i64).fetch_one(meta.pool()).await.unwrap();
        // The pool's test of the returned connection runs in a task of its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let through_pool = relay.sends() - before;
    let before = relay.sends();
    for _ in 0..reads {
        let mut reader = meta.reader().await.unwrap();
        let _: i64 = sqlx::query_scalar(query).bind(1i64).fetch_one(reader.connection()).await.unwrap();
        reader.done();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let through_reader = relay.sends() - before;
    assert_eq!(through_pool, 2 * reads, "through the pool: the query, then the pool's test");
    assert_eq!(through_reader, reads, "through a reader: the query alone");
}

/// One read through a reader of `meta`, run to its end: its connection is kept.
async fn read_and_keep(meta: &Metadata) {
    let mut reader = meta.reader().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT 1::BIGINT").fetch_one(reader.connection()).await.unwrap();
    reader.done();
}

/// What the readers keep goes back to the pool when a writer finds it spent: a pool of
/// two, one connection kept after a read and the other in a transaction, still begins a
/// second transaction at once (it would wait for the pool's 30 s timeout and fail).
#[tokio::test]
async fn a_writer_gets_what_the_readers_keep_when_the_pool_is_spent() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let meta = Metadata::open_with(&db.url, 2).await.unwrap();
    read_and_keep(&meta).await;
    let first = meta.begin_write().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), meta.begin_write()).await;
    assert!(matches!(second, Ok(Ok(_))), "the second writer waited on a kept connection");
    drop(first);
}

/// A read dropped while its query runs does not keep its connection: the pool takes it
/// back and tests it, and every later read answers its own query.
#[tokio::test]
async fn a_read_dropped_half_way_leaves_its_answer_to_no_later_read() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let meta = Metadata::open_with(&db.url, 2).await.unwrap();
    for round in 0..5i64 {
        let mut reader = meta.reader().await.unwrap();
        let mut slow = Box::pin(
            sqlx::query_scalar::<_, i64>("SELECT 1000 + $1 FROM pg_sleep(0.05)")
                .bind(round)
                .fetch_one(reader.connection()),
        );
        assert!(futures::poll!(slow.as_mut()).is_pending());
        drop(slow);
        drop(reader);
        for n in 0..3i64 {
            let mut reader = meta.reader().await.unwrap();
            let got: i64 = sqlx::query_scalar("SELECT $1").bind(n).fetch_one(reader.connection()).await.unwrap();
            reader.done();
            assert_eq!(got, n, "round {round}: a read got another's answer");
        }
    }
}

/// A connection kept after a read goes back to the pool once left unused, even when no
/// read or write comes to take it: a store whose reads stopped keeps nothing for long.
#[tokio::test]
async fn a_kept_connection_left_unused_goes_back_to_the_pool() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let meta = Metadata::open_with(&db.url, 4).await.unwrap();
    read_and_keep(&meta).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (size, idle) = (meta.pool().size(), meta.pool().num_idle());
    assert_eq!(u32::try_from(idle).unwrap() + 1, size, "the read's connection is kept, out of the pool");
    let started = std::time::Instant::now();
    while u32::try_from(meta.pool().num_idle()).unwrap() < meta.pool().size() {
        assert!(started.elapsed() < Duration::from_secs(5), "the kept connection never went back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(800), "it went back only once left unused for a while");
}

/// A read that ends while the pool is spent gives its connection back to whoever waits
/// for one from the pool, rather than keeping it for the next read.
#[tokio::test]
async fn a_read_ending_while_others_wait_gives_its_connection_to_them() {
    let db = TestDatabase::new().await.expect("Postgres (run scripts/test --services-only)");
    let meta = Metadata::open_with(&db.url, 2).await.unwrap();
    let held = meta.begin_write().await.unwrap();
    let mut reader = meta.reader().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT 1::BIGINT").fetch_one(reader.connection()).await.unwrap();
    let pool = meta.pool().clone();
    let waiting = tokio::spawn(async move { pool.acquire().await.map(drop) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "the pool's two connections are in use");
    reader.done();
    // Well before the kept connections' idle second.
    let got = tokio::time::timeout(Duration::from_millis(500), waiting).await;
    assert!(matches!(got, Ok(Ok(Ok(())))), "the waiting pool user got the read's connection: {got:?}");
    drop(held);
}
