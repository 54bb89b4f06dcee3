//! The Rust API's errors are typed: callers match on what went wrong.

use aemp_host::{Node, NodeError, Refusal, Value};
use aemp_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_their_kind() {
    let a = builder("err-a", "s").start().await.unwrap();
    let refused = a.send("", vec![Value::Int(1)]).await.unwrap_err();
    assert!(
        matches!(
            &refused,
            NodeError::Refused {
                kind: Refusal::InvalidPortId,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(
        refused.to_string(),
        "invalid port id '': expected NODE#NAME"
    );
    let _taken = a.named_port("taken").await.unwrap();
    assert!(matches!(
        a.named_port("taken").await.unwrap_err(),
        NodeError::Refused {
            kind: Refusal::PortExists,
            ..
        }
    ));
    assert!(matches!(
        a.monitor("").await.unwrap_err(),
        NodeError::Refused {
            kind: Refusal::InvalidPortId,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_part_way_says_how_much_went_out() {
    let a = builder("err-batch", "s").start().await.unwrap();
    let mut inbox = a.port().await.unwrap();
    let batch = vec![
        (inbox.id().to_owned(), vec![Value::Int(1)]),
        (inbox.id().to_owned(), vec![Value::Int(2)]),
        (String::new(), vec![Value::Int(3)]),
        (inbox.id().to_owned(), vec![Value::Int(4)]),
    ];
    let err = a.send_batch(batch).await.unwrap_err();
    let NodeError::Partial { sent, cause } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*sent, 2);
    assert!(matches!(
        **cause,
        NodeError::Refused {
            kind: Refusal::InvalidPortId,
            ..
        }
    ));
    assert_eq!(recv(&mut inbox).await, [Value::Int(1)]);
    assert_eq!(recv(&mut inbox).await, [Value::Int(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bind_keeps_the_operating_systems_error() {
    let a = builder("err-bind", "s").start().await.unwrap();
    let err = Node::builder()
        .node_id("err-bind-2")
        .bind(&addr(&a))
        .start()
        .await
        .unwrap_err();
    let NodeError::Bind { addr: at, source } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(at, &addr(&a));
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_limits_reach_the_engine() {
    let err = builder("err-depth", "s")
        .max_depth(100_000)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Config(_)), "{err:?}");
    // A node that is never reached: its queue holds 100 bytes.
    let a = builder("err-queue", "s")
        .max_queue_bytes(100)
        .start()
        .await
        .unwrap();
    let chunk = vec![Value::Bytes(vec![0; 40])];
    a.send("nowhere#p", chunk.clone()).await.unwrap();
    a.send("nowhere#p", chunk.clone()).await.unwrap();
    assert!(matches!(
        a.send("nowhere#p", chunk).await.unwrap_err(),
        NodeError::Refused {
            kind: Refusal::QueueFull,
            ..
        }
    ));
}
