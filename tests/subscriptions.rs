//! Subscriptions survive a broker restart, and a subscription the broker
//! refuses is reported, not ignored. Secrets stay out of even trace logs.

use std::time::Duration;

use propeller_tests::{
    publish_once, servers_available, Edge, Env, Mosquitto, Pki, ServiceProcess, CONNECTED, START,
};

const RECEIVED: &str = "message received topic=m/dom/c/chan/control/manager/start";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_restored_after_a_broker_restart() {
    if !servers_available("subscriptions_are_restored_after_a_broker_restart") {
        return;
    }
    let pki = Pki::shared();
    let (proplet, manager) = (pki.identity("proplet"), pki.identity("manager"));
    let mut broker = Mosquitto::for_clients(pki, &[&proplet, &manager]);
    let mut env = Env::new("PROPLET", &proplet);
    env.plain(broker.plain).set("LOG_LEVEL", "debug");
    let service = ServiceProcess::start("proplet", &env.vars);
    service.wait_for(CONNECTED, Duration::from_secs(10));
    service.wait_for(
        "subscribed topic=m/dom/c/chan/control/manager/start",
        Duration::from_secs(10),
    );

    let mut publisher = Env::new("MANAGER", &manager);
    publisher.plain(broker.plain);
    publish_once(&publisher, START, "before").await;
    service.wait_for_count(RECEIVED, 1, Duration::from_secs(10));

    // No persistence: the restarted broker has forgotten every subscription.
    broker.restart();
    service.wait_for_count(CONNECTED, 2, Duration::from_secs(15));
    service.wait_for_count(
        "subscribed topic=m/dom/c/chan/control/manager/start",
        2,
        Duration::from_secs(10),
    );
    publish_once(&publisher, START, "after").await;
    service.wait_for_count(RECEIVED, 2, Duration::from_secs(10));
    assert!(
        service.output().contains("MQTT connection failed"),
        "{}",
        service.output()
    );
}

#[test]
fn a_refused_subscription_is_logged_with_its_topic() {
    if !servers_available("a_refused_subscription_is_logged_with_its_topic") {
        return;
    }
    let pki = Pki::shared();
    let proplet = pki.identity("proplet");
    let broker = Mosquitto::start_refusing_subscriptions(
        &propeller_tests::client_id("proplet"),
        &proplet.secret,
    );
    let mut env = Env::new("PROPLET", &proplet);
    env.plain(broker.plain);
    let service = ServiceProcess::start("proplet", &env.vars);
    service.wait_for(CONNECTED, Duration::from_secs(10));
    let line = service.wait_for(
        "the broker refused the subscription",
        Duration::from_secs(10),
    );
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("topic=m/dom/c/chan/"), "{line}");
    assert!(line.contains("not allowed on this topic"), "{line}");
    assert!(
        !service.output().contains(&proplet.secret),
        "{}",
        service.output()
    );
}

#[test]
fn secrets_stay_out_of_trace_logs() {
    if !servers_available("secrets_stay_out_of_trace_logs") {
        return;
    }
    let pki = Pki::shared();
    let ids: Vec<_> = ["manager", "proplet", "proxy"]
        .iter()
        .map(|n| pki.identity(n))
        .collect();
    let broker = Mosquitto::for_clients(pki, &ids.iter().collect::<Vec<_>>());
    let edge = Edge::start(pki, broker.plain, "server", "ca.crt");
    for (index, (name, identity)) in ["manager", "proplet", "proxy"].iter().zip(&ids).enumerate() {
        let prefix = name.to_uppercase();
        // A healthy mTLS connection, then a CN mismatch that the edge refuses.
        let mut healthy = Env::new(&prefix, identity);
        healthy
            .mtls(edge.port, pki, identity)
            .set("LOG_LEVEL", "trace");
        let mut mismatch = Env::new(&prefix, identity);
        mismatch
            .mtls(edge.port, pki, &ids[(index + 1) % 3])
            .set("LOG_LEVEL", "trace");
        let mut output = String::new();
        for env in [healthy, mismatch] {
            let mut process = ServiceProcess::start(name, &env.vars);
            process.wait_for("MQTT connection", Duration::from_secs(15));
            process.terminate(Duration::from_secs(5));
            output.push_str(&process.output());
        }
        assert!(output.contains(CONNECTED), "{name}:\n{output}");
        assert!(
            output.contains("closed before the broker answered CONNECT"),
            "{name}:\n{output}"
        );
        for secret in ids.iter().map(|id| id.secret.as_str()) {
            assert!(
                !output.contains(secret),
                "{name} printed a client key or CN:\n{output}"
            );
        }
    }
}
