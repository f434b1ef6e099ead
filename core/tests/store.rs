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
