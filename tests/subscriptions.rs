//! Subscriptions are handles that cannot lose what they subscribed to, however many
//! events go by (the broadcast `events()` keeps only the last 1024 for a slow reader).

use std::time::Duration;

use aemp_host::{NodeError, Value};
use aemp_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_monitor_resolves_with_its_reason() {
    let node = builder("subs-mon", "s").start().await.unwrap();
    // More deaths than the events channel holds, none read meanwhile.
    let mut events = node.events();
    let mut watched = Vec::new();
    for i in 0..1500 {
        let port = node.named_port(&format!("p{i}")).await.unwrap();
        let monitor = node.monitor(port.id()).await.unwrap();
        watched.push((port, monitor));
    }
    for (i, (port, _)) in watched.iter().enumerate() {
        node.kill(port.id(), vec![Value::text("why"), Value::Int(i as i128)])
            .await
            .unwrap();
    }
    for (i, (port, monitor)) in watched.into_iter().enumerate() {
        assert_eq!(monitor.port(), port.id());
        let reason = tokio::time::timeout(WAIT, monitor).await.unwrap().unwrap();
        assert_eq!(reason, [Value::text("why"), Value::Int(i as i128)]);
    }
    // The observer lagged instead.
    assert!(matches!(
        events.recv().await,
        Err(tokio::sync::broadcast::error::RecvError::Lagged(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmonitor_cancels_and_a_remote_exit_resolves() {
    let a = builder("subs-a", "s").start().await.unwrap();
    let b = builder("subs-b", "s").start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a.id(), WAIT).await.unwrap();
    let mut port = a.named_port("p").await.unwrap();
    let cancelled = b.monitor(port.id()).await.unwrap();
    b.unmonitor(port.id()).await.unwrap();
    assert!(matches!(cancelled.await, Err(NodeError::Cancelled)));
    let down = b.monitor(port.id()).await.unwrap();
    // A message after the monitor request arrives after it: the monitor is in place.
    b.send(port.id(), vec![Value::Int(1)]).await.unwrap();
    recv(&mut port).await;
    drop(port);
    // A normal exit: an empty reason.
    assert_eq!(tokio::time::timeout(WAIT, down).await.unwrap().unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arrive_in_order_none_lost() {
    let a = builder("subs-req", "s")
        .port_capacity(4)
        .start()
        .await
        .unwrap();
    let b = builder("subs-peer", "s").start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a.id(), WAIT).await.unwrap();
    let mut requests = a.handle_requests("job").await.unwrap();
    assert_eq!(requests.tag(), "job");
    // Far more than the inbox holds, sent before anything is read.
    let node_port = format!("{}#", a.id());
    for i in 0..200 {
        b.send(&node_port, vec![Value::text("job"), Value::Int(i)])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..200 {
        let r = tokio::time::timeout(WAIT, requests.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.node, b.id());
        assert_eq!(r.args, [Value::Int(i)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_up_answers_however_many_events_went_by() {
    let a = builder("subs-up-a", "s").start().await.unwrap();
    let b = builder("subs-up-b", "s").start().await.unwrap();
    // Fill the events channel first: each port dies (dropped) monitored.
    for i in 0..1100 {
        let port = b.named_port(&format!("x{i}")).await.unwrap();
        drop(b.monitor(port.id()).await.unwrap());
    }
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a.id(), WAIT).await.unwrap();
    // Already up: answered without another event (none will come, so waiting for one
    // would end in a timeout; a loaded machine may take more than a millisecond to answer).
    b.wait_up(a.id(), Duration::from_secs(1)).await.unwrap();
    assert!(matches!(
        b.wait_up("nobody", Duration::from_millis(50)).await,
        Err(NodeError::Timeout)
    ));
}
